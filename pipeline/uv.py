"""UV atlas (xatlas). Kept free of torch so that a spawned worker process can import it quickly:
xatlas holds the GIL for seconds, so the pipeline unwraps in another process while it optimises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import xatlas

from .errors import PipelineError

_PACK_TRIES = 8
_FACES_PER_PIECE = 2500  # see _spatial_pieces
# The first packing only measures the charts' extent at a low density: packing time grows with the
# atlas's area, so this costs ~0.3 s where a first guess at the final size (0.8) cost ~2 s for 90k
# faces; secant steps then reach the texture size (see unwrap).
_FIRST_PACK_DENSITY = 0.25


def default_padding(texture_size: int) -> int:
    """Gutter in texels between charts: 2 at 256 px, 4 at 1024, 8 at 2048.

    Grows with the texture because each mip level halves it; with the gutter filled from the
    nearest chart (``bake_texture``) a few levels of mip-mapping stay free of seams.
    """
    return max(2, int(texture_size) // 256)


# ----------------------------------------------------------------------------------------- unwrap
def unwrap(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    texture_size: int = 1024,
    padding: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:  # vmapping [V'], faces [F, 3], uvs [V', 2]
    """UV atlas with xatlas for a ``texture_size`` x ``texture_size`` texture.

    Returns ``vmapping`` (new vertex -> input vertex; vertices are split along chart seams, so
    new vertices = ``vertices[vmapping]``), the faces re-indexed into the new vertices (same order
    as the input faces) and per-vertex ``uvs`` in [0, 1] (glTF convention, see module docstring).

    Charts are at least ``padding`` texels apart (default ``default_padding``), with xatlas's
    bilinear margin, so bilinear and the first mip levels never mix two charts. The charts are
    packed in whole texels of the final texture (re-packed at a corrected density when xatlas's
    atlas does not fit it), so the padding is exact. The mesh is unwrapped in spatial pieces
    (`_spatial_pieces`), whose borders are chart seams. Cost on two CPU cores: ~4 s for 40k faces,
    ~7 s for 90k (as one piece with a first packing at the final size: 14 s and 20 s).
    """
    vertices = np.ascontiguousarray(vertices, dtype=np.float32)
    faces = np.ascontiguousarray(faces, dtype=np.uint32)
    size = int(texture_size)
    padding = default_padding(size) if padding is None else int(padding)
    area = _surface_area(vertices, faces)
    if not area > 0:
        raise PipelineError("cannot unwrap a mesh with no surface area (all faces degenerate)")

    # Charts and a first, small packing at a low density (_FIRST_PACK_DENSITY). The atlas is
    # sized to fit the charts, so it is too small for the texture; the same charts are then
    # re-packed (the chart computation is not redone) at a corrected density. The packer is not
    # monotonic in the density, hence a few tries, keeping the largest layout that fits. The
    # padding makes the extent affine, not proportional, in the density: secant steps after the
    # first correction (3 packings in all for 40k-90k faces).
    texels_per_unit = _FIRST_PACK_DENSITY * size / np.sqrt(area)
    atlas = xatlas.Atlas()
    pieces = _spatial_pieces(vertices, faces)
    used_by_piece = []
    for piece in pieces:
        used, local = np.unique(faces[piece], return_inverse=True)
        used_by_piece.append(used)
        atlas.add_mesh(vertices[used], local.reshape(-1, 3).astype(np.uint32))
    atlas.generate(xatlas.ChartOptions(), _pack_options(texels_per_unit, padding))
    vmapping, new_faces, uvs = _merge_pieces(atlas, pieces, used_by_piece, len(faces))
    width, height = atlas.width, atlas.height
    chart_uvs = (uvs * np.array([width, height]) / texels_per_unit).astype(np.float32)  # surface units
    best, tried = None, []
    for attempt in range(_PACK_TRIES + 1):
        extent = max(width, height)
        tried.append((texels_per_unit, extent))
        if extent <= size and (best is None or extent > best[0]):
            best = (extent, vmapping, new_faces, uvs * np.array([width, height]) / size)
        if attempt == _PACK_TRIES or (best is not None and best[0] > 0.92 * size):
            break
        texels_per_unit = _next_density(tried, 0.96 * size)
        packed = xatlas.Atlas()
        packed.add_uv_mesh(chart_uvs, new_faces)
        packed.generate(xatlas.ChartOptions(), _pack_options(texels_per_unit, padding))
        sub_vmapping, new_faces, uvs = packed[0]
        vmapping, chart_uvs = vmapping[sub_vmapping], chart_uvs[sub_vmapping]
        width, height = packed.width, packed.height
    if best is None:  # never fitted: shrink the last layout uniformly (padding shrinks with it)
        best = (size, vmapping, new_faces, uvs * np.array([width, height]) / extent)
    _, vmapping, new_faces, uvs = best
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uvs.astype(np.float32)


def _next_density(tried: list, target: float) -> float:
    """The density (texels per unit) expected to give an atlas of ``target`` texels per side, from
    the (density, extent) pairs packed so far: proportional after one, secant after more."""
    (d1, e1) = tried[-1]
    if len(tried) >= 2:
        d0, e0 = tried[-2]
        slope = (e1 - e0) / (d1 - d0) if d1 != d0 else 0.0
        if slope > 0:
            return d1 + (target - e1) / slope
    return d1 * target / e1


def _spatial_pieces(vertices: np.ndarray, faces: np.ndarray) -> list:  # [n] arrays of face indices
    """Faces split into about ``len(faces) / _FACES_PER_PIECE`` spatially compact pieces (repeated
    median cuts along the longest side).

    xatlas computes the charts of separate meshes in parallel threads, and its chart growing slows
    down faster than linearly with the mesh: the charts and first packing of 40k faces take 10 s as
    one mesh and 2.9 s as 16 pieces (2 cores), with 8% more charts (the cuts become seams)."""
    centroids = vertices[faces.astype(np.int64)].mean(1)  # [F, 3]
    pieces = [np.arange(len(faces))]
    while len(pieces[0]) > 2 * _FACES_PER_PIECE:
        split = []
        for piece in pieces:
            c = centroids[piece]
            axis = int(np.argmax(c.max(0) - c.min(0)))
            order = piece[np.argsort(c[:, axis], kind="stable")]
            split += [order[:len(order) // 2], order[len(order) // 2:]]
        pieces = split
    return pieces


def _merge_pieces(atlas: "xatlas.Atlas", pieces: list, used_by_piece: list, face_count: int):
    """One (vmapping, faces, uvs) for the whole mesh from the atlas of its pieces, faces in input order."""
    vmapping, uvs, faces = [], [], np.zeros((face_count, 3), dtype=np.int64)
    offset = 0
    for index, (piece, used) in enumerate(zip(pieces, used_by_piece)):
        piece_vmapping, piece_faces, piece_uvs = atlas[index]
        vmapping.append(used[piece_vmapping])
        uvs.append(piece_uvs)
        faces[piece] = piece_faces.astype(np.int64) + offset
        offset += len(piece_vmapping)
    return np.concatenate(vmapping), faces, np.concatenate(uvs)


def _pack_options(texels_per_unit: float, padding: int) -> "xatlas.PackOptions":
    options = xatlas.PackOptions()
    options.texels_per_unit = float(texels_per_unit)
    options.resolution = 0  # atlas sized to fit: always exactly one atlas
    options.padding = padding
    options.bilinear = True  # keep a texel of margin for bilinear taps at chart borders
    return options




def _surface_area(vertices: np.ndarray, faces: np.ndarray) -> float:
    tri = vertices[faces.astype(np.int64)].astype(np.float64)  # [F, 3, 3]
    return float(0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())


class UnwrapJob:
    """`unwrap` running in a child process, so the caller keeps optimising meanwhile.

    The child is plain ``python -m pipeline.uv IN OUT`` on .npz files (no torch, no CUDA, nothing
    inherited from the parent's state); `cancel` kills it.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, texture_size: int, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self._input = workdir / "unwrap_in.npz"
        self._output = workdir / "unwrap_out.npz"
        self._output.unlink(missing_ok=True)
        np.savez(self._input, vertices=np.asarray(vertices, np.float32), faces=np.asarray(faces, np.int64),
                 texture_size=int(texture_size))
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self._process = subprocess.Popen([sys.executable, "-m", "pipeline.uv", str(self._input), str(self._output)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self._result: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    def ready(self) -> bool:
        return self._process.poll() is not None

    def result(self, timeout: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vmapping, faces, uvs) as `unwrap` returns them; raises subprocess.TimeoutExpired when not done.
        May be called again (a refinement retried after running out of GPU memory asks twice)."""
        if self._result is None:
            _, stderr = self._process.communicate(timeout=timeout)
            if self._process.returncode != 0 or not self._output.exists():
                message = stderr.decode(errors="replace").strip().splitlines()
                raise PipelineError(f"UV unwrapping failed: {message[-1] if message else 'no output'}")
            with np.load(self._output) as out:
                self._result = out["vmapping"], out["faces"], out["uvs"]
        return self._result

    def cancel(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def _main(argv: list) -> int:
    with np.load(argv[0]) as data:
        vmapping, faces, uvs = unwrap(data["vertices"], data["faces"], int(data["texture_size"]))
    np.savez(argv[1], vmapping=vmapping, faces=faces, uvs=uvs)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
