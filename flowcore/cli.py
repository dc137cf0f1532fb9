"""``flowcore train | evaluate | score | data | app``: batch work from the command line.

Every expected failure (missing data, bad checkpoint, bad config) ends with one clear line on
stderr and a non-zero exit code, never a traceback.

``train``, ``evaluate`` and ``score`` also run under ``torchrun --nproc_per_node N`` (one process per
device, see :mod:`flowcore.training.distributed`): the work is split across processes and only rank 0 prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

DEVICE_HELP = "cpu, cuda or cuda:N (default cpu); under torchrun, cuda means cuda:$LOCAL_RANK"


def _is_main() -> bool:
    from .training import distributed

    return distributed.is_main()


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.train import load_train_config, train

    if args.images is not None:
        return _train_on_images(args)
    if args.config is None:
        raise ValueError("give a config file (flowcore train CONFIG) or a folder of your images "
                         "(flowcore train --images DIR --name NAME)")
    own_only = [flag for flag, value in (("--name", args.name), ("--ood", args.ood),
                                         ("--preset", args.preset), ("--size", args.size), ("--gray", args.gray),
                                         ("--color", args.color))
                if value not in (None, False, [])]
    if own_only:
        raise ValueError(f"{', '.join(own_only)} only apply with --images DIR")
    cfg = load_train_config(args.config)
    if args.epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)  # validated like the file's own value
    if cfg.features:  # Sec. 8: a flow on image features (or App. K.3: on table rows), in the same training loop
        from .ood.vectors import train_vectors

        if args.export_paused:
            raise ValueError("--export-paused is for flows on images; a flow on features exports its best epoch "
                             "when it stops")
        summary = train_vectors(cfg, args.run_dir, args.data_dir, args.export, args.replace,
                                progress=not args.no_progress, max_minutes=args.max_minutes,
                                max_steps=args.max_steps, device=args.device, resume=args.resume,
                                allow_emulated_bf16=args.allow_emulated_bf16)
    else:
        summary = train(
            cfg,
            run_dir=args.run_dir,
            resume=args.resume,
            data_dir=args.data_dir,
            export_dir=args.export,
            max_minutes=args.max_minutes,
            max_steps=args.max_steps,
            progress=not args.no_progress,
            device=args.device,
            replace=args.replace,
            allow_emulated_bf16=args.allow_emulated_bf16,
            export_paused=args.export_paused,
        )
    if not _is_main():
        return 0
    if summary["stopped_by"] == "max_steps":
        print(
            f"stopped after {args.max_steps} steps at epoch {summary['epoch']}, step {summary['step']}: "
            "state saved, continue with --resume"
        )
    elif "test_nll_per_dim" in summary:  # a flow on vectors: nats per feature, its best epoch exported
        print(f"done: {summary['stopped_by']} after {summary['epoch']} epochs, best epoch {summary['selected_epoch']}, "
              f"test nll {summary['test_nll_per_dim']:.4f} nats/feature, exported to {summary['export']}")
    else:
        print(f"done: {summary['stopped_by']}, test bpd {summary['test_bpd']:.4f}, exported to {summary['export']}")
    return 0


def _train_on_images(args: argparse.Namespace) -> int:
    """``flowcore train --images DIR --name NAME``: a flow on the user's own images (flowcore.ood.own_data)."""
    import json

    from .ood.own_data import train_on_images

    if args.config is not None:
        raise ValueError("give either a config file or --images DIR, not both")
    if not args.name:
        raise ValueError("--images needs --name NAME: the name your model gets in your zoo")
    config_only = [flag for flag, value in (("--resume", args.resume), ("--run-dir", args.run_dir),
                                            ("--export", args.export), ("--epochs", args.epochs),
                                            ("--max-steps", args.max_steps),
                                            ("--allow-emulated-bf16", args.allow_emulated_bf16),
                                            ("--export-paused", args.export_paused))
                   if value not in (None, False)]
    if config_only:
        raise ValueError(f"{', '.join(config_only)} only apply with a config file, not with --images")
    if args.device != "cpu":
        raise ValueError("--images trains on the CPU; leave out --device")
    summary = train_on_images(args.images, args.name, args.ood or [], preset=args.preset or "quick",
                              size=args.size or 28, gray=True if args.gray else False if args.color else None,
                              replace=args.replace,
                              progress=not args.no_progress, max_minutes=args.max_minutes)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .ood.evaluate import evaluate, refresh_complexity
    from .zoo.checkpoints import read_config, resolve, write_json

    if args.refresh_complexity:
        summary = refresh_complexity(args.checkpoint, data_dir=args.data_dir)
        print(json.dumps(summary["auroc"]) if args.json else f"refreshed the complexity scores of {args.checkpoint}")
        return 0
    if args.background:
        cfg = read_config(args.checkpoint)
        read_config(args.background)  # fails clearly if it does not exist
        cfg["background"] = args.background
        write_json(resolve(args.checkpoint) / "config.json", cfg)
    summary = evaluate(
        args.checkpoint,
        data_dir=args.data_dir,
        n_draws=args.draws,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        ood_subset=args.ood_subset,
        ood=args.ood,
        seed=args.seed,
        device=args.device,
        write=not args.no_write,
        progress=not args.json,
    )
    if not _is_main():
        return 0
    if args.json:
        print(json.dumps(summary))
        return 0
    if "bpd_mean" in summary:
        bpd = f"mean {summary['bpd_mean']:.4f}, median {summary['bpd_median']:.4f}"
        print(f"test bpd: {bpd}  counts {summary['counts']}")
    else:
        print(f"test nll: mean {summary['nll_per_feature_mean']:.4f} nats/feature  counts {summary['counts']}")
    table = summary["auroc"]
    sets = sorted({s for row in table.values() for s in row})
    print(f"{'AUROC (in-dist positive)':<24}" + "".join(f"{s:>14}" for s in sets))
    for score, row in table.items():
        print(f"{score:<24}" + "".join(f"{row.get(s, float('nan')):>14.4f}" for s in sets))
    for name, why in summary["skipped_sets"].items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .ood.scoring import score_files, write_rows

    rows, failures = score_files(
        args.checkpoint,
        args.paths,
        score=args.score,
        fpr=args.fpr,
        invert=args.invert,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    if _is_main():
        write_rows(rows, args.format, sys.stdout)
        if args.batch_test and rows:
            from .ood.evaluate import load_reference
            from .ood.scores import typicality_batch_test

            ref = load_reference(args.checkpoint)
            ll = [r["log_likelihood_nats"] for r in rows]
            stat, p = typicality_batch_test(ll, ref["train__likelihood"], ref["test__likelihood"])
            print(f"typicality batch test (Nalisnick et al.): M={len(ll)}, |mean log P - H| = {stat:.2f} nats, "
                  f"bootstrap p = {p:.4f}", file=sys.stderr)
        for path, why in failures:
            print(f"flowcore score: cannot score {path}: {why}", file=sys.stderr)
    return 1 if failures else 0


def _cmd_data(args: argparse.Namespace) -> int:
    from .data import datasets as data

    if args.action == "download":
        root = data.data_dir(args.data_dir)
        if root is None:
            raise ValueError("set FLOWCORE_DATA_DIR or pass --data-dir to say where to download")
        for name in args.names:
            print(f"downloaded {name} to {data.download(name, root)}")
        return 0
    for name in data.DATASETS:
        try:
            n = len(data.load_images(name, "test", args.data_dir))
            print(f"{name:<17} found ({n} test images)")
        except data.DatasetNotFound as e:
            print(f"{name:<17} missing: {e}")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from .zoo import remote as zoo

    if args.action == "fetch":
        if not args.names:
            raise ValueError("name the checkpoints to fetch (flowcore zoo list shows them)")
        for name in args.names:
            print(f"fetched {name} to {zoo.fetch_checkpoint(name, args.base_url)}")
        return 0
    rows = zoo.zoo_rows()
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['size']:>8}  {r['where']}")
    print(zoo.roots_text())
    return 0


