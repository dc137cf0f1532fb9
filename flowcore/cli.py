"""``flowcore train | evaluate | score | data | app``: batch work from the command line.

Every expected failure (missing data, bad checkpoint, bad config) ends with one clear line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import load_train_config, train

    cfg = load_train_config(args.config)
    if args.epochs is not None:
        cfg.epochs = args.epochs
    summary = train(
        cfg,
        run_dir=args.run_dir,
        resume=args.resume,
        data_dir=args.data_dir,
        export_dir=args.export,
        max_minutes=args.max_minutes,
        progress=not args.no_progress,
        device=args.device,
    )
    print(f"done: {summary['stopped_by']}, test bpd {summary['test_bpd']:.4f}, exported to {summary['export']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowcore", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a config (JSON or TOML)")
    t.add_argument("config")
    t.add_argument("--run-dir", default=None, help="run folder (default runs/NAME)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in the run folder")
    t.add_argument("--data-dir", default=None, help="dataset root (default $FLOWCORE_DATA_DIR)")
    t.add_argument("--export", default=None, help="checkpoint folder to export to (default checkpoints/NAME)")
    t.add_argument("--max-minutes", type=float, default=None)
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .data import DatasetNotFound

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CheckpointError, DatasetNotFound, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"flowcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowcore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "Path"]
