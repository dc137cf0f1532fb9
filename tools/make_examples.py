"""Write flowcore/examples/examples.npz: the first 16 test images of each data set whose licence lets us ship them.

    FLOWCORE_DATA_DIR=... python tools/make_examples.py

They let the dashboard's gallery, its default image and the tour work straight after set-up, without
FLOWCORE_DATA_DIR; the full sets are used whenever they are present. CelebA is left out: its agreement does not
allow redistributing the images. Sources and licences: flowcore/examples/README.md.
"""

from __future__ import annotations

import sys

import numpy as np

from flowcore.data.datasets import EXAMPLE_SETS, EXAMPLES_FILE, EXAMPLES_PER_SET, load_images


def main() -> int:
    arrays = {name: load_images(name, "test")[:EXAMPLES_PER_SET] for name in EXAMPLE_SETS}
    EXAMPLES_FILE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(EXAMPLES_FILE, **arrays)
    for name, x in arrays.items():
        print(f"{name}: {x.shape} {x.dtype}")
    print(f"wrote {EXAMPLES_FILE} ({EXAMPLES_FILE.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
