"""Export stage: simplify -> unwrap -> bake -> GLB / OBJ zip, checked by reloading and by the Khronos validator."""

import zipfile

import numpy as np
import pytest
import torch
import trimesh
from scipy import ndimage, sparse

from pipeline import export, uv
from pipeline.refine import appearance
from pipeline.errors import PipelineError
from pipeline.render import Rasterizer

TEXTURE_SIZE = 256
# One colour per cube side, indexed by 2 * axis + (coordinate < 0); none black, each with a 0.9 channel.
SIDE_COLORS = np.array([
    [0.9, 0.1, 0.1],  # +X red
    [0.1, 0.9, 0.9],  # -X cyan
    [0.1, 0.9, 0.1],  # +Y green
    [0.9, 0.1, 0.9],  # -Y magenta
    [0.1, 0.1, 0.9],  # +Z blue
    [0.9, 0.9, 0.1],  # -Z yellow
])


def side_index(points: np.ndarray) -> np.ndarray:  # [P] cube side of each point (dominant axis, sign)
    axis = np.abs(points).argmax(axis=1)
    return 2 * axis + (points[np.arange(len(points)), axis] < 0)


def side_colors(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    return SIDE_COLORS[side_index(points)]


def gradient_colors(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    return 0.5 + 0.45 * np.clip(points, -1, 1)


def _rotation(axis, angle) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew


# Normalised -> world: rotation, scale 2.5, translation. The world's up is the normalised +Z.
WORLD_ROTATION = _rotation([0.3, -0.5, 0.8], 0.7)
WORLD_FROM_NORMALISED = np.eye(4)
WORLD_FROM_NORMALISED[:3, :3] = 2.5 * WORLD_ROTATION
WORLD_FROM_NORMALISED[:3, 3] = [0.3, -1.2, 4.0]
WORLD_UP = WORLD_ROTATION @ np.array([0.0, 0.0, 1.0])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:  # [4, 4] similarity on [P, 3]
    return points @ matrix[:3, :3].T + matrix[:3, 3]


@pytest.fixture(scope="module")
def baked_cube():
    """A finely tessellated cube -> simplify -> unwrap -> bake with one colour per side."""
    box = trimesh.creation.box(extents=(2, 2, 2))
    for _ in range(4):
        box = box.subdivide()  # 3072 faces
    vertices, faces = export.simplify(box.vertices, box.faces, 300)
    vmapping, faces, uvs = export.unwrap(vertices, faces, TEXTURE_SIZE)
    vertices = vertices[vmapping]
    texture = appearance.bake_texture(vertices, faces, uvs, side_colors, TEXTURE_SIZE)
    return {"vertices": vertices, "faces": faces, "uvs": uvs, "texture": texture}


def uv_coverage(uvs: np.ndarray, faces: np.ndarray, size: int) -> np.ndarray:  # [size, size] triangle id, -1 = none
    pos = torch.tensor(np.concatenate([2 * uvs - 1, np.zeros((len(uvs), 1)), np.ones((len(uvs), 1))], axis=1),
                       dtype=torch.float32)[None]
    rast, _ = Rasterizer(backend="torch").rasterize(pos, torch.tensor(faces, dtype=torch.int32), (size, size))
    return rast[0, ..., 3].numpy().astype(np.int64) - 1


def check_side_colors(vertices_norm, faces, uvs_v_up, image) -> tuple[int, int]:
    """(faces matching, faces checked): the texel under each well-inside face centroid has its side's colour.

    ``uvs_v_up``: trimesh's convention (v = 0 at the image bottom). Only faces whose UV inradius is
    at least 1.5 texels are checked, so the texel under the centroid is well inside its chart.
    """
    image = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    height, width = image.shape[:2]
    corners = uvs_v_up[faces] * [width, height]  # [F, 3, 2] texels
    edges = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=2).sum(axis=1)
    d1, d2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    inradius = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) / np.maximum(edges, 1e-12)
    checked = inradius >= 1.5
    centre_uv = uvs_v_up[faces].mean(axis=1)[checked]
    cols = np.clip((centre_uv[:, 0] * width).astype(int), 0, width - 1)
    rows = np.clip(((1.0 - centre_uv[:, 1]) * height).astype(int), 0, height - 1)
    expected = SIDE_COLORS[side_index(vertices_norm[faces].mean(axis=1)[checked])]
    match = np.abs(image[rows, cols] - expected).max(axis=1) <= 2.0 / 255
    # Every side must be represented, or the check could miss a flip between two sides.
    assert len(np.unique(side_index(vertices_norm[faces].mean(axis=1)[checked]))) == 6
    return int(match.sum()), int(checked.sum())


