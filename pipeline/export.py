"""Export: simplify the mesh, unwrap it (xatlas), bake its appearance into a texture, write GLB / OBJ.

Frames (docs/CONVENTIONS.md, "Exported models"):

* normalised frame: the frame the earlier stages work in (object inside [-1, 1]^3); the caller
  passes ``world_from_model`` [4, 4], the similarity from it to the input cameras' world frame.
* GLB frame: what viewers see. ``x_glb = scale * (Q x_norm - c)``: Q is the smallest rotation that
  turns the world's up direction (``up``, given in world coordinates) into +Y (glTF is Y-up), c
  centres the bounding box of the rotated mesh on the origin, ``scale`` defaults to 1, so one GLB
  unit (a "metre" to viewers) is one normalised unit and the object is about 2 units across.
  Photos carry no absolute scale, so no unit is more right than this one.
* ``world_from_model`` in the GLB scene's ``extras``: 16 floats, row-major, the similarity mapping
  GLB coordinates to the input cameras' world frame (``write_glb`` returns the same matrix, and
  ``read_world_from_model`` reads it back). The OBJ carries it as a comment line.

UV convention (ours = glTF's): u along image columns, v along image rows, (0, 0) is the top-left
corner of the texture image, whose row 0 is the top row of the PNG. This is also the convention
of ``Rasterizer.texture`` (texel (i, j) covers v in [i/h, (i+1)/h]). OBJ files store 1 - v.

Textures are float [h, w, 3] in [0, 1] holding sRGB-encoded values as in the photos; they are
written as 8-bit PNG, which glTF reads as sRGB for ``baseColorTexture``.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import trimesh
from PIL import Image

from .errors import PipelineError
from .mesh import TexturedMesh, simplify, welded_vertex_normals
from .refine.appearance import bake_texture, colors_from_texture, corner_positions
from .render import Rasterizer
from .uv import unwrap

PathLike = Union[str, Path]

# glTF / GLB constants (glTF 2.0 specification).
_GLB_MAGIC = 0x46546C67  # "glTF"
_CHUNK_JSON = 0x4E4F534A
_CHUNK_BIN = 0x004E4942
_FLOAT, _UINT32 = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071
_UNLIT = "KHR_materials_unlit"
# The untextured model's material (linear base colour, roughness): a matte mid grey, so that a viewer's
# lighting shows the relief (lighter greys wash out under the environment light of web viewers).
SHADED_GREY = 0.25
SHADED_ROUGHNESS = 0.9


# ------------------------------------------------------------------------------------------ frames
def export_from_normalised(
    vertices: np.ndarray,  # [V, 3] in the normalised frame
    world_from_normalised: np.ndarray,  # [4, 4] similarity
    up: Sequence[float] = (0.0, 1.0, 0.0),
    scale: float = 1.0,
) -> np.ndarray:  # [4, 4] similarity: normalised frame -> exported (GLB / OBJ) frame
    """The exported frame: ``x = scale * (Q x_norm - c)``, world ``up`` -> +Y, bounding box centred.

    Q is the smallest rotation taking ``up`` (a world direction, expressed in the normalised frame
    through ``world_from_normalised``) to +Y; c is the centre of the rotated mesh's bounding box.
    """
    linear = np.asarray(world_from_normalised, dtype=np.float64)[:3, :3]
    if np.linalg.det(linear) <= 0:
        raise ValueError("world_from_normalised must be a similarity with positive scale (no mirroring)")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    up_local = np.linalg.solve(linear, np.asarray(up, dtype=np.float64))  # directions map by linear^-1
    norm = np.linalg.norm(up_local)
    if not norm > 0:
        raise ValueError(f"up must be a non-zero vector, got {up}")
    rotation = _rotation_between(up_local / norm, np.array([0.0, 1.0, 0.0]))
    rotated = np.asarray(vertices, dtype=np.float64) @ rotation.T
    centre = 0.5 * (rotated.min(axis=0) + rotated.max(axis=0))
    out = np.eye(4)
    out[:3, :3] = scale * rotation
    out[:3, 3] = -scale * centre
    return out


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [3, 3], R a = b for unit a, b
    cross, cos = np.cross(a, b), float(a @ b)
    if cos < -1 + 1e-9:  # opposite: half turn about any axis perpendicular to a
        axis = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 0.0, 1.0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    skew = np.array([[0, -cross[2], cross[1]], [cross[2], 0, -cross[0]], [-cross[1], cross[0], 0]])
    return np.eye(3) + skew + skew @ skew / (1 + cos)


def _to_export_frame(
    vertices: np.ndarray,  # [V, 3] normalised frame
    faces: np.ndarray,  # [F, 3]
    world_from_model: np.ndarray,  # [4, 4] normalised -> world
    up: Sequence[float],
    scale: float,
    normals: Optional[np.ndarray],  # [V, 3] or None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:  # vertices [V, 3], unit normals [V, 3], world_from_export [4, 4]
    """Vertices and normals in the exported frame, and the similarity from it back to the world."""
    vertices = np.asarray(vertices, dtype=np.float64)
    world_from_model = np.asarray(world_from_model, dtype=np.float64)
    if world_from_model.shape != (4, 4):
        raise ValueError(f"world_from_model must be [4, 4], got {world_from_model.shape}")
    normals = welded_vertex_normals(vertices, faces) if normals is None else np.asarray(normals, dtype=np.float64)
    export_from_model = export_from_normalised(vertices, world_from_model, up=up, scale=scale)
    out_vertices = vertices @ export_from_model[:3, :3].T + export_from_model[:3, 3]
    out_normals = normals @ export_from_model[:3, :3].T  # rotation times a positive scale
    out_normals /= np.maximum(np.linalg.norm(out_normals, axis=1, keepdims=True), 1e-12)
    return out_vertices, out_normals, world_from_model @ np.linalg.inv(export_from_model)


def texture_png(texture: np.ndarray) -> bytes:  # texture [h, w, 3] float in [0, 1], row 0 = top
    texture = np.asarray(texture)
    if not np.issubdtype(texture.dtype, np.floating) or texture.ndim != 3 or texture.shape[2] != 3:
        raise ValueError(f"texture must be float [h, w, 3] in [0, 1], got {texture.dtype} {texture.shape}")
    # In float32: the conversion of a 2048^2 texture took 0.09-0.39 s through a float64 copy, 0.02 s so.
    pixels = np.rint(np.clip(texture.astype(np.float32, copy=False), 0.0, 1.0) * np.float32(255)).astype(np.uint8)
    buffer = io.BytesIO()
    # zlib level 3, not PIL's 6: a third of the time (0.36 vs 1.04 s for a 2048^2 texture on one
    # core) for a file 15% larger; the export waits on this encode.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------- GLB
def write_glb(
    path: PathLike,
    vertices: np.ndarray,  # [V, 3] normalised frame
    faces: np.ndarray,  # [F, 3]
    uvs: Optional[np.ndarray],  # [V, 2] glTF convention; None (with texture None): grey, untextured
    texture: Optional[np.ndarray],  # [h, w, 3] float in [0, 1], sRGB values
    world_from_model: np.ndarray,  # [4, 4] normalised frame -> input cameras' world frame
    unlit: bool = False,
    *,
    up: Sequence[float] = (0.0, 1.0, 0.0),
    scale: float = 1.0,
    normals: Optional[np.ndarray] = None,  # [V, 3]; default: welded_vertex_normals
    double_sided: bool = False,
    png: Optional[bytes] = None,  # ``texture`` already encoded by `texture_png` (spares encoding it again)
) -> np.ndarray:  # [4, 4] world_from_model of the GLB (GLB coordinates -> world), as stored
    """Write a binary glTF 2.0 file: one mesh, positions, normals, UVs, the texture as embedded PNG.

    The vertices are moved to the GLB frame (``export_from_normalised``: ``up`` -> +Y, centred,
    ``scale``) and the similarity from GLB coordinates back to the input cameras' world frame is
    stored in the scene's ``extras`` as ``{"world_from_model": [16 floats, row-major]}``.

    Material: PBR metallic-roughness with metallic 0, roughness 1 and the texture as
    ``baseColorTexture``. With ``unlit``, also ``KHR_materials_unlit`` (listed in
    ``extensionsUsed``, not required: viewers without it fall back to the PBR material), which
    shows the texture's colours as captured instead of relighting the baked-in shading. Without
    ``uvs`` and ``texture``: the shape alone, in a uniform mid grey (`SHADED_GREY`) that a viewer
    lights, so the surface's relief shows.
    """
    faces = np.asarray(faces, dtype=np.int64)
    textured = texture is not None or png is not None
    if textured != (uvs is not None):
        raise ValueError("give both uvs and a texture, or neither (an untextured, grey model)")
    if textured:
        uvs = np.asarray(uvs, dtype=np.float64)
        if uvs.shape != (len(vertices), 2):
            raise ValueError(f"uvs must be [{len(vertices)}, 2] (per vertex), got {uvs.shape}")
    positions, normals, world_from_glb = _to_export_frame(vertices, faces, world_from_model, up, scale, normals)

    stored = positions.astype(np.float32)  # min/max must match the stored float32 values exactly
    blobs = [stored.astype("<f4").tobytes(), normals.astype("<f4").tobytes(), faces.astype("<u4").tobytes()]
    accessors = [
        {"bufferView": 0, "componentType": _FLOAT, "count": len(positions), "type": "VEC3",
         "min": stored.min(axis=0).tolist(), "max": stored.max(axis=0).tolist()},
        {"bufferView": 1, "componentType": _FLOAT, "count": len(positions), "type": "VEC3"},
        {"bufferView": 2, "componentType": _UINT32, "count": faces.size, "type": "SCALAR"},
    ]
    targets = [_ARRAY_BUFFER, _ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER]
    attributes = {"POSITION": 0, "NORMAL": 1}
    pbr = {"metallicFactor": 0.0, "roughnessFactor": 1.0}
    if textured:
        blobs += [uvs.astype("<f4").tobytes(), png if png is not None else texture_png(texture)]
        accessors.append({"bufferView": 3, "componentType": _FLOAT, "count": len(positions), "type": "VEC2"})
        targets += [_ARRAY_BUFFER, None]
        attributes["TEXCOORD_0"] = 3
        pbr["baseColorTexture"] = {"index": 0}
    else:
        pbr.update(baseColorFactor=[SHADED_GREY] * 3 + [1.0], roughnessFactor=SHADED_ROUGHNESS)
    offsets = np.concatenate([[0], np.cumsum([len(_pad4(b)) for b in blobs])]).tolist()
    binary = b"".join(_pad4(b) for b in blobs)
    views = [{"buffer": 0, "byteOffset": offset, "byteLength": len(blob), **({"target": target} if target else {})}
             for blob, offset, target in zip(blobs, offsets, targets)]
    material = {"name": "baked" if textured else "shaded", "pbrMetallicRoughness": pbr,
                "doubleSided": bool(double_sided)}
    gltf = {
        "asset": {"version": "2.0", "generator": "pipeline.export"},
        "scene": 0,
        "scenes": [{"nodes": [0], "extras": {"world_from_model": world_from_glb.reshape(-1).tolist()}}],
        "nodes": [{"mesh": 0, "name": "model"}],
        "meshes": [{"name": "model", "primitives": [{
            "attributes": attributes,
            "indices": 2,
            "material": 0,
            "mode": 4,
        }]}],
        "materials": [material],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": len(binary)}],
    }
    if textured:
        gltf.update({
            "textures": [{"sampler": 0, "source": 0}],
            # Clamp: the atlas border is not periodic; trilinear so minified views do not alias.
            "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR,
                          "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}],
            "images": [{"bufferView": 4, "mimeType": "image/png"}],
        })
    if unlit:
        material["extensions"] = {_UNLIT: {}}
        gltf["extensionsUsed"] = [_UNLIT]

    text = _pad4(json.dumps(gltf, separators=(",", ":")).encode("utf-8"), b" ")
    total = 12 + 8 + len(text) + 8 + len(binary)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<III", _GLB_MAGIC, 2, total))
        handle.write(struct.pack("<II", len(text), _CHUNK_JSON) + text)
        handle.write(struct.pack("<II", len(binary), _CHUNK_BIN) + binary)
    return world_from_glb


def _pad4(data: bytes, fill: bytes = b"\0") -> bytes:  # GLB chunks and views are 4-byte aligned
    return data + fill * (-len(data) % 4)


def read_glb_json(path: PathLike) -> dict:
    """The JSON chunk of a GLB file."""
    data = Path(path).read_bytes()
    if len(data) < 20 or struct.unpack_from("<I", data, 0)[0] != _GLB_MAGIC:
        raise PipelineError(f"{path} is not a GLB file (no 'glTF' header)")
    length, kind = struct.unpack_from("<II", data, 12)
    if kind != _CHUNK_JSON:
        raise PipelineError(f"{path}: the first GLB chunk is not JSON")
    return json.loads(data[20 : 20 + length])


def read_world_from_model(path: PathLike) -> np.ndarray:  # [4, 4]
    """The GLB -> world similarity that ``write_glb`` stored in the scene's ``extras``."""
    gltf = read_glb_json(path)
    scene = gltf.get("scenes", [{}])[gltf.get("scene", 0)]
    values = scene.get("extras", {}).get("world_from_model")
    if values is None or len(values) != 16:
        raise PipelineError(f"{path} has no scene extras 'world_from_model' (16 floats); was it written by this pipeline?")
    return np.asarray(values, dtype=np.float64).reshape(4, 4)


