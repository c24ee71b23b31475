"""Cost of the Large Steps solves per optimisation step: converged, fixed-count, graphed. Prints one JSON document.

One step of the refinement solves M v = u (forward) and M g_u = g_v (backward), M = I + lambda L.
On a UV sphere of the default preset's triangle count, for ``--steps`` simulated steps (u moves by a
small smooth step, the vertex gradient is new noise each step, both as in the refinement):
- ``converged``: each solve to a relative residual of 1e-4, checked every 8 iterations (a host sync
  each check; the solve before 2026-12-02);
- ``fixed``: `SmoothParametrisation`'s fixed counts, warm-started from the last step's solution,
  no check, eager;
- ``graphed``: the same solves replayed from CUDA graphs, as `SmoothParametrisation` runs them on
  CUDA (``graph_vs_eager_max_diff``: the largest difference from ``fixed`` over the run's solutions).
Reported per variant: ms per step (forward + backward, wall clock over all steps, synchronised at
the ends only), mean iterations and the median relative residuals left; the ratios to
``converged`` are measured in the same run.

    python bench/smoothing_solve.py [--faces 80000 --lambda 5 --steps 200] [--out X.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.render_cpu import uv_sphere  # noqa: E402
from bench.render_parity import _git_commit  # noqa: E402
from pipeline.refine.surface import SmoothingSystem, SmoothParametrisation  # noqa: E402


def run(system: SmoothingSystem, vertices: torch.Tensor, steps: int, solve) -> dict:
    """``solve(b, x0, kind) -> x`` for kind "forward" / "backward"; the same random steps for every variant."""
    generator = torch.Generator(vertices.device).manual_seed(0)
    u = system.apply(vertices)
    x, gradient = vertices.clone(), None
    iterations, residuals, solutions = [], {"forward": [], "backward": []}, []
    sync = torch.cuda.synchronize if vertices.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        u = u + 1e-3 * system.apply(torch.randn(u.shape, device=u.device, generator=generator))
        x = solve(u, x, "forward")
        iterations.append(system.iterations)
        g = torch.randn(u.shape, device=u.device, generator=generator)
        gradient = solve(g, gradient, "backward")
        iterations.append(system.iterations)
        residuals["forward"].append(system.relative_residual(x, u).max())
        residuals["backward"].append(system.relative_residual(gradient, g).max())
        solutions += [x, gradient]
    sync()
    seconds = time.perf_counter() - start  # residuals included: the same extra kernels for every variant
    return {"ms_per_step": 1000 * seconds / steps, "mean_iterations_per_solve": float(np.mean(iterations)),
            **{f"median_{k}_residual": float(torch.stack(v).median()) for k, v in residuals.items()},
            "solutions": solutions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=80000)
    parser.add_argument("--lambda", dest="lambda_", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    vertices, faces = uv_sphere(args.faces)
    vertices, faces = vertices.to(args.device), faces.to(args.device)
    param = SmoothParametrisation(vertices, faces, args.lambda_)  # graphed on CUDA
    system = param.system  # what the graphs were recorded on (the "iterations" counter is not graphed)
    counts = param.iterations
    variants = {
        "converged": lambda b, x0, kind: system.solve(b, x0, tol=1e-4, max_iterations=48, check_every=8),
        "fixed": lambda b, x0, kind: system.solve(b, x0, tol=None, max_iterations=counts[kind]),
    }
    if vertices.is_cuda and param.use_graphs:  # recorded (a failed recording clears use_graphs)
        variants["graphed"] = lambda b, x0, kind: param.solve(kind, b, x0)
    for solve in variants.values():  # warm-up: kernels, allocator
        run(system, vertices, 10, solve)
    report = {"commit": _git_commit(), "device": torch.cuda.get_device_name() if vertices.is_cuda else "cpu",
              "faces": int(len(faces)), "vertices": int(len(vertices)), "lambda": args.lambda_, "steps": args.steps,
              "fixed_iterations": counts}
    solutions = {}
    for name, solve in variants.items():
        report[name] = run(system, vertices, args.steps, solve)
        solutions[name] = report[name].pop("solutions")
        if name != "converged":
            report[f"{name} / converged"] = report[name]["ms_per_step"] / report["converged"]["ms_per_step"]
    if "graphed" in variants:
        report["graph_vs_eager_max_diff"] = max(float((a - b).abs().max())
                                                for a, b in zip(solutions["graphed"], solutions["fixed"]))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