# ------------------------------------------------------------------------------------ simplify
def test_simplify_reaches_target_and_keeps_shape():
    sphere = trimesh.creation.icosphere(subdivisions=4)  # 5120 faces
    vertices, faces = export.simplify(sphere.vertices, sphere.faces, 500)
    assert 400 <= len(faces) <= 500
    assert np.array_equal(np.unique(faces), np.arange(len(vertices)))  # no unused vertex
    assert (faces[:, 0] != faces[:, 1]).all() and (faces[:, 1] != faces[:, 2]).all() and (faces[:, 0] != faces[:, 2]).all()
    assert np.abs(np.linalg.norm(vertices, axis=1) - 1).max() < 0.02
    assert trimesh.Trimesh(vertices, faces).is_watertight


def test_simplify_is_a_no_op_when_small_enough():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    vertices, faces = export.simplify(sphere.vertices, sphere.faces, len(sphere.faces))
    assert np.array_equal(vertices, sphere.vertices) and np.array_equal(faces, sphere.faces)


# -------------------------------------------------------------------------------------- unwrap
@pytest.mark.parametrize("face_count, size", [(600, TEXTURE_SIZE), (6000, 1024)])  # one piece; several (uv._spatial_pieces)
def test_unwrap_charts_are_disjoint_padded_and_fill_the_texture(face_count, size):
    sphere = trimesh.creation.icosphere(subdivisions=3 if face_count < 1280 else 5)
    bumps = 1 + 0.15 * np.sin(7 * sphere.vertices[:, :1]) * np.sin(5 * sphere.vertices[:, 1:2])  # many charts
    vertices, faces = export.simplify(sphere.vertices * (bumps if face_count > 1280 else 1), sphere.faces, face_count)
    assert (len(uv._spatial_pieces(vertices, faces)) > 1) == (face_count > 5000)
    vmapping, new_faces, uvs = export.unwrap(vertices, faces, size)
    assert new_faces.shape == faces.shape and uvs.shape == (len(vmapping), 2)
    np.testing.assert_array_equal(vertices[vmapping][new_faces], vertices[faces])  # same faces, same order
    assert uvs.min() >= 0 and uvs.max() <= 1
    assert uvs.max() > 0.85  # the layout uses the texture, not a corner of it

    tri_map = uv_coverage(uvs, new_faces, size)
    d1 = uvs[new_faces[:, 1]] - uvs[new_faces[:, 0]]
    d2 = uvs[new_faces[:, 2]] - uvs[new_faces[:, 0]]
    uv_area = 0.5 * np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])  # [F]
    covered = (tri_map >= 0).sum()
    # Overlapping charts would cover fewer texels than their total area.
    assert abs(covered - uv_area.sum() * size**2) < 0.03 * covered
    assert covered > 0.3 * size**2

    # Charts = connected components of faces sharing a (split) vertex; texels of two different
    # charts are >= padding texels apart.
    incidence = sparse.csr_matrix((np.ones(new_faces.size), (np.repeat(np.arange(len(new_faces)), 3), new_faces.ravel())))
    count, chart_of_face = sparse.csgraph.connected_components(incidence @ incidence.T, directed=False)
    chart_map = np.where(tri_map >= 0, chart_of_face[tri_map], -1)
    padding = uv.default_padding(size)
    assert count > 1
    for dy in range(0, padding):
        for dx in range(-padding + 1, padding):
            if dy * dy + dx * dx >= padding * padding or (dy == 0 and dx <= 0):
                continue
            a = chart_map[:size - dy, max(0, -dx):size - max(0, dx)]
            b = chart_map[dy:, max(0, dx):size - max(0, -dx)]
            close = (a >= 0) & (b >= 0) & (a != b)
            assert not close.any(), f"charts {a[close][0]} and {b[close][0]} are closer than {padding} texels"


