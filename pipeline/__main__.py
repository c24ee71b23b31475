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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Photos of an object -> textured 3D model.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_weights(subparsers)
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
