"""The app's device pool on this machine's GPUs: jobs at once, each on its own GPU. Prints one JSON
document and writes it under bench/results/ (named with the date, GPU and commit).

Runs the pipeline on the bundled assets/lego_24 through `ui.devices` exactly as the app's handler
does (`DevicePool.detect()`, which honours PHOTO3D_GPUS, and one `PipelineWorker` per job):

- ``isolated`` (2+ GPUs): one job handed the last GPU, in a process that has touched no other; the
  CUDA driver then reports a context of this process on that GPU alone (none on GPU 0: the job's
  thread is bound to its GPU);
- ``alone`` (after a short warm-up job on every GPU): one job, its seconds: the baseline;
- ``together``: ``--jobs`` jobs (default: one per GPU of the pool) started at once: the device each
  got, the current CUDA device inside each job's thread, each job's seconds and the wall time;
  ``speedup`` = jobs x alone / wall (the pool's size at best).

    [PHOTO3D_GPUS=N] python bench/app_gpus.py [--jobs K] [--preset balanced] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.batch_gpus import _git_commit  # noqa: E402
from pipeline.config import apply_overrides, parse_overrides, preset  # noqa: E402
from pipeline.events import Result  # noqa: E402
from pipeline.importers import load_capture  # noqa: E402
from pipeline.reconstruct import preload, reconstruct  # noqa: E402
from ui.devices import DevicePool, PipelineWorker  # noqa: E402

CAPTURE = REPO / "assets" / "lego_24"


def gpus_with_context() -> Optional[List[int]]:
    """The GPUs on which this process holds a CUDA (primary) context, from the driver API, which
    can ask without creating one (NVML's process list shows host PIDs inside a container). None
    when there is no CUDA driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    active = []
    for ordinal in range(count.value):
        device, flags, state = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        if (cuda.cuDeviceGet(ctypes.byref(device), ordinal) == 0
                and cuda.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(state)) == 0
                and state.value):
            active.append(ordinal)
    return active


def probed(capture, config, out_dir, device, name):
    """`reconstruct`, noting what the job's thread sees as its current CUDA device (and, at the end,
    which GPUs hold a context of this process)."""
    probe = {"device": device, "current_device": torch.cuda.current_device()}
    start = time.monotonic()
    for event in reconstruct(capture, config, out_dir, device=device, name=name):
        if isinstance(event, Result):
            probe.update(seconds=round(time.monotonic() - start, 2), gpus_with_context=gpus_with_context(),
                         train_psnr=round(event.metrics["train_psnr"], 3))
        yield event
    yield probe


def run_jobs(pool: DevicePool, jobs: int, capture, config, work: Path) -> dict:
    probes, errors = [], []

    def one(index: int) -> None:
        worker = PipelineWorker(probed, pool, capture, config, work / f"job{index}", name=f"job{index}").start()
        try:
            for batch in worker.batches(1.0):
                probes.extend(event for event in batch if isinstance(event, dict))
        except Exception as exc:  # reported in the JSON
            errors.append(f"{type(exc).__name__}: {exc}")

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"jobs": jobs, "wall_s": round(time.monotonic() - start, 2), "per_job": probes, "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=0, help="jobs started at once (default: one per GPU of the pool)")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    pool = DevicePool.detect()
    if not pool.on_gpu:
        print(json.dumps({"error": "no GPU in the pool (none visible, or PHOTO3D_GPUS=0)"}))
        return 1
    config = apply_overrides(preset(args.preset), parse_overrides(args.overrides))
    capture = load_capture(CAPTURE, max_side=config.ingest.max_image_side)
    work = Path(tempfile.mkdtemp(prefix="app_gpus_"))
    report = {"bench": "app_gpus", "gpus_visible": torch.cuda.device_count(),
              "PHOTO3D_GPUS": os.environ.get("PHOTO3D_GPUS"), "pool": pool.size, "commit": _git_commit(),
              "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "overrides": args.overrides}
    if pool.size >= 2:  # first, while this process has no CUDA context anywhere
        last = f"cuda:{pool.size - 1}"
        report["isolated"] = run_jobs(DevicePool([last]), 1, capture, config, work / "isolated")
    report["gpu"] = torch.cuda.get_device_name(0)  # only now: it may open a context on GPU 0
    preload()
    # CUDA, nvdiffrast and the kernels start once per GPU: warm every GPU up, out of the timings.
    warm = apply_overrides(preset(args.preset), {**parse_overrides(args.overrides), "refine.iterations": 50})
    report["warmup_s"] = run_jobs(pool, pool.size, capture, warm, work / "warmup")["wall_s"]
    report["alone"] = run_jobs(pool, 1, capture, config, work / "alone")
    jobs = args.jobs or pool.size
    report["together"] = run_jobs(pool, jobs, capture, config, work / "together")
    alone = report["alone"]["wall_s"]
    report["together"]["speedup"] = round(jobs * alone / report["together"]["wall_s"], 3)
    report["together"]["distinct_devices"] = len({p["device"] for p in report["together"]["per_job"]})
    text = json.dumps(report, indent=2)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    gpu = report["gpu"].replace(" ", "-")
    (args.results / f"app_gpus_{report['date']}_{gpu}_{report['commit']}.json").write_text(text + "\n")
    failed = [e for run in ("isolated", "alone", "together") for e in report.get(run, {}).get("errors", [])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