# ---------------------------------------------------------------------------------------- bake
def test_bake_samples_texel_centres_with_row_zero_at_v_zero():
    # One quad covering the whole UV square, positions = (u, v, 0): each texel must hold the
    # colour of its centre, ((j + 0.5) / S, (i + 0.5) / S) at row i, column j.
    size = 16
    uvs = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    vertices = np.concatenate([uvs, np.zeros((4, 1))], axis=1)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    texture = appearance.bake_texture(vertices, faces, uvs, lambda p, n: np.c_[p[:, :2], np.full(len(p), 0.5)], size)
    centres = (np.arange(size) + 0.5) / size
    np.testing.assert_allclose(texture[..., 0], np.broadcast_to(centres[None, :], (size, size)), atol=1e-5)
    np.testing.assert_allclose(texture[..., 1], np.broadcast_to(centres[:, None], (size, size)), atol=1e-5)


def test_bake_fills_every_texel_with_surface_colours(baked_cube):
    texture = baked_cube["texture"]
    assert texture.shape == (TEXTURE_SIZE, TEXTURE_SIZE, 3) and np.isfinite(texture).all()
    # Every texel, inside the charts or in the gutters, is one of the side colours: nothing
    # black or unfilled anywhere, so mip levels cannot pull in black.
    distance_to_palette = np.abs(texture[:, :, None, :] - SIDE_COLORS).max(axis=3).min(axis=2)
    assert distance_to_palette.max() < 1e-6
    tri_map = uv_coverage(baked_cube["uvs"], baked_cube["faces"], TEXTURE_SIZE)
    assert (texture[tri_map >= 0].max(axis=1) > 0.5).all()


def test_bake_fills_unseen_texels_from_seen_ones(baked_cube):
    def bottom_unseen(points, normals):  # the -Z side was never seen by a camera
        colors = side_colors(points, normals)
        colors[side_index(points) == 5] = np.nan
        return colors

    texture = appearance.bake_texture(baked_cube["vertices"], baked_cube["faces"], baked_cube["uvs"], bottom_unseen, TEXTURE_SIZE)
    distance_to_palette = np.abs(texture[:, :, None, :] - SIDE_COLORS[:5]).max(axis=3).min(axis=2)
    assert np.isfinite(texture).all() and distance_to_palette.max() < 1e-6


def test_bake_accepts_per_corner_uvs(baked_cube):
    faces, uvs = baked_cube["faces"], baked_cube["uvs"]
    texture = appearance.bake_texture(baked_cube["vertices"], faces, uvs[faces], side_colors, TEXTURE_SIZE)
    np.testing.assert_allclose(texture, baked_cube["texture"], atol=1e-6)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def chart_like_mask(shape, seed):  # rectangles and thin strips, as a UV atlas's charts cover a texture
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for _ in range(40):
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        mask[r:r + rng.integers(1, 30), c:c + rng.integers(1, 30)] = True
    return mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seeds", ["sparse", "charts", "one"])
