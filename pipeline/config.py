"""One config dataclass per stage; every field carries its default, range and one-line help.

The UI builds its sliders from `describe()` and the CLI's ``--set`` parses through `apply_overrides`,
so numbers live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import PipelineError


def param(default: Any, help: str, lo: Any = None, hi: Any = None, step: Any = None,
          choices: Optional[Sequence[Any]] = None) -> Any:
    """A dataclass field with UI/CLI metadata: numeric range [lo, hi] (and step) or a list of choices."""
    return field(default=default, metadata={"help": help, "range": (lo, hi), "step": step, "choices": choices})


@dataclass
class IngestConfig:
    max_image_side: int = param(512, "Photos larger than this (pixels, longer side) are downscaled", 64, 4096, 32)
    holdout_every: int = param(0, "Keep every n-th view out of fitting to measure held-out quality (0 = use all)", 0, 20, 1)


@dataclass
class CamerasConfig:
    source: str = param("auto", "Cameras: from the camera file, else estimated (auto); from the camera file only "
                        "(file); always by structure from motion (estimate); or a turntable at equal steps (turntable)",
                        choices=("auto", "file", "estimate", "turntable"))
    masks: str = param("auto", "Masks for photos without: the learned segmenter when installed, else from where the "
                       "cameras look (works on cluttered backgrounds); classical = by the colours along the frame",
                       choices=("auto", "classical", "segmenter"))
    exclude_bad_masks: bool = param(True, "Leave out photos whose estimated mask looks wrong")
    turntable_elevation_deg: float = param(15.0, "Turntable: camera height above the object's middle (degrees)", -89.0, 89.0, 1.0)
    fov_deg: float = param(50.0, "Turntable: field of view along the longer side when the photos carry no EXIF focal length", 10.0, 120.0, 1.0)


@dataclass
class HullConfig:
    grid_resolution: int = param(128, "Voxels per side of the visual-hull grid", 32, 384, 16)
    bad_view_tolerance: int = param(0, "A voxel survives if it is outside the mask in at most this many views (raise for bad masks)", 0, 8, 1)
    mask_dilation_px: int = param(1, "Grow each mask by this many pixels before carving, so parts thinner than a "
                                  "voxel survive (the refinement carves the excess back)", 0, 8, 1)


@dataclass
class RefineConfig:
    iterations: int = param(800, "Optimisation steps (first half geometry, second half geometry and texture)", 0, 10000, 50)
    geometry_lr: float = param(1e-2, "Learning rate of the surface (scene units per step; of its smooth "
                               "parametrisation when the smoothing lambda is above 0)",
                               0.0, 0.2, 1e-3)
    texture_lr: float = param(3e-2, "Learning rate of the texture atlas", 0.0, 0.2, 1e-3)
    smoothness: float = param(2.0, "Weight of the Laplacian smoothness prior on the surface", 0.0, 200.0, 0.5)
    smoothing_lambda: float = param(5.0, "How smooth each geometry step is (lambda of the Large Steps "
                                    "parametrisation (I + lambda L); 0 = raw vertex steps)", 0.0, 200.0, 1.0)
    geometry_optimizer: str = param("adam", "Steps of the smooth parametrisation: Adam per coordinate (adam) or "
                                    "one step size for the whole surface (uniform, Large Steps' AdamUniform)",
                                    choices=("adam", "uniform"))
    normal_weight: float = param(0.1, "Weight of the normal-consistency prior (neighbouring faces agree; "
                                 "against folds and creases)", 0.0, 10.0, 0.01)
    normal_free_angle: float = param(0.0, "Normal prior: neighbouring faces bent less than this are left free "
                                     "(degrees; 0 = every bend counts)", 0.0, 85.0, 5.0)
    inside_out_weight: float = param(1.0, "Weight of the push that keeps the surface from passing through "
                                     "itself (where a view would see its inside: thin walls, dark gaps)",
                                     0.0, 20.0, 0.5)
    remeshes: int = param(2, "Times the surface is remeshed to even triangles, the first before step 0, the "
                          "others spread over the first half of the geometry pass, each finer, the last at 'Mesh faces' "
                          "(0 = keep the hull's triangles)", 0, 7, 1)
    remesh_iterations: int = param(3, "Split/collapse/flip/smooth rounds per remesh", 1, 20, 1)
    texture_smoothness: float = param(0.02, "Weight of the smoothness prior on the texture", 0.0, 1.0, 0.005)
    mask_weight: float = param(1.0, "Weight of the silhouette (mask) loss", 0.0, 10.0, 0.1)
    render_resolution: int = param(512, "Longer side of the renders compared with the photos (pixels; at most the photos')", 64, 2048, 32)
    views_per_step: int = param(24, "Photos compared per optimisation step", 1, 32, 1)
    texture_size: int = param(2048, "Texture atlas size (pixels per side)", 128, 4096, 128)
    mesh_faces: int = param(80000, "Triangles of the mesh being optimised", 2000, 400000, 1000)
    pose_refinement: str = param("auto", "Correct each photo's camera a little while fitting: auto = only when the "
                                 "cameras were estimated (structure from motion or turntable), not for a camera file",
                                 choices=("auto", "on", "off"))
    pose_lr: float = param(1e-3, "Learning rate of the camera corrections (radians, scene units)", 0.0, 1e-2, 1e-4)
    preview_every_s: float = param(1.0, "Seconds between live preview renders", 0.2, 10.0, 0.1)
    seed: int = param(0, "Random seed (view order, background colours)", 0, 2**31 - 1, 1)
    topology_steps: int = param(0, "Steps of the first pass whose surface can change topology (an SDF on a grid, "
                                "from the visual hull; 0 = start from the hull mesh)", 0, 5000, 50)
    topology_grid_resolution: int = param(64, "Cells per side of the topology pass's SDF grid", 16, 160, 8)
    topology_lr: float = param(0.3, "Topology pass: how far the surface may move per step (grid cells)", 0.0, 2.0, 0.05)
    topology_render_resolution: int = param(128, "Topology pass: longer side of the renders (pixels)", 32, 1024, 16)
    topology_views_per_step: int = param(4, "Topology pass: photos compared per step", 1, 32, 1)
    topology_color_resolution: int = param(32, "Topology pass: cells per side of the colour volume", 4, 128, 4)
    topology_mask_weight: float = param(1.0, "Topology pass: weight of the silhouette loss", 0.0, 10.0, 0.1)
    topology_consistency_weight: float = param(1.0, "Topology pass: weight of the cross-view photo consistency "
                                               "(pulls the surface into concavities)", 0.0, 10.0, 0.1)
    topology_free_space_weight: float = param(1.0, "Topology pass: weight of the free-space term (grid points "
                                              "on background in some photo are pushed outside)", 0.0, 10.0, 0.1)
    topology_sdf_weight: float = param(0.2, "Topology pass: weight of the SDF sign-change regulariser "
                                       "(decays over the first quarter)", 0.0, 2.0, 0.01)


@dataclass
class ExportConfig:
    target_faces: int = param(80000, "Triangles in the exported model", 1000, 400000, 1000)
    unlit: bool = param(False, "Write the texture as unlit (shows the photo colours as captured)")


@dataclass
class ReconstructionConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    cameras: CamerasConfig = field(default_factory=CamerasConfig)
    hull: HullConfig = field(default_factory=HullConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


STAGES = ("ingest", "cameras", "hull", "refine", "export")

PRESETS: Dict[str, Dict[str, Any]] = {
    "fast": {
        "ingest.max_image_side": 256, "hull.grid_resolution": 96, "refine.iterations": 200,
        "refine.render_resolution": 128, "refine.views_per_step": 4, "refine.texture_size": 1024,
        "refine.mesh_faces": 10000, "refine.remeshes": 0,  # remeshing costs more than it gives at 10k faces on a CPU
        "hull.mask_dilation_px": 0,  # grown masks cost this preset 0.35 dB on the CPU (docs/BENCHMARKS.md, session 9)
        "export.target_faces": 10000,
    },
    "balanced": {},
    "high": {
        "ingest.max_image_side": 1024, "hull.grid_resolution": 192, "refine.iterations": 3000,
        "refine.render_resolution": 1024, "refine.views_per_step": 8, "refine.texture_size": 4096,
        "refine.mesh_faces": 150000, "export.target_faces": 150000,
    },
}


@dataclass(frozen=True)
class FieldSpec:
    """What a UI control or a CLI flag needs to know about one config field."""

    key: str  # "stage.name"
    type: type
    default: Any
    range: Tuple[Any, Any]
    step: Any
    choices: Optional[Sequence[Any]]
    help: str


def describe(config: Optional[ReconstructionConfig] = None) -> List[FieldSpec]:
    """Every tunable field, in stage order; ``default`` is taken from ``config`` when given."""
    config = config or ReconstructionConfig()
    specs = []
    for stage in STAGES:
        section = getattr(config, stage)
        for f in dataclasses.fields(section):
            specs.append(FieldSpec(
                key=f"{stage}.{f.name}", type=type(f.default), default=getattr(section, f.name),
                range=f.metadata["range"], step=f.metadata["step"], choices=f.metadata["choices"],
                help=f.metadata["help"],
            ))
    return specs


def parse_overrides(pairs: Sequence[str]) -> Dict[str, str]:
    """``["refine.iterations=300", ...]`` (the command line's ``--set``) -> {key: value}; values stay
    strings for `apply_overrides` to check."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise PipelineError(f"--set needs KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def preset(name: str) -> ReconstructionConfig:
    """A fresh config with the named preset applied (fast / balanced / high)."""
    if name not in PRESETS:
        raise PipelineError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return apply_overrides(ReconstructionConfig(), PRESETS[name])


def apply_overrides(config: ReconstructionConfig, overrides: Dict[str, Any]) -> ReconstructionConfig:
    """Set fields by key ("refine.iterations", or a bare "iterations" when unambiguous), checking
    types and ranges. Values may be strings (from the command line). Returns ``config``, modified."""
    specs = {s.key: s for s in describe(config)}
    for raw_key, raw_value in overrides.items():
        key = _resolve_key(raw_key, specs)
        spec = specs[key]
        value = _coerce(raw_key, raw_value, spec)
        stage, name = key.split(".")
        setattr(getattr(config, stage), name, value)
    return config


def _resolve_key(key: str, specs: Dict[str, FieldSpec]) -> str:
    if key in specs:
        return key
    matches = [k for k in specs if k.split(".")[1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise PipelineError(f"setting {key!r} is ambiguous; write one of {', '.join(matches)}")
    raise PipelineError(f"unknown setting {key!r}; known settings: {', '.join(specs)}")


def _coerce(key: str, value: Any, spec: FieldSpec) -> Any:
    try:
        if spec.type is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = value.lower() in ("1", "true", "yes", "on")
            value = bool(value)
        elif spec.type is int:
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError(value)
            value = int(as_float)
        else:
            value = spec.type(value)
    except (TypeError, ValueError):
        raise PipelineError(f"setting {key!r} needs a {spec.type.__name__}, got {value!r}") from None
    lo, hi = spec.range
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise PipelineError(f"setting {key!r} = {value} is outside its range [{lo}, {hi}]")
    if spec.choices is not None and value not in spec.choices:
        raise PipelineError(f"setting {key!r} must be one of {list(spec.choices)}, got {value!r}")
    return value
