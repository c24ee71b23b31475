"""Settings sweep on the GPU: several variants of the refinement, each on lego (held-out PSNR,
fold-overs, seconds) and optionally on spot / bob (Chamfer, F-score, normal consistency), all in
one process so the variants share the warm-up. Prints one JSON line per (variant, scene) as it goes
and writes them all under bench/results/.

    python bench/sweep.py --data ../shared/data --variant base: --variant nolargesteps:refine.smoothing_lambda=0 \\
        [--scenes lego,spot,bob] [--preset balanced] [--tag NAME]

A variant is NAME:KEY=VALUE,KEY=VALUE (settings as for `python -m pipeline reconstruct --set`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_e2e import _git_commit, bench_lego, bench_mesh, host_identity, warm_up  # noqa: E402
from pipeline.config import apply_overrides, preset  # noqa: E402

KEEP = ("e2e_seconds", "heldout_psnr", "heldout_error", "train_psnr", "mask_iou", "fold_over_pct", "crease_pct", "inside_out_pct",
        "peak_gpu_mem_gb",
        "chamfer_l1_pct_diag", "fscore_1pct", "normal_consistency", "loop_ms_per_iter", "stage_seconds",
        "setup_seconds", "remesh_seconds", "atlas_wait_seconds", "texture_setup_seconds")
MESHES = {"spot": "spot/spot.obj", "bob": "bob/bob_tri.obj"}


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    return name, dict(pair.split("=", 1) for pair in settings.split(",") if pair)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--scenes", default="lego")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sweep"))
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    warm_up()
    rows = []
    host = host_identity()  # in every row: rows of one file compare with each other, not with another run's
    for text in args.variant:
        name, overrides = parse_variant(text)
        config = apply_overrides(preset(args.preset), overrides)
        for scene in args.scenes.split(","):
            start = time.perf_counter()
            try:
                if scene == "lego":
                    figures = bench_lego(args.data, config, args.out / name, measure_raw=False)
                else:
                    figures = bench_mesh(args.data, scene, MESHES[scene], config, args.out / name)
                row = {"variant": name, "overrides": overrides, "scene": scene, "host": host,
                       **{k: figures[k] for k in KEEP if k in figures}}
            except Exception as exc:  # one failing variant must not lose the others' figures
                row = {"variant": name, "overrides": overrides, "scene": scene, "error": f"{type(exc).__name__}: {exc}",
                       "seconds": time.perf_counter() - start}
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.results.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    path = args.results / f"sweep_{time.strftime('%Y-%m-%d')}_{_git_commit()}{tag}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
