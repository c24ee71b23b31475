"""What could any texture reach on the reconstructed geometry? lego's held-out error split into the
part the geometry causes and the part the appearance model (one diffuse texture for all views)
causes. Prints one JSON line per variant and writes picture strips.

For each variant (settings as for `python -m pipeline reconstruct --set`), lego at the bench's
split (90 views fitted, every 10th held out) is reconstructed, and its exported GLB is scored on
the held-out views (``heldout_psnr``). Then, on the same geometry and UV layout, each held-out view
gets its own texture, fitted to that view's photo alone (``--steps`` Adam steps on the squared error,
from the GLB's texture): an oracle no diffuse texture shared by all views can beat, which also
absorbs view-dependent light (highlights). ``oracle_psnr`` far above ``heldout_psnr`` means the
appearance model (shared diffuse colour, highlights) holds the result back; ``oracle_psnr`` near
it means the geometry does (a texture cannot fix parallax or a silhouette). Both are split by
`evaluate.error_breakdown`.

    python bench/appearance_ceiling.py --data ../shared/data --variant defaults: \\
        --variant folded:refine.smoothing_lambda=0,refine.normal_weight=0 [--steps 300] [--images DIR]

lego (NeRF-synthetic) is CC BY-NC: non-commercial; so are the strips written from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_e2e import _git_commit, host_identity, run_pipeline, warm_up  # noqa: E402
from bench.sweep import parse_variant  # noqa: E402
from pipeline.config import apply_overrides, preset  # noqa: E402
from pipeline.evaluate import (_view_matrices, error_breakdown, on_white, render_shaded_views,  # noqa: E402
                               render_views, score_views)
from pipeline.export import load_glb_in_world  # noqa: E402
from pipeline.importers import load_capture  # noqa: E402
from pipeline.mesh import render_textured  # noqa: E402
from pipeline.reconstruct import split_holdout  # noqa: E402
from pipeline.render import Rasterizer  # noqa: E402


def oracle_textures(mesh, cameras, images, masks, rasterizer, steps: int, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """Each view rendered with a texture fitted to that view alone: rgb [N, H, W, 3], alpha [N, H, W]."""
    device = rasterizer.device
    resolution = images.shape[1:3]
    mats = _view_matrices(mesh.vertices, cameras, resolution, device)
    v = torch.from_numpy(mesh.vertices).float().to(device)
    f = torch.from_numpy(mesh.faces).int().to(device)
    uv = torch.from_numpy(mesh.uvs).float().to(device)
    fuv = torch.from_numpy(mesh.faces_uv).int().to(device)
    start = torch.from_numpy(mesh.texture).float().to(device)[None]
    photos = torch.from_numpy(on_white(images, masks)).float().to(device)
    white = torch.ones(1, 1, 1, 3, device=device)
    rgbs, alphas = [], []
    for i in range(len(cameras)):
        texture = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([texture], lr=lr, betas=(0.9, 0.99))
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.1 ** (step / steps)
            rgb, _ = render_textured(rasterizer, v, f, uv, fuv, texture, mats[i:i + 1], resolution, white)
            loss = (rgb - photos[i:i + 1]).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                texture.clamp_(0.0, 1.0)
        with torch.no_grad():
            rgb, alpha = render_textured(rasterizer, v, f, uv, fuv, texture, mats[i:i + 1], resolution, white)
        rgbs.append(rgb.clamp(0, 1)[0].cpu().numpy())
        alphas.append(alpha[0, ..., 0].cpu().numpy())
    return np.stack(rgbs), np.stack(alphas)


def heat(rendered: np.ndarray, photos: np.ndarray, covered: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Squared error as grey (darker = larger, x5), silhouette disagreement red: [N, H, W, 3]."""
    error = 1.0 - np.clip(((rendered - photos) ** 2).mean(-1) * 5.0, 0.0, 1.0)
    out = np.repeat(error[..., None], 3, axis=-1)
    out[(covered > 0.5) ^ (masks > 0.5)] = (1.0, 0.0, 0.0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--images", type=Path, help="write photo | render | oracle | error | oracle error | shaded strips here")
    parser.add_argument("--views", default="0,4", help="held-out views to write strips of")
    parser.add_argument("--out", type=Path, default=Path("/tmp/appearance_ceiling"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    warm_up()
    rasterizer = Rasterizer(backend="nvdiffrast", device="cuda")
    host, commit = host_identity(), _git_commit()
    for text in args.variant:
        name, overrides = parse_variant(text)
        config = apply_overrides(preset("balanced"), overrides)
        capture = load_capture(args.data / "lego", max_side=config.ingest.max_image_side)
        fit, held = split_holdout(capture, 10)
        result, _ = run_pipeline(fit, config, args.out / name)
        mesh = load_glb_in_world(result.glb_path)
        rendered, alpha = render_views(mesh, held.cameras, held.images.shape[1:3], rasterizer)
        means, _ = score_views(rendered, alpha, held.images, held.masks, held.names)
        start = time.perf_counter()
        oracle, oracle_alpha = oracle_textures(mesh, held.cameras, held.images, held.masks, rasterizer,
                                               args.steps, args.lr)
        oracle_seconds = time.perf_counter() - start
        oracle_means, _ = score_views(oracle, oracle_alpha, held.images, held.masks, held.names)
        print(json.dumps({
            "variant": name, "overrides": overrides, "commit": commit, "host": host, "steps": args.steps,
            "heldout_psnr": means["psnr"], "oracle_psnr": oracle_means["psnr"], "oracle_seconds": oracle_seconds,
            "heldout_error": error_breakdown(rendered, alpha, held.images, held.masks),
            "oracle_error": error_breakdown(oracle, oracle_alpha, held.images, held.masks),
        }), flush=True)
        if args.images:
            args.images.mkdir(parents=True, exist_ok=True)
            photos = on_white(held.images, held.masks)
            shaded = render_shaded_views(mesh.vertices, mesh.faces, held.cameras, held.images.shape[1:3], rasterizer)
            strips = np.concatenate([photos, rendered, oracle, heat(rendered, photos, alpha, held.masks),
                                     heat(oracle, photos, oracle_alpha, held.masks), shaded], axis=2)
            for i in (int(v) for v in args.views.split(",")):
                Image.fromarray((strips[i] * 255).round().astype(np.uint8)).save(
                    args.images / f"lego_{name}_held{i}.jpg", quality=92)
    return 0


if __name__ == "__main__":
    sys.exit(main())