def dashboard_home() -> Path | None:
    """The dashboard's entry script: ``app/Home.py`` of a checkout (installed editable) or the wheel's copy, both
    imported as the package ``flowcore.dashboard`` (pyproject.toml maps it to ``app/``)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("flowcore.dashboard")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "Home.py"


APP_STOP_GRACE = 15.0  # seconds the dashboard gets to stop after a forwarded signal, before it is killed


def _death_signal() -> Callable[[], None] | None:
    """For the child, to run before exec (Linux): have the kernel SIGTERM it when this process dies, even by
    SIGKILL, which no handler of ours can forward. Looked up here, in the parent: the child between fork and exec
    should import nothing."""
    if sys.platform != "linux":
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG


def _run_child(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` as a child that lives and dies with this process: SIGTERM, SIGINT and SIGHUP sent to us (a
    ``docker stop``, a ``kill``, a service manager) are forwarded to it and we wait for it to end, so it never
    outlives us holding its port. A child that ignores them is killed after :data:`APP_STOP_GRACE` seconds.
    Returns its exit code (128 + N for a child ended by signal N, as a shell reports it)."""
    import signal
    import subprocess
    import threading
    import time

    child = subprocess.Popen(cmd, env=env, preexec_fn=_death_signal())
    asked: list[float] = []  # when a stop was forwarded

    def forward(signum: int, frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)
        asked.append(time.monotonic())

    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        wanted = []
    previous = {sig: signal.signal(sig, forward) for sig in wanted}
    try:
        while True:
            try:
                code = child.wait(timeout=0.5)  # short waits: the grace period is checked between them
                break
            except subprocess.TimeoutExpired:
                if asked and time.monotonic() - asked[0] > APP_STOP_GRACE:
                    child.kill()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # leaving by an exception of our own: the child goes too
            child.kill()
            child.wait()
    return 128 - code if code < 0 else code