# -------------------------------------------------------------------------------------------- OBJ
def write_obj_zip(
    path: PathLike,
    vertices: np.ndarray,  # [V, 3] normalised frame
    faces: np.ndarray,  # [F, 3]
    uvs: np.ndarray,  # [V, 2] glTF convention
    texture: np.ndarray,  # [h, w, 3] float in [0, 1]
    world_from_model: np.ndarray,  # [4, 4] normalised frame -> input cameras' world frame
    *,
    up: Sequence[float] = (0.0, 1.0, 0.0),
    scale: float = 1.0,
    normals: Optional[np.ndarray] = None,  # [V, 3]; default: welded_vertex_normals
    name: str = "model",
    png: Optional[bytes] = None,  # ``texture`` already encoded by `texture_png` (spares encoding it again)
) -> np.ndarray:  # [4, 4] world_from_model of the OBJ coordinates, as in the header comment
    """Write ``name``.obj, ``name``.mtl and ``name``.png into a zip archive.

    Same frame as ``write_glb`` (Y-up, centred, ``scale``); the OBJ's header has a comment
    ``# world_from_model <16 floats, row-major>``. OBJ texture coordinates have v = 0 at the
    bottom of the image, so ``vt`` = (u, 1 - v).
    """
    faces = np.asarray(faces, dtype=np.int64)
    uvs = np.asarray(uvs, dtype=np.float64)
    if uvs.shape != (len(vertices), 2):
        raise ValueError(f"uvs must be [{len(vertices)}, 2] (per vertex), got {uvs.shape}")
    positions, normals, world_from_obj = _to_export_frame(vertices, faces, world_from_model, up, scale, normals)

    obj = io.StringIO()
    obj.write("# pipeline.export: Y-up, centred; world_from_model maps these coordinates to the cameras' world\n")
    obj.write("# world_from_model " + " ".join(repr(float(x)) for x in world_from_obj.reshape(-1)) + "\n")
    obj.write(f"mtllib {name}.mtl\nusemtl baked\n")
    obj.write(_format_rows("v %.8g %.8g %.8g\n", positions))
    obj.write(_format_rows("vt %.8g %.8g\n", np.stack([uvs[:, 0], 1.0 - uvs[:, 1]], axis=1)))
    obj.write(_format_rows("vn %.6g %.6g %.6g\n", normals))
    obj.write(_format_rows("f %d/%d/%d %d/%d/%d %d/%d/%d\n", np.repeat(faces + 1, 3, axis=1)))  # v/vt/vn share indices
    # Diffuse only (Ks 0), like the GLB's metallic 0 / roughness 1.
    mtl = f"newmtl baked\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd {name}.png\n"
    # Level 1: the OBJ text deflates 5x faster than at the default 6; the archive, mostly the PNG, grows ~5%.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr(f"{name}.obj", obj.getvalue())
        archive.writestr(f"{name}.mtl", mtl)
        # The PNG is compressed already: stored as is.
        archive.writestr(f"{name}.png", png if png is not None else texture_png(texture), compress_type=zipfile.ZIP_STORED)
    return world_from_obj


