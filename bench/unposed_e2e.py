"""End to end from unposed, unmasked lego photos to a GLB on the CPU (fast preset); prints JSON.

    .venv/bin/python bench/unposed_e2e.py [--data ../shared/data/lego] [--views 50] [--out /tmp/unposed]

The lego views are composited on white with their poses and alpha dropped; masks come from the
classical masker, cameras from structure from motion (cameras.source = "auto"). Every 8th view is held
out; its mask IoU is measured against the *estimated* mask of that view (the pipeline no longer has the
alpha), so it measures the model's consistency with views it did not fit, not the masker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import events  # noqa: E402
from pipeline.capture import Capture  # noqa: E402
from pipeline.config import apply_overrides, preset  # noqa: E402
from pipeline.importers import load_capture  # noqa: E402
from pipeline.reconstruct import reconstruct  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "lego"))
    ap.add_argument("--views", type=int, default=50)
    ap.add_argument("--out", default="/tmp/photo3d_unposed")
    args = ap.parse_args()
    full = load_capture(args.data)
    order = np.argsort([int(n.split("_")[-1].split(".")[0]) for n in full.names])
    sub = full.subset(order[:: max(1, len(order) // args.views)][: args.views])
    unposed = Capture(images=sub.images, masks=None, cameras=None, names=sub.names, source=sub.source)
    config = apply_overrides(preset("fast"), {"ingest.holdout_every": 8})
    config.cameras.source = "auto"
    start = time.monotonic()
    log = []
    result = None
    for event in reconstruct(unposed, config, args.out, device="cpu"):
        if isinstance(event, events.Result):
            result = event
        elif isinstance(event, (events.Warning, events.Metrics, events.StageFinished)):
            log.append(repr(event))
            print(repr(event)[:300], file=sys.stderr, flush=True)
    print(json.dumps({"views": args.views, "seconds": round(time.monotonic() - start, 1),
                      "glb": result.glb_path if result else None,
                      "metrics": result.metrics if result else None,
                      "heldout": result.heldout if result else None}, default=float))


if __name__ == "__main__":
    main()
