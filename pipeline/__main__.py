"""Command line: `python -m pipeline SUBCOMMAND ...` (`--help` lists them).

Each subcommand is a pair of functions: `_add_NAME(subparsers)` declares its arguments and
`_run_NAME(args) -> int` does the work. A PipelineError prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .errors import PipelineError


def _add_weights(subparsers) -> None:
    p = subparsers.add_parser(
        "weights",
        help="show which optional models are present (weights/manifest.json); `weights fetch NAME` downloads one",
        description="Without arguments: a table of the optional models and their state "
        "(available, unverified, missing, corrupt). Nothing is downloaded unless you run `weights fetch NAME`.",
    )
    actions = p.add_subparsers(dest="weights_action", metavar="ACTION")
    fetch = actions.add_parser("fetch", help="download one model with a progress bar, then verify its checksums")
    fetch.add_argument("name", help="model name as listed by `python -m pipeline weights`")
    p.set_defaults(run=_run_weights)


def _run_weights(args: argparse.Namespace) -> int:
    from . import weights  # noqa: PLC0415 (each subcommand imports only what it needs)

    if args.weights_action == "fetch":
        weights.fetch(args.name)
    print(weights.format_table(weights.status()))
    print(f"\nweights folder: {weights.default_weights_dir()} (set PHOTO3D_WEIGHTS to use another)")
    return 0


def _add_reconstruct(subparsers) -> None:
    from .config import PRESETS  # noqa: PLC0415

    p = subparsers.add_parser(
        "reconstruct", help="photos (+ masks + camera file) -> textured GLB and OBJ zip",
        description="Reconstruct a textured mesh from a capture folder or a list of files.",
    )
    p.add_argument("input", nargs="*", help="capture folder, or photo / mask / camera files")
    p.add_argument("-o", "--output", help="output .glb path (the OBJ zip and cameras.json go beside it)")
    p.add_argument("--preset", default="balanced", choices=list(PRESETS), help="quality preset (default: balanced)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set refine.iterations=300 (see `--list-settings`)")
    p.add_argument("--list-settings", action="store_true", help="print every setting with its range and exit")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--split", default="train", help="which split of a NeRF-style capture to fit (default: train)")
    p.set_defaults(run=_run_reconstruct)


def _run_reconstruct(args: argparse.Namespace) -> int:
    from .cli import run_reconstruct  # noqa: PLC0415

    return run_reconstruct(args)


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="held-out PSNR / mask IoU and fold-overs of a GLB; Chamfer, F-score, normal consistency with --gt",
        description="Render a GLB written by `reconstruct` into the cameras of a capture (its held-out split by "
        "default) and compare with the photos; measure its surface (fold-overs, creases); with --gt, compare the "
        "geometry with a ground-truth mesh; with --images, write photo | textured | shaded pictures per view.",
    )
    p.add_argument("glb", help="a .glb written by `python -m pipeline reconstruct`")
    p.add_argument("input", nargs="+", help="capture folder or files with the views to compare against")
    p.add_argument("--split", help="split of a NeRF-style capture to compare against (default: test where the "
                   "capture has one, else all its views)")
    p.add_argument("--gt", help="ground-truth mesh (any format trimesh reads) in the capture's world frame")
    p.add_argument("--images", metavar="DIR", help="write one PNG per view into DIR: the photo (on white, as "
                   "scored), the textured render and a grey lit render (head light) side by side")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .cli import run_eval  # noqa: PLC0415

    return run_eval(args)


def _add_batch(subparsers) -> None:
    from .config import PRESETS  # noqa: PLC0415

    p = subparsers.add_parser(
        "batch", help="every sub-folder (or .zip) of a folder -> one model each, as Ray tasks (local or a cluster)",
        description="Reconstruct many captures, one Ray task each (pip install -r requirements-batch.txt). Results go "
        "to OUT_DIR/NAME/ and one row per capture to OUT_DIR/manifest.jsonl; running it again skips the captures "
        "done, so it resumes after a crash or Ctrl-C.",
    )
    p.add_argument("captures", help="folder with one sub-folder or .zip per capture")
    p.add_argument("-o", "--output", required=True, help="output folder (OUT_DIR/NAME/NAME.glb, OUT_DIR/manifest.jsonl)")
    p.add_argument("--preset", default="balanced", choices=list(PRESETS), help="quality preset (default: balanced)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting for every capture (see `reconstruct --list-settings`)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to use: auto (the one `ray start` started here) or HOST:PORT; default: start Ray locally")
    p.add_argument("--gpus-per-job", type=float, default=1.0,
                   help="GPUs each capture reserves (default 1; 0.5 runs two per GPU; ignored where there is no GPU)")
    p.add_argument("--retry-failed", action="store_true", help="run failed captures again even if their files are unchanged")
    p.set_defaults(run=_run_batch)


def _run_batch(args: argparse.Namespace) -> int:
    from pathlib import Path  # noqa: PLC0415

    from .batch import run_batch  # noqa: PLC0415
    from .config import apply_overrides, parse_overrides, preset  # noqa: PLC0415

    config = apply_overrides(preset(args.preset), parse_overrides(args.overrides))
    return run_batch(Path(args.captures), Path(args.output), config, address=args.address,
                     gpus_per_job=args.gpus_per_job, retry_failed=args.retry_failed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Photos of an object -> textured 3D model.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_reconstruct(subparsers)
    _add_eval(subparsers)
    _add_weights(subparsers)
    _add_batch(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