def test_jump_flood_finds_the_nearest_seed_as_the_exact_transform_does(device, seeds):
    """The fast path of `nearest_texels` on CUDA, held to scipy's exact distance transform."""
    shape = (173, 256)
    if seeds == "sparse":
        valid = np.random.default_rng(0).random(shape) < 0.002
    elif seeds == "charts":
        valid = chart_like_mask(shape, 1)
    else:
        valid = np.zeros(shape, bool)
        valid[170, 3] = True
    exact = ndimage.distance_transform_edt(~valid)
    nearest = appearance.jump_flood(torch.from_numpy(valid).to(device)).cpu().numpy()
    rows, cols = nearest // shape[1], nearest % shape[1]
    assert valid[rows, cols].all()  # every texel points at a seed
    here_r, here_c = np.indices(shape)
    dist = np.hypot(rows - here_r, cols - here_c)
    assert (dist >= exact - 1e-9).all()
    assert np.mean(np.abs(dist - exact) < 1e-9) >= 0.999
    assert np.abs(dist - exact).max() < 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_fill_empty_texels_copies_the_nearest_valid_texel(device):
    valid = chart_like_mask((120, 90), 2)
    texture = np.random.default_rng(3).random((120, 90, 3)).astype(np.float32)
    holes = torch.from_numpy(np.where(valid[..., None], texture, np.nan)).to(device)
    filled = appearance.fill_empty_texels(holes, torch.from_numpy(valid).to(device)).cpu().numpy()
    _, (rows, cols) = ndimage.distance_transform_edt(~valid, return_indices=True)
    assert np.array_equal(filled[valid], texture[valid])  # valid texels keep their colour
    assert np.isfinite(filled).all()
    agree = (filled == texture[rows, cols]).all(axis=2)
    assert agree.mean() >= (1.0 if device == "cpu" else 0.99)  # CUDA: ties and JFA's rare misses differ


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_texels_distances_are_exact_on_every_device(device):
    valid = chart_like_mask((150, 200), 4)
    dist, rows, cols = appearance.nearest_texels(torch.from_numpy(valid).to(device))
    assert dist.device.type == rows.device.type == torch.device(device).type
    np.testing.assert_allclose(dist.cpu().numpy(), ndimage.distance_transform_edt(~valid), atol=1e-9)
    assert valid[rows.cpu().numpy(), cols.cpu().numpy()].all()


def test_nearest_texels_says_what_is_wrong_with_an_empty_mask():
    with pytest.raises(ValueError, match="at least one valid texel"):
        appearance.nearest_texels(torch.zeros(4, 4, dtype=torch.bool))


def test_rebake_from_a_texture_on_another_mesh_and_layout():
    sphere = trimesh.creation.icosphere(subdivisions=4)
    src_vertices, src_faces = export.simplify(sphere.vertices, sphere.faces, 3000)
    vmapping, src_faces, src_uvs = export.unwrap(src_vertices, src_faces, TEXTURE_SIZE)
    src_vertices = src_vertices[vmapping]
    src_texture = appearance.bake_texture(src_vertices, src_faces, src_uvs, gradient_colors, TEXTURE_SIZE)

    vertices, faces = export.simplify(sphere.vertices, sphere.faces, 800)  # a coarser surface, own layout
    vmapping, faces, uvs = export.unwrap(vertices, faces, TEXTURE_SIZE)
    vertices = vertices[vmapping]
    colors_at = appearance.colors_from_texture(src_vertices, src_faces, src_uvs[src_faces], src_texture)  # per-corner source
    texture = appearance.bake_texture(vertices, faces, uvs, colors_at, TEXTURE_SIZE)

    centroids = vertices[faces].mean(axis=1)
    sampled = appearance._sample_bilinear(texture, uvs[faces].mean(axis=1))
    expected = gradient_colors(centroids / np.linalg.norm(centroids, axis=1, keepdims=True), None)
    assert np.abs(sampled - expected).max() < 0.03


