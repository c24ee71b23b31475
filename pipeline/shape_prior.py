"""Learned shape priors for the coarse-shape stage: optional, used only when really installed.

A prior takes the capture and returns a rough closed mesh that later stages align and refine.
`available()` says whether it can run here and, if not, why; the coarse-shape stage asks it
before offering the prior, and the app lists it under "Models" (pipeline.weights).

`ReconViaGenPrior` wraps ReconViaGen (TRELLIS conditioned on VGGT, GAP-LAB-CUHK-SZ). Its code is
not on PyPI and its checkpoint is large, so neither ships with this project: the adapter is
enabled only when the `trellis` package imports and the checkpoint is in the weights folder.
`build` calls upstream the way its app.py does; it has not been run in this project's CI (no GPU,
and upstream is not installable from a package index).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from . import weights
from .capture import Capture
from .errors import PipelineError


@dataclass
class CoarseShape:
    """A rough mesh. ``frame`` names its coordinate frame (priors do not know the cameras)."""

    vertices: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int32
    frame: str


class ReconViaGenPrior:
    """ReconViaGen as a coarse-shape prior (needs a CUDA GPU, its `trellis` package, its checkpoint)."""

    name = "reconviagen"  # the model's name in weights/manifest.json
    package = "trellis"  # the module ReconViaGen's code installs

    def __init__(self, weights_dir: Optional[Path] = None, manifest: Optional[Path] = None, seed: int = 0):
        self.weights_dir = weights_dir
        self.manifest = manifest
        self.seed = seed
        self._pipeline = None

    def available(self) -> Tuple[bool, str]:
        """(True, what will be used) or (False, what is missing and how to get it)."""
        spec = next((s for s in weights.load_manifest(self.manifest) if s.name == self.name), None)
        if spec is None:
            return False, f"'{self.name}' is not listed in the weights manifest"
        if importlib.util.find_spec(self.package) is None:
            return False, f"Python package '{self.package}' is not installed: {spec.install}"
        st = weights.model_status(self.name, self.weights_dir, self.manifest)
        if st.state not in ("available", "unverified"):
            return False, f"checkpoint {st.state}: {st.message}"
        return True, f"ReconViaGen checkpoint {st.state} in {self._checkpoint_dir()}"

    def _checkpoint_dir(self) -> Path:
        spec = next(s for s in weights.load_manifest(self.manifest) if s.name == self.name)
        root = Path(self.weights_dir) if self.weights_dir is not None else weights.default_weights_dir()
        return root / spec.hf_dir

    def build(self, capture: Capture) -> CoarseShape:
        """Run the prior on the masked photos; the mesh is in ReconViaGen's own unit cube."""
        ok, reason = self.available()
        if not ok:
            raise PipelineError(f"the ReconViaGen shape prior is not installed: {reason}")
        if capture.masks is None:
            # Without masks ReconViaGen would fetch its own background remover from the Hub.
            raise PipelineError("the ReconViaGen shape prior needs object masks; compute masks first")
        from PIL import Image  # noqa: PLC0415

        pipe = self._load()
        rgba = np.concatenate([capture.images, capture.masks[..., None]], axis=-1)
        images = [pipe.preprocess_image(Image.fromarray((np.clip(v, 0, 1) * 255).astype(np.uint8), "RGBA")) for v in rgba]
        outputs, _, _ = pipe.run(image=images, seed=self.seed, formats=["mesh"], preprocess_image=False)
        mesh = outputs["mesh"][0]
        return CoarseShape(
            vertices=mesh.vertices.detach().cpu().numpy().astype(np.float32),
            faces=mesh.faces.detach().cpu().numpy().astype(np.int32),
            frame="reconviagen-unit-cube",  # [-0.5, 0.5]^3, not yet aligned to the capture's cameras
        )

    def _load(self):
        """The upstream pipeline on the GPU, set up as ReconViaGen's own app.py does (commit 857deca)."""
        if self._pipeline is None:
            try:
                from trellis.pipelines import TrellisVGGTTo3DPipeline  # noqa: PLC0415 (optional, CUDA)
            except ImportError as exc:
                raise PipelineError(
                    f"the installed 'trellis' package is not ReconViaGen's ({exc}); "
                    "install https://github.com/GAP-LAB-CUHK-SZ/ReconViaGen"
                ) from None
            import torch  # noqa: PLC0415

            pipe = TrellisVGGTTo3DPipeline.from_pretrained(str(self._checkpoint_dir()))
            pipe._device = torch.device("cuda")
            pipe.low_vram = False
            pipe.to(pipe._device)
            pipe.VGGT_model.to(pipe._device)  # not among pipe.models, so moved on its own
            self._pipeline = pipe
        return self._pipeline
