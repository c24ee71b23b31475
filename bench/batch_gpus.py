"""Throughput of the batch runner on 1, 2, 4... GPUs of this machine. Prints one JSON document and
writes it under bench/results/ (named with the date, GPU and commit).

For each GPU count N it runs the real command, `python -m pipeline batch CAPTURES -o OUT`, with
``CUDA_VISIBLE_DEVICES`` set to the first N visible GPUs (Ray started locally, one task per capture with
``--gpus-per-job`` GPUs), then reads the manifest: captures per minute over the tasks' span (first
start to last finish, so Ray's own start-up is left out; the command's wall time is reported
beside it), the mean seconds inside a task, and how many captures each GPU ran. Efficiency at N is
throughput(N) / (N x throughput(1)); >= 0.9 is the target.

Without ``--captures`` it makes ``--copies`` copies of the bundled assets/lego_24 (24 views at
128 px, CC BY-NC) in a temporary folder, 4 per GPU by default, so it needs nothing but the checkout.

    python bench/batch_gpus.py [--captures DIR | --copies N] [--preset balanced] [--set KEY=VALUE ...]
                               [--gpus 1,2,4] [--gpus-per-job 1] [--results DIR] [--dry-run]

``--gpus 0`` runs CPU tasks (a check that works anywhere); ``--dry-run`` prints the plan only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.batch import MANIFEST_NAME, read_manifest  # noqa: E402

BUNDLED = REPO / "assets" / "lego_24"


def gpu_counts(requested: str, available: int) -> List[int]:
    """The GPU counts to measure: ``requested`` ("1,2,4"), or 1, 2, 4, 8... up to ``available`` and
    ``available`` itself. Counts above ``available`` are dropped."""
    if requested:
        return [n for n in (int(x) for x in requested.split(",")) if n <= available]
    counts = [n for n in (1, 2, 4, 8, 16) if n <= available]
    return counts + ([available] if available and available not in counts else [])


def visible_gpus() -> List[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (all when it is unset)."""
    import torch  # noqa: PLC0415

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [x for x in listed.split(",") if x.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def make_copies(folder: Path, copies: int) -> Path:
    """``copies`` copies of the bundled capture, named lego_000, lego_001, ..."""
    for i in range(copies):
        shutil.copytree(BUNDLED, folder / f"lego_{i:03d}", ignore=shutil.ignore_patterns("README.md"))
    return folder


def summarise(rows: Dict[str, dict], wall_s: float, gpus: int) -> dict:
    """Throughput and where the captures ran, from a manifest's rows (see pipeline/batch.py)."""
    ok = [row for row in rows.values() if row["status"] == "ok"]
    timed = [row for row in rows.values() if row.get("started") and row.get("finished")]
    span = max(r["finished"] for r in timed) - min(r["started"] for r in timed) if timed else 0.0
    return {
        "gpus": gpus,
        "captures": len(rows),
        "ok": len(ok),
        "failed": {row["capture"]: row["error"] for row in rows.values() if row["status"] != "ok"},
        "span_s": round(span, 2),
        "wall_s": round(wall_s, 2),
        "captures_per_min": round(60 * len(ok) / span, 3) if span > 0 else None,
        "task_seconds_mean": round(sum(r["seconds"] for r in ok) / len(ok), 2) if ok else None,
        "per_gpu": dict(Counter(f"{r['host']}:{r['gpu'] or 'cpu'}" for r in ok)),
        "train_psnr_mean": round(sum(r["metrics"].get("train_psnr", 0.0) for r in ok) / len(ok), 3) if ok else None,
    }


def run_batch(captures: Path, out: Path, gpus: int, args, label: str = "") -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(visible_gpus()[:gpus]), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "pipeline", "batch", str(captures), "-o", str(out), "--preset", args.preset,
               "--gpus-per-job", str(args.gpus_per_job)] + [x for kv in args.overrides for x in ("--set", kv)]
    start = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    result = summarise(read_manifest(out / MANIFEST_NAME), wall, gpus)
    result["exit_code"] = proc.returncode
    if proc.returncode not in (0, 1):  # 1: some captures failed (listed); anything else: the command did
        result["stderr_tail"] = proc.stderr.strip().splitlines()[-5:]
    print(f"{label or f'{gpus} GPU(s)'}: {result['ok']}/{result['captures']} ok, {result['captures_per_min']} captures/min "
          f"over {result['span_s']} s ({result['wall_s']} s wall)", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captures", type=Path, help="folder of captures (default: copies of assets/lego_24)")
    parser.add_argument("--copies", type=int, default=0, help="copies of the bundled capture (default: 4 per GPU)")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpus", default="", help="GPU counts to measure, e.g. 1,2,4 (default: 1, 2, 4... up to all)")
    parser.add_argument("--gpus-per-job", type=float, default=1.0)
    parser.add_argument("--work", type=Path, help="where the copies and outputs go (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--dry-run", action="store_true", help="print the plan as JSON and stop")
    args = parser.parse_args()

    import torch  # noqa: PLC0415 (counting GPUs goes through NVML: CUDA stays uninitialised here)

    available = torch.cuda.device_count()
    counts = [0] if args.gpus == "0" else gpu_counts(args.gpus, available)
    if not counts:
        print(json.dumps({"error": f"no GPU count to measure: {available} GPU(s) visible, asked for {args.gpus!r}"}))
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="batch_gpus_"))
    copies = args.copies or 4 * max(max(counts), 1)
    report = {"bench": "batch_gpus", "gpu": torch.cuda.get_device_name(0) if available else "cpu",
              "gpus_visible": available, "gpu_counts": counts, "commit": _git_commit(),
              "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "overrides": args.overrides,
              "gpus_per_job": args.gpus_per_job,
              "captures": str(args.captures) if args.captures else f"{copies} copies of assets/lego_24"}
    if args.dry_run:
        print(json.dumps(report, indent=2))
        return 0
    import ray  # noqa: PLC0415 (only the version, for the report)

    report["ray"] = ray.__version__
    captures = args.captures or make_copies(work / "captures", copies)
    # One capture first, untimed: what the first process on a machine pays once (e.g. building or
    # loading nvdiffrast's kernels into their cache) stays out of the 1-GPU figure.
    report["warmup"] = run_batch(make_copies(work / "warmup", 1), work / "out_warmup", min(counts[0], 1), args,
                                 label="warm-up")
    report["runs"] = [run_batch(captures, work / f"out_{n}gpu", n, args) for n in counts]
    one = next((r for r in report["runs"] if r["gpus"] == 1 and r["captures_per_min"]), None)
    for run in report["runs"]:
        if one and run["captures_per_min"] and run["gpus"] > 0:
            run["efficiency_vs_1gpu"] = round(run["captures_per_min"] / (run["gpus"] * one["captures_per_min"]), 3)
    text = json.dumps(report, indent=2)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    gpu = report["gpu"].replace(" ", "-")
    (args.results / f"batch_gpus_{report['date']}_{gpu}_{report['commit']}.json").write_text(text + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["exit_code"] == 0 for r in report["runs"]) else 1


def _git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # the device machine gets a copy of the tree without .git
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
