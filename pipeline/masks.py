"""Object masks for photos that come without any: a learned segmenter when present, else a classical one.

Order of preference (the importers already handle the first two): an alpha channel; a user mask per
photo; the ``segmenter`` model of weights/manifest.json when both its file and the ``rembg`` package
are present (never downloaded here); otherwise, once the cameras are known, the geometric masker of
`pipeline.cosegment` (the cameras stage chooses, `pipeline.reconstruct.estimate_missing`); otherwise
`classical_masks`, which needs no weights but a plain background.

The classical masker assumes the photo's border shows background (the object is framed inside it). It
models the background colours from a band along the border and the object's from pixels that the
background explains badly, then alternates "label by likelihood ratio, smoothed" and "refit both colour
models from the labels" a few times (GrabCut's loop, with a Gaussian-smoothed likelihood ratio standing in
for the graph cut). Every mask is then cleaned (largest component, small holes filled) and scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from scipy import ndimage
from skimage import color

from .errors import PipelineError
from . import weights as weights_mod

SEGMENTER_MODEL = "segmenter"  # name in weights/manifest.json
FLAG_BELOW = 0.5  # views whose quality score is below this are flagged
BORDER = 0.04  # width of the band along the frame taken as background, as a fraction of the shorter side


@dataclass
class MaskEstimate:
    masks: np.ndarray  # [N, H, W] float32 in {0, 1}
    scores: np.ndarray  # [N] quality in [0, 1] (1 = looks like one well-framed object)
    flagged: np.ndarray  # [N] bool: the mask looks wrong (see `score_masks`)
    method: str  # "segmenter" or "classical"
    warnings: List[str] = field(default_factory=list)


def estimate_masks(images: np.ndarray,  # [N, H, W, 3] float in [0, 1]
                   names: Optional[Sequence[str]] = None, method: str = "auto",
                   weights_dir: Optional[Path] = None) -> MaskEstimate:
    """Masks, quality scores and flags for photos without masks.

    ``method``: "auto" (the learned segmenter when installed with its model file, else classical),
    "segmenter" (refuse if it is not usable) or "classical".
    """
    if method not in ("auto", "segmenter", "classical"):
        raise PipelineError(f"mask method {method!r} is unknown: use 'auto', 'segmenter' or 'classical'")
    names = list(names) if names is not None else [f"view {i}" for i in range(len(images))]
    warnings: List[str] = []
    raw = None
    used = "classical"
    if method in ("auto", "segmenter"):
        model = _segmenter_file(weights_dir)
        if model is not None:
            raw, used = _rembg_masks(images, model), "segmenter"
        elif method == "segmenter":
            st = weights_mod.model_status(SEGMENTER_MODEL, weights_dir)
            raise PipelineError(f"the learned segmenter is not usable: {st.message}; it also needs the Python "
                                "packages rembg and onnxruntime. Use the classical masker (mask method "
                                "'classical') or install them.")
    if raw is None:
        raw = np.stack([_classical_one(img) for img in images])
    masks = np.stack([clean_mask(m) for m in raw]).astype(np.float32)
    scores, reasons = score_masks(masks, raw)
    flagged = scores < FLAG_BELOW
    for i in np.flatnonzero(flagged):
        warnings.append(f"mask of {names[i]} looks wrong ({reasons[i]}, quality {scores[i]:.2f}); "
                        "exclude this photo or give a mask for it in masks/")
    return MaskEstimate(masks=masks, scores=scores, flagged=flagged, method=used, warnings=warnings)


def classical_masks(images: np.ndarray) -> np.ndarray:  # [N, H, W, 3] -> [N, H, W] float32 in {0, 1}
    """Cleaned classical masks (no scoring): see the module docstring."""
    return np.stack([clean_mask(_classical_one(img)) for img in images]).astype(np.float32)


# ---------------------------------------------------------------------------------------- classical


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 10) -> np.ndarray:
    """[k', D] cluster centres of samples x [P, D] (k' <= k when there are fewer distinct samples)."""
    k = min(k, len(x))
    centres = x[rng.choice(len(x), size=k, replace=False)]
    for _ in range(iters):
        label = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(label, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, label, x)
        keep = counts > 0
        centres = sums[keep] / counts[keep, None]
        k = len(centres)
    return centres


class _ColourModel:
    """A diagonal Gaussian mixture in Lab fitted by k-means (enough to tell object from backdrop)."""

    # Lab variance floor: a flat white backdrop has ~zero variance, and JPEG noise / shading of a few
    # Lab units must not read as "object".
    VAR_FLOOR = 9.0

    def __init__(self, samples: np.ndarray, k: int, rng: np.random.Generator, max_samples: int = 4000):
        if len(samples) > max_samples:
            samples = samples[rng.choice(len(samples), size=max_samples, replace=False)]
        self.means = _kmeans(samples, k, rng)  # [K, 3]
        label = np.argmin(((samples[:, None, :] - self.means[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(label, minlength=len(self.means)).astype(np.float64)
        sq = np.zeros_like(self.means)
        np.add.at(sq, label, (samples - self.means[label]) ** 2)
        self.vars = np.maximum(sq / np.maximum(counts, 1)[:, None], self.VAR_FLOOR)  # [K, 3]
        self.log_w = np.log(np.maximum(counts / counts.sum(), 1e-6))  # [K]

    def log_likelihood(self, x: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:  # [P, 3] -> [P]
        if len(x) > chunk:  # bounded memory for large photos: [chunk, K, 3] at a time
            return np.concatenate([self.log_likelihood(x[i:i + chunk]) for i in range(0, len(x), chunk)])
        d = (x[:, None, :] - self.means[None]) ** 2 / self.vars[None]  # [P, K, 3]
        per = self.log_w[None] - 0.5 * d.sum(-1) - 0.5 * np.log(self.vars).sum(-1)[None]
        top = per.max(axis=1)
        return top + np.log(np.exp(per - top[:, None]).sum(axis=1))


def _border_band(h: int, w: int, width: int) -> np.ndarray:  # [H, W] bool
    band = np.zeros((h, w), dtype=bool)
    band[:width], band[-width:], band[:, :width], band[:, -width:] = True, True, True, True
    return band


def _classical_one(image: np.ndarray,  # [H, W, 3] in [0, 1]
                   border: float = BORDER, components: int = 6, rounds: int = 4, seed: int = 0) -> np.ndarray:
    """Raw (uncleaned) boolean mask [H, W] of one photo."""
    h, w, _ = image.shape
    rng = np.random.default_rng(seed)
    lab = color.rgb2lab(np.clip(image, 0, 1)).reshape(-1, 3)  # [H*W, 3]
    band = _border_band(h, w, max(2, int(round(border * min(h, w))))).reshape(-1)
    background = _ColourModel(lab[band], components, rng)
    bg_ll = background.log_likelihood(lab)
    # Seed the object: pixels the border colours explain badly (chi-square, 3 dof, ~99.9%), away from the band.
    seed_fg = (bg_ll < np.median(bg_ll[band]) - 8.0) & ~band
    if seed_fg.sum() < 20:
        return np.zeros((h, w), dtype=bool)  # nothing stands out from the backdrop
    label = seed_fg
    sigma = max(1.0, 0.008 * min(h, w))  # smoothing of the ratio: a stand-in for the graph cut's pairwise term
    for _ in range(rounds):
        obj = _ColourModel(lab[label], components, rng)
        if (~label).sum() > 20:
            # The backdrop model also learns from what is labelled background inside the frame (GrabCut's
            # refit), but keeps the border samples so that it cannot drift onto the object.
            bg_samples = np.concatenate([lab[band], lab[~label & ~band]])
            background = _ColourModel(bg_samples, components, rng)
        ratio = np.tanh((obj.log_likelihood(lab) - background.log_likelihood(lab)) / 2).reshape(h, w)
        smooth = ndimage.gaussian_filter(ratio, sigma)
        new = (smooth > 0).reshape(-1) & ~band
        if (new != label).mean() < 1e-3:
            label = new
            break
        label = new
    return label.reshape(h, w)


def clean_mask(mask: np.ndarray,  # [H, W] bool or float
               hole_fraction: float = 0.01) -> np.ndarray:  # [H, W] bool
    """Largest connected component, with holes smaller than ``hole_fraction`` of the image filled.

    Large holes are kept: they are more likely real (a mug's handle) than a masking error.
    """
    mask = np.asarray(mask) > 0.5
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.reshape(-1))[1:]
    largest = lab == (np.argmax(sizes) + 1)
    holes, n_holes = ndimage.label(ndimage.binary_fill_holes(largest) & ~largest)
    small = np.bincount(holes.reshape(-1), minlength=n_holes + 1) < hole_fraction * mask.size  # [n_holes + 1]
    small[0] = False  # label 0: the object and the outside
    return largest | small[holes]


def score_masks(masks: np.ndarray,  # [N, H, W] cleaned
                raw: np.ndarray,  # [N, H, W] before cleaning
                ) -> tuple[np.ndarray, List[str]]:  # scores [N] in [0, 1], reason per view
    """How plausible each mask is as "one whole object inside the frame".

    Penalised: a tiny or frame-filling object, an object touching the border (cut off, or a backdrop that
    was taken for the object), a raw mask scattered over many pieces (the cleaning threw much away), and
    an area far from the other views' median (the same object should not change size tenfold).
    """
    n, h, w = masks.shape
    clean = masks > 0.5
    area = clean.reshape(n, -1).mean(axis=1)  # [N]
    # Per side of the frame, the share of a band along it that is object (the band is wider than the
    # classical masker's forced-background one, so that its masks can touch it too); the worst side counts.
    b = max(2, int(round(BORDER * min(h, w)))) + 2
    touching = np.max(np.stack([clean[:, :b].mean((1, 2)), clean[:, -b:].mean((1, 2)),
                                clean[:, :, :b].mean((1, 2)), clean[:, :, -b:].mean((1, 2))]), axis=0)  # [N]
    raw_area = (raw > 0.5).reshape(n, -1).sum(axis=1)
    kept = np.where(raw_area > 0, (clean & (raw > 0.5)).reshape(n, -1).sum(axis=1) / np.maximum(raw_area, 1), 0.0)
    median = np.median(area[area > 0]) if np.any(area > 0) else 1.0
    ratio = np.where(area > 0, area / median, 0.0)
    factors = {
        "object too small": np.clip(area / 0.005, 0, 1),
        "object fills the frame": np.clip((0.9 - area) / 0.2, 0, 1),
        "object touches the border": np.clip(1 - touching / 0.15, 0, 1),
        "mask in scattered pieces": np.clip((kept - 0.5) / 0.4, 0, 1),
        "size unlike the other views": np.clip(1 - np.abs(np.log(np.maximum(ratio, 1e-6))) / np.log(4), 0, 1),
    }
    stack = np.stack(list(factors.values()))  # [F, N]
    scores = stack.prod(axis=0)
    worst = np.argmin(stack, axis=0)
    keys = list(factors)
    return scores.astype(np.float64), [keys[j] for j in worst]


# ------------------------------------------------------------------------------- learned segmenter


def segmenter_available(weights_dir: Optional[Path] = None) -> bool:
    """Whether the learned segmenter's model file and packages are installed (nothing is fetched)."""
    return _segmenter_file(weights_dir) is not None


def _segmenter_file(weights_dir: Optional[Path]) -> Optional[Path]:
    """The segmenter's model file when it and the rembg package are usable, else None (never fetched)."""
    try:
        spec = weights_mod._find(SEGMENTER_MODEL, weights_mod.load_manifest())
        st = weights_mod.model_status(SEGMENTER_MODEL, weights_dir)
    except PipelineError:
        return None
    packages = ("rembg", spec.package or "onnxruntime")
    if st.state not in ("available", "unverified") or not all(map(weights_mod._module_present, packages)):
        return None
    return weights_mod._root(weights_dir) / spec.files[0].path


def _rembg_masks(images: np.ndarray, model_file: Path) -> np.ndarray:  # [N, H, W] float32
    """rembg's IS-Net session on the local model file.

    rembg looks for ``$U2NET_HOME/<model>.onnx`` and downloads only when it is absent; pointing
    U2NET_HOME at the verified file's folder keeps it offline. (Untested here: rembg is not installed.)
    """
    import os

    os.environ["U2NET_HOME"] = str(model_file.parent)
    import rembg  # optional dependency, checked by _segmenter_file
    from PIL import Image

    session = rembg.new_session(model_file.stem)
    out = []
    for img in images:
        pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
        out.append(np.asarray(rembg.remove(pil, session=session, only_mask=True), dtype=np.float32) / 255.0)
    return np.stack(out)