def test_closest_triangle_finder_is_exact_with_uneven_triangles():
    rng = np.random.default_rng(0)
    small = rng.uniform(-1, 1, (200, 1, 3)) + 0.05 * rng.standard_normal((200, 3, 3))
    huge = np.array([[[-20.0, -20.0, 0.3], [20.0, -20.0, 0.3], [0.0, 30.0, 0.3]]])  # its centroid is far from most points
    triangles = np.concatenate([small, huge])
    points = rng.uniform(-1, 1, (300, 3))
    tri_index, closest = appearance._closest_triangle_finder(triangles)(points)
    all_closest = trimesh.triangles.closest_point(np.repeat(triangles, len(points), axis=0), np.tile(points, (len(triangles), 1)))
    brute = np.linalg.norm(all_closest.reshape(len(triangles), len(points), 3) - points, axis=2).min(axis=0)
    np.testing.assert_allclose(np.linalg.norm(closest - points, axis=1), brute, atol=1e-9)
    assert (tri_index == len(small)).any()


# ----------------------------------------------------------------------------------------- GLB
@pytest.mark.parametrize("unlit", [False, True])
def test_glb_validates_reloads_with_texture_and_maps_back_to_world(baked_cube, tmp_path, validate_glb, unlit):
    path = tmp_path / "model.glb"
    vertices, faces, uvs = baked_cube["vertices"], baked_cube["faces"], baked_cube["uvs"]
    written = export.write_glb(path, vertices, faces, uvs, baked_cube["texture"], WORLD_FROM_NORMALISED,
                               unlit=unlit, up=WORLD_UP)

    report = validate_glb(path)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]
    gltf = export.read_glb_json(path)
    material = gltf["materials"][0]
    assert material["pbrMetallicRoughness"]["metallicFactor"] == 0
    assert material["pbrMetallicRoughness"]["roughnessFactor"] == 1
    assert ("KHR_materials_unlit" in material.get("extensions", {})) == unlit
    assert ("KHR_materials_unlit" in gltf.get("extensionsUsed", [])) == unlit
    assert "NORMAL" in gltf["meshes"][0]["primitives"][0]["attributes"]

    world_from_glb = export.read_world_from_model(path)
    np.testing.assert_array_equal(world_from_glb, written)

    mesh = trimesh.load(path, process=False).to_geometry()
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    image = mesh.visual.material.baseColorTexture
    assert image.size == (TEXTURE_SIZE, TEXTURE_SIZE)
    assert mesh.vertices.shape == vertices.shape
    # GLB vertices -> world frame = the original vertices -> world frame.
    np.testing.assert_allclose(apply(world_from_glb, mesh.vertices), apply(WORLD_FROM_NORMALISED, vertices), atol=1e-5)
    # Y-up and centred: world up is GLB +Y, the bounding box is centred, unit scale = normalised units.
    up_in_world = world_from_glb[:3, :3] @ [0.0, 1.0, 0.0]
    np.testing.assert_allclose(up_in_world / np.linalg.norm(up_in_world), WORLD_UP, atol=1e-9)
    np.testing.assert_allclose(mesh.vertices.min(axis=0) + mesh.vertices.max(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(mesh.vertices.max(axis=0) - mesh.vertices.min(axis=0), 2.0, atol=1e-6)
    # The normalised +Z side (world up) is now the top (+Y) of the model.
    top = mesh.face_normals[:, 1] > 0.99
    assert top.any() and (side_index(vertices[faces[top]].mean(axis=1)) == 4).all()

    matched, checked = check_side_colors(vertices, mesh.faces, mesh.visual.uv, image)
    assert checked > 50 and matched == checked
    # The same check on V-flipped coordinates fails, so it would catch a flip.
    flipped = mesh.visual.uv * [1, -1] + [0, 1]
    assert check_side_colors(vertices, mesh.faces, flipped, image)[0] < 0.5 * checked


def test_untextured_glb_is_the_same_shape_in_grey(baked_cube, tmp_path, validate_glb):
    """The viewer's shaded model: no UVs or texture, a grey material, the textured GLB's frame."""
    vertices, faces = baked_cube["vertices"], baked_cube["faces"]
    textured, shaded = tmp_path / "model.glb", tmp_path / "model_shaded.glb"
    world_from_textured = export.write_glb(textured, vertices, faces, baked_cube["uvs"], baked_cube["texture"],
                                           WORLD_FROM_NORMALISED, up=WORLD_UP)
    world_from_shaded = export.write_glb(shaded, vertices, faces, None, None, WORLD_FROM_NORMALISED, up=WORLD_UP)

    report = validate_glb(shaded)
    assert report["issues"]["numErrors"] == 0 and report["issues"]["numWarnings"] == 0, report["issues"]["messages"]
    gltf = export.read_glb_json(shaded)
    assert "textures" not in gltf and "images" not in gltf
    assert set(gltf["meshes"][0]["primitives"][0]["attributes"]) == {"POSITION", "NORMAL"}
    assert gltf["materials"][0]["pbrMetallicRoughness"]["baseColorFactor"] == [export.SHADED_GREY] * 3 + [1.0]
    np.testing.assert_array_equal(world_from_shaded, world_from_textured)
    np.testing.assert_array_equal(trimesh.load(shaded, process=False).to_geometry().vertices,
                                  trimesh.load(textured, process=False).to_geometry().vertices)
    with pytest.raises(ValueError, match="both uvs and a texture"):
        export.write_glb(shaded, vertices, faces, baked_cube["uvs"], None, WORLD_FROM_NORMALISED)


def test_glb_scale_and_antiparallel_up(baked_cube, tmp_path):
    path = tmp_path / "model.glb"
    vertices = baked_cube["vertices"]
    world_from_glb = export.write_glb(path, vertices, baked_cube["faces"], baked_cube["uvs"], baked_cube["texture"],
                                      WORLD_FROM_NORMALISED, up=-WORLD_ROTATION[:, 1], scale=0.5)
    glb = trimesh.load(path, process=False).to_geometry().vertices
    np.testing.assert_allclose(glb.max(axis=0) - glb.min(axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(apply(world_from_glb, glb), apply(WORLD_FROM_NORMALISED, vertices), atol=1e-5)
    # World up = normalised -Y: the half turn must be a proper rotation taking it to +Y.
    glb_from_normalised = np.linalg.inv(world_from_glb) @ WORLD_FROM_NORMALISED
    np.testing.assert_allclose(glb_from_normalised[:3, :3] @ [0.0, -1.0, 0.0], [0.0, 0.5, 0.0], atol=1e-9)
    assert np.linalg.det(glb_from_normalised[:3, :3]) > 0


def test_read_world_from_model_rejects_a_glb_without_it(tmp_path):
    path = tmp_path / "foreign.glb"
    path.write_bytes(trimesh.creation.box().export(file_type="glb"))
    with pytest.raises(PipelineError, match="world_from_model"):
        export.read_world_from_model(path)


# ----------------------------------------------------------------------------------------- OBJ
def test_obj_zip_reloads_with_texture_and_colours(baked_cube, tmp_path):
    path = tmp_path / "model.zip"
    vertices, faces = baked_cube["vertices"], baked_cube["faces"]
    written = export.write_obj_zip(path, vertices, faces, baked_cube["uvs"], baked_cube["texture"],
                                   WORLD_FROM_NORMALISED, up=WORLD_UP)
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["model.mtl", "model.obj", "model.png"]
        archive.extractall(tmp_path / "unzipped")
        header = archive.read("model.obj").decode().splitlines()[1].split()
    assert header[:2] == ["#", "world_from_model"]
    np.testing.assert_array_equal(np.array(header[2:], dtype=float).reshape(4, 4), written)

    mesh = trimesh.load(tmp_path / "unzipped" / "model.obj", process=False)
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    assert mesh.visual.material.image.size == (TEXTURE_SIZE, TEXTURE_SIZE)
    assert mesh.vertices.shape == vertices.shape
    np.testing.assert_allclose(apply(written, mesh.vertices), apply(WORLD_FROM_NORMALISED, vertices), atol=1e-5)
    matched, checked = check_side_colors(vertices, mesh.faces, mesh.visual.uv, mesh.visual.material.image)
    assert checked > 50 and matched == checked
