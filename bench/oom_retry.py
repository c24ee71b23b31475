"""Device check: a real CUDA out-of-memory in the refinement is retried once at half the render
resolution, GPU memory is handed back, and the process goes on serving. Prints one JSON document
and writes it under bench/results/.

During the refinement only, the GPU is capped with `torch.cuda.set_per_process_memory_fraction`
(the visual hull of 90 views at 400 px needs more than the refinement, so a cap on the whole job
stops there), so that the first job (--views views per step at the photos' 400 px) cannot fit
while half the resolution can; a second job then runs with default settings in the same process,
as the app's next user would.

    python bench/oom_retry.py --data ../shared/data [--cap-gb 0.6] [--views 32]

lego is NeRF-synthetic (CC BY-NC: non-commercial); nvdiffrast is non-commercial too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import events  # noqa: E402
from pipeline.config import apply_overrides, preset  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.importers import load_capture  # noqa: E402
from pipeline import reconstruct as pipeline_reconstruct  # noqa: E402
from pipeline.reconstruct import reconstruct  # noqa: E402


def cap_refinement(cap_bytes: int) -> None:
    """Wrap the pipeline's refine so that it runs under ``cap_bytes`` of GPU memory."""
    real_refine = pipeline_reconstruct.refine
    total = torch.cuda.get_device_properties(0).total_memory

    def capped(*args, **kwargs):
        torch.cuda.set_per_process_memory_fraction(cap_bytes / total)
        try:
            return (yield from real_refine(*args, **kwargs))
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)

    pipeline_reconstruct.refine = capped


def job(capture, overrides: dict) -> dict:
    config = apply_overrides(preset("balanced"), overrides)
    notices, outcome, started = [], "no result", time.monotonic()
    with tempfile.TemporaryDirectory() as out:
        try:
            for event in reconstruct(capture, config, Path(out), device="cuda"):
                if isinstance(event, events.Warning):
                    notices.append(event.message)
                elif isinstance(event, events.Result):
                    outcome = f"GLB written, train PSNR {event.metrics['train_psnr']:.2f} dB"
        except PipelineError as error:
            outcome = f"PipelineError: {error}"
    torch.cuda.synchronize()
    return {"settings": overrides, "outcome": outcome, "notices": notices,
            "seconds": round(time.monotonic() - started, 1),
            "allocated_after_mb": round(torch.cuda.memory_allocated() / 2**20, 1),
            "reserved_after_mb": round(torch.cuda.memory_reserved() / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--cap-gb", type=float, default=0.6, help="GPU memory the refinement may use")
    parser.add_argument("--views", type=int, default=32, choices=range(1, 33), metavar="1..32",
                        help="views per step of the job that must not fit (refine.views_per_step's range)")
    args = parser.parse_args()

    cap_refinement(int(args.cap_gb * 2**30))
    capture = load_capture(args.data / "lego", max_side=400)
    report = {
        "gpu": torch.cuda.get_device_name(0), "commit": os.environ.get("BENCH_COMMIT", "unknown"),
        "cap_gb": args.cap_gb, "views": len(capture.names),
        "too_big": job(capture, {"refine.render_resolution": 400, "refine.views_per_step": args.views}),
        "next_job": job(capture, {}),
    }
    print(json.dumps(report, indent=2))
    out = REPO / "bench" / "results" / f"oom_retry_{time.strftime('%Y-%m-%d')}_{report['commit']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