def _cmd_app(args: argparse.Namespace) -> int:
    import os

    home = dashboard_home()
    if home is None or not home.is_file():
        raise FileNotFoundError(f"the dashboard is not in this installation (looked for {home})")
    env = dict(os.environ)
    if args.checkpoint:
        env["FLOWCORE_DEFAULT_CHECKPOINT"] = args.checkpoint
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(home),
        "--server.port",
        str(args.port),
        "--server.address",
        args.host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",  # an installed dashboard never changes under it: no watcher polling its files on a laptop CPU
        "--client.toolbarMode",
        "minimal",  # no Deploy button or developer menu for the dashboard's users
    ]
    return _run_child(cmd, env)


def _cmd_release(args) -> int:
    from .release import report, steps

    if args.step == "gpu-zoo":  # runs where its configs are: the device machine's copy of the checkout
        from .release import gpu_zoo

        paths = [Path(c) for c in args.configs] or gpu_zoo.plan(steps.checkout_root(args.root))
        if args.plan:
            print("\n".join(gpu_zoo.plan_rows(paths)))
            return 0
        if args.out is None:
            raise ValueError("--out is required (the folder the device tool sends back)")
        gpu_zoo.run(paths, Path(args.out), Path(args.work) if args.work else None, args.minutes, args.device,
                    args.data_dir, args.max_epochs, args.smoke, say=lambda line: print(line, flush=True))
        return 0
    root = steps.checkout_root(args.root)
    if args.step == "evaluate":
        if args.data_dir:
            os.environ["FLOWCORE_DATA_DIR"] = args.data_dir
        steps.evaluate_zoo(args.names or None, say=lambda line: print(line, flush=True))
        print("next: flowcore release report")
        return 0
    if args.step == "examples":
        print(steps.write_examples(args.data_dir))
        return 0
    if args.step == "screenshots":
        from .release import screenshots
        from .zoo.checkpoints import DEFAULT_MODEL

        if args.data_dir:
            os.environ["FLOWCORE_DATA_DIR"] = args.data_dir
        out = Path(args.out) if args.out else root / "docs" / "screenshots"
        images = [Path(i) for i in args.image]
        print(screenshots.take(args.checkpoint or DEFAULT_MODEL, out, images, Path(args.chromium), args.timeout,
                               args.size, args.own_training))
        return 0
    ok, message = (report.write if args.step == "report" else steps.write_manifest)(root, check=args.check)
    print(message)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowcore", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line (or set FLOWCORE_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a config (JSON or TOML) or on a folder of your images")
    t.add_argument("config", nargs="?", default=None, help="config file (leave out with --images)")
    t.add_argument("--images", default=None, metavar="DIR",
                   help="train on your own images: every image below DIR (subfolders too); a tenth is held out")
    t.add_argument("--name", default=None, help="with --images: the model's name in your zoo")
    t.add_argument("--ood", nargs="+", default=None, metavar="DIR",
                   help="with --images: folders of images the model should call OOD (measured as AUROCs)")
    t.add_argument("--preset", default=None, choices=["quick", "standard"],
                   help="with --images: quick (4 CPU minutes at most) or standard (50 at most)")
    t.add_argument("--size", type=int, default=None, choices=[28, 32], help="with --images: side in pixels (28)")
    colour = t.add_mutually_exclusive_group()
    colour.add_argument("--gray", action="store_true",
                        help="with --images: train on grayscale (default: grayscale when every image is)")
    colour.add_argument("--color", action="store_true", help="with --images: train on RGB")
    t.add_argument("--run-dir", default=None, help="run folder (default runs/NAME)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in the run folder")
    t.add_argument("--data-dir", default=None, help="dataset root (default $FLOWCORE_DATA_DIR)")
    t.add_argument("--export", default=None, help="checkpoint folder to export to (default RUN_DIR/checkpoint)")
    t.add_argument("--replace", action="store_true", help="allow replacing a model already in the export folder")
    t.add_argument("--max-minutes", type=float, default=None)
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--max-steps", type=int, default=None, help="stop after N steps of this call (state saved)")
    t.add_argument("--device", default="cpu", help=DEVICE_HELP)
    t.add_argument("--allow-emulated-bf16", action="store_true",
                   help='train a "precision": "bf16" config even where bfloat16 is emulated (slower than float32)')
    t.add_argument("--export-paused", action="store_true",
                   help="with --resume: export the saved run's model as it stands, training nothing (the run can "
                        "go on later)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="reference statistics, bpd and the AUROC table of a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--draws", type=int, default=1, help="dequantization draws averaged per image")
    e.add_argument("--train-subset", type=int, default=2000)
    e.add_argument("--test-subset", type=int, default=None)
    e.add_argument("--ood-subset", type=int, default=None)
    e.add_argument("--ood", nargs="*", default=None, help="OOD sets (default: the standard ones present)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu", help=DEVICE_HELP)
    e.add_argument("--no-write", action="store_true", help="do not update the checkpoint's reference files")
    e.add_argument("--background", default=None, help="link a background checkpoint (likelihood_ratio score)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument(
        "--refresh-complexity",
        action="store_true",
        help="only recompute the complexity scores from the stored likelihoods (no model run)",
    )
    e.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("score", help="score image files or folders")
    s.add_argument("checkpoint")
    s.add_argument("paths", nargs="+")
    s.add_argument("--score", default="likelihood",
                   help="score used for percentile and OOD flag: likelihood, complexity_png, complexity_webp, "
                        "typicality, likelihood_ratio (with a background model), last_scale, or, with a paired flow "
                        "on features (Sec. 8): embedding_likelihood and its baselines embedding_gaussian (a "
                        "Ledoit-Wolf Gaussian of the training features) and embedding_knn (k-th nearest training "
                        "feature, Sun et al. 2022); a flow on features itself: likelihood, embedding_gaussian, "
                        "embedding_knn")
    s.add_argument("--fpr", type=float, default=0.05, help="false-positive rate of the OOD flag")
    s.add_argument("--invert", choices=["auto", "yes", "no"], default="auto")
    s.add_argument("--format", choices=["csv", "json"], default="csv")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--device", default="cpu", help=DEVICE_HELP)
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--batch-test", action="store_true", help="typicality test of all images as one batch")
    s.set_defaults(func=_cmd_score)

    d = sub.add_parser("data", help="list or download datasets")
    d.add_argument("action", choices=["list", "download"])
    d.add_argument("names", nargs="*")
    d.add_argument("--data-dir", default=None)
    d.set_defaults(func=_cmd_data)

    z = sub.add_parser("zoo", help="list the model zoo, or fetch checkpoints from a mirror")
    z.add_argument("action", choices=["list", "fetch"])
    z.add_argument("names", nargs="*")
    z.add_argument("--base-url", default=None, help="mirror of the zoo (default $FLOWCORE_ZOO_URL)")
    z.set_defaults(func=_cmd_zoo)

    r = sub.add_parser("release", help="the zoo's release steps, run in a checkout: evaluate, report, manifest, "
                                       "examples, screenshots, gpu-zoo")
    steps_of = r.add_subparsers(dest="step", required=True, metavar="STEP")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=None, help="the checkout (default: the working directory)")
    common.add_argument("--data-dir", default=None, help="dataset root (default $FLOWCORE_DATA_DIR)")
    s = steps_of.add_parser("evaluate", parents=[common], help="reference statistics of shipped checkpoints")
    s.add_argument("names", nargs="*", help="checkpoints (default: every shipped one)")
    for step, what in (("report", "docs/results.md, the README's results and the model cards"),
                       ("manifest", "the download manifest")):
        s = steps_of.add_parser(step, parents=[common], help=what)
        s.add_argument("--check", action="store_true", help="write nothing, exit 1 when out of date")
    steps_of.add_parser("examples", parents=[common], help="the bundled example images")
    s = steps_of.add_parser("screenshots", parents=[common],
                            help="every dashboard page in headless Chromium, for the README (docs/screenshots/)")
    s.add_argument("--checkpoint", default=None, help="a name in the checkpoints folder, or a path (default: the "
                                                          "dashboard's default model)")
    s.add_argument("--image", action="append", default=[], help="upload this image (repeatable; default: the "
                                                                   "first Fashion-MNIST and MNIST test images)")
    s.add_argument("--out", default=None, help="folder (default: docs/screenshots of the checkout)")
    s.add_argument("--chromium", default="/usr/bin/chromium")
    s.add_argument("--timeout", type=float, default=300, help="seconds to wait for one page")
    s.add_argument("--size", default=None, help="viewport WIDTHxHEIGHT, e.g. 1024x768 (a projector)")
    s.add_argument("--own-training", action="store_true",
                   help="only the Train-on-your-images page, during and after a training of its bundled example")
    s = steps_of.add_parser("gpu-zoo", parents=[common],
                            help="train the GPU plan (configs/gpu/) sized to a time budget and pack it for return")
    s.add_argument("configs", nargs="*", help="training configs (default: the plan, configs/gpu/*.json)")
    s.add_argument("--out", default=None, help="folder for the results (the device tool's $OUT): tars and report")
    s.add_argument("--work", default=None, help="folder for runs, probes and exports (default: a temporary one)")
    s.add_argument("--minutes", type=float, default=8.0, help="training budget for all configs together")
    s.add_argument("--device", default="cuda")
    s.add_argument("--max-epochs", type=int, default=200)
    s.add_argument("--smoke", action="store_true", help="CPU, tiny batches and subsets, about 6 s a model")
    s.add_argument("--plan", action="store_true", help="print the models' sizes and stop")
    r.set_defaults(func=_cmd_release)

    a = sub.add_parser("app", help="start the dashboard")
    a.add_argument("--port", type=int, default=8501)
    a.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    a.add_argument("--checkpoint", default=None, help="checkpoint selected at start (default fashion_realnvp)")
    a.set_defaults(func=_cmd_app)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data.datasets import DatasetNotFound
    from .data.embeddings import ExtractorMissing
    from .zoo.checkpoints import CheckpointError

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FLOWCORE_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except (CheckpointError, DatasetNotFound, ExtractorMissing, OSError, ValueError) as e:
        if debug:  # the full traceback, for a bug hiding behind a one-line message
            raise
        print(f"flowcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowcore {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # leave a process group torchrun made us join
            from .training import distributed

            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser"]