def _format_rows(row: str, values: np.ndarray) -> str:  # one printf-style ``row`` per row of ``values`` [n, k]
    """What ``np.savetxt`` writes, in one C-level format call instead of a Python loop over rows."""
    return (row * len(values)) % tuple(values.reshape(-1).tolist())


# ------------------------------------------------------------------------------- pipeline stage
def export_textured_mesh(
    mesh: TexturedMesh,  # normalised frame
    out_dir: PathLike,
    world_from_normalised: np.ndarray,  # [4, 4]
    up: Sequence[float],  # world up direction
    target_faces: int,
    unlit: bool = False,
    name: str = "model",
    rasterizer: Optional[Rasterizer] = None,
) -> dict:  # {"glb", "zip", "shaded_glb": Path, "world_from_model": [4, 4], "vertices": [Vt, 3], "faces": [F, 3]}
    """The export stage: simplify to ``target_faces`` (re-unwrapping and re-baking the texture
    from the refined one when that changes the mesh), then write ``name``.glb, ``name``_obj.zip and
    ``name``_shaded.glb (the same shape in grey, untextured: for viewers, to see the surface itself).
    ``vertices`` / ``faces`` are the written geometry in the normalised frame (split along UV seams)."""
    out_dir = Path(out_dir)
    if len(mesh.faces) > target_faces:
        vertices, faces = simplify(mesh.vertices, mesh.faces, target_faces)
        size = mesh.texture.shape[0]
        vmapping, faces_uv, uvs = unwrap(vertices, faces, texture_size=size)
        source_uvs = mesh.uvs[mesh.faces_uv]  # [F, 3, 2] per corner of the refined mesh
        colors = colors_from_texture(mesh.vertices, mesh.faces, source_uvs, mesh.texture)
        texture = bake_texture(vertices[vmapping], faces_uv, uvs, colors, size, rasterizer=rasterizer)
        positions = vertices[vmapping]
    else:
        faces_uv, uvs, texture = mesh.faces_uv, mesh.uvs, mesh.texture
        positions = corner_positions(mesh)
    glb = out_dir / f"{name}.glb"
    archive = out_dir / f"{name}_obj.zip"
    png = texture_png(texture)
    world_from_model = write_glb(glb, positions, faces_uv, uvs, texture, world_from_normalised, unlit=unlit, up=up,
                                 png=png)
    write_obj_zip(archive, positions, faces_uv, uvs, texture, world_from_normalised, up=up, name=name, png=png)
    shaded = out_dir / f"{name}_shaded.glb"
    write_glb(shaded, positions, faces_uv, None, None, world_from_normalised, up=up)
    return {"glb": glb, "zip": archive, "shaded_glb": shaded, "world_from_model": world_from_model,
            "vertices": positions, "faces": faces_uv}


