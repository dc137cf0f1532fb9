"""Write flowcore/bundled/manifest.json (size and SHA-256 of every shipped checkpoint's files) from checkpoints/.

    python tools/zoo_manifest.py           # regenerate
    python tools/zoo_manifest.py --check   # exit 1 if the manifest does not match the shipped files

Run it after any checkpoint changes (tests/test_zoo.py fails until then): `flowcore zoo fetch` verifies every
downloaded file against this manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowcore.zoo.remote import MANIFEST, make_manifest

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    text = json.dumps(make_manifest(ROOT / "checkpoints"), indent=1, sort_keys=True) + "\n"
    if args.check:
        ok = MANIFEST.is_file() and MANIFEST.read_text() == text
        print("manifest is up to date" if ok else "manifest is out of date: python tools/zoo_manifest.py")
        return 0 if ok else 1
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(text)
    print(f"wrote {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
