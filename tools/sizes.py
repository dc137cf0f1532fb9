"""Sizes a user downloads: a full clone, a shallow clone (``--depth 1``) and the built wheel.

    python tools/sizes.py

Clones this repository's HEAD into temporary folders (``file://`` URL, so git packs objects as a server would)
and builds the wheel with ``pip wheel --no-deps``; prints each size in MB. The README quotes these numbers.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, extra in (("full clone", []), ("shallow clone (--depth 1)", ["--depth", "1"])):
            dest = tmp / label.split()[0]
            subprocess.run(["git", "clone", "-q", *extra, f"file://{ROOT}", str(dest)], check=True)
            print(f"{label}: {folder_mb(dest / '.git'):.0f} MB of git data, {folder_mb(dest):.0f} MB in all")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp / "dist"), str(tmp / "shallow")], check=True, capture_output=True)
        (wheel,) = (tmp / "dist").glob("*.whl")
        print(f"wheel {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