def load_glb(path: PathLike) -> Tuple[TexturedMesh, np.ndarray]:  # (mesh in GLB coordinates, world_from_model)
    """Read a GLB written by `write_glb` (or any textured GLB plus its world_from_model extras)."""
    if not Path(path).is_file():
        where = f"{path}: no such file" if str(path) else "no such file (the GLB path is empty)"
        raise PipelineError(f"{where}; give the .glb that `python -m pipeline reconstruct` wrote")
    world_from_model = read_world_from_model(path)
    try:
        loaded = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for broken files
        raise PipelineError(f"cannot read {path} as a GLB ({exc}); give a .glb written by this pipeline") from None
    visual = loaded.visual
    image = getattr(getattr(visual, "material", None), "baseColorTexture", None)
    if getattr(visual, "uv", None) is None or image is None:
        raise PipelineError(f"{path} has no texture coordinates or base-colour texture")
    uv = np.asarray(visual.uv, dtype=np.float32).copy()
    uv[:, 1] = 1.0 - uv[:, 1]  # trimesh hands UVs over in the OBJ convention (v = 0 at the bottom)
    texture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    faces = np.asarray(loaded.faces, dtype=np.int32)
    mesh = TexturedMesh(np.asarray(loaded.vertices, dtype=np.float32), faces, uv, faces.copy(), texture)
    return mesh, world_from_model


def load_glb_in_world(path: PathLike) -> TexturedMesh:
    """A GLB written by `write_glb`, with its vertices mapped back to the input cameras' world frame."""
    mesh, world_from_model = load_glb(path)
    vertices = mesh.vertices @ world_from_model[:3, :3].T + world_from_model[:3, 3]
    return TexturedMesh(vertices.astype(np.float32), mesh.faces, mesh.uvs, mesh.faces_uv, mesh.texture)
