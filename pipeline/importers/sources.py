"""Where a capture's files are: a folder, or a list of files (browser uploads arrive flattened)."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import PipelineError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
MASK_FOLDERS = ("masks", "mask")
_MASK_SUFFIXES = ("_mask", ".mask")

SourceLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_mask(path: Path) -> bool:
    """A mask by its name: inside a `masks/` folder, or named `<stem>_mask.png` / `<stem>.mask.png`."""
    return is_image(path) and (
        path.parent.name.lower() in MASK_FOLDERS or path.stem.lower().endswith(_MASK_SUFFIXES)
    )


def _mask_keys(path: Path) -> list[str]:
    """Image names a mask file can belong to: a.png, a_mask.png, a.mask.png -> 'a'; a.JPG.png -> 'a.JPG', 'a'."""
    stem = path.stem
    for suffix in _MASK_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    keys = [stem]
    if is_image(Path(stem)):
        keys.append(Path(stem).stem)
    return keys


class Source:
    """A folder (``root``) or an explicit list of files (``listed``), with lookups by relative path or name."""

    def __init__(self, source: SourceLike):
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise PipelineError(f"{path} does not exist: pass a folder of photos (and optional camera file).")
            self.root: Optional[Path] = path if path.is_dir() else None
            self.listed: list[Path] = [] if path.is_dir() else [path]
        else:
            self.root = None
            self.listed = [Path(p) for p in source]
            if not self.listed:
                raise PipelineError("No files given: pass a folder or a list of photos.")
            for path in self.listed:
                if not path.is_file():
                    raise PipelineError(f"{path} is not a file: check the list of photos passed in.")
        self.label = str(self.root) if self.root is not None else ", ".join(p.name for p in self.listed[:3]) + (
            ", ..." if len(self.listed) > 3 else ""
        )
        self._mask_index: dict[Path, dict[str, Path]] = {}

    def named(self, name: str) -> Optional[Path]:
        """A file called ``name`` in the folder, or among the listed files."""
        if self.root is not None:
            path = self.root / name
            return path if path.is_file() else None
        return next((p for p in self.listed if p.name == name), None)

    def listed_images(self) -> list[Path]:
        """Photos without a camera file, sorted by name: the folder's (else its `images/`'s) or the listed ones."""
        if self.root is None:
            return sorted((p for p in self.listed if is_image(p) and not is_mask(p)), key=lambda p: p.name)
        for folder in (self.root, self.root / "images"):
            found = images_in(folder)
            if found:
                return found
        return []

    def resolve(self, ref: str, base: Path) -> Optional[Path]:
        """The image a camera file means by ``ref`` (relative to ``base``, extension optional), or None.

        Only files of the capture are found: for a folder, paths inside it (a ``ref`` that leads out,
        absolute or through '..', is refused); for a list of files, one of them, by name.
        """
        ref = ref.replace("\\", "/")  # written on Windows
        name = Path(ref).name
        bare = not is_image(Path(name))  # no extension: match the stem of an image
        if self.root is None:
            hits = [p for p in self.listed if p.name == name or (bare and p.stem == name and is_image(p))]
            return hits[0] if len(hits) == 1 else None
        path = Path(os.path.normpath(base / ref))
        root = Path(os.path.normpath(self.root))
        if path != root and root not in path.parents:
            raise PipelineError(
                f"The camera file names '{ref}', which is outside the capture folder {self.root}. Put the photos "
                "in the capture folder and name them relative to the camera file."
            )
        if path.is_file():
            return path
        if bare and path.parent.is_dir():
            hits = [p for p in path.parent.glob(f"{glob.escape(path.name)}.*") if is_image(p) and p.stem == path.name]
            if len(hits) == 1:
                return hits[0]
        return None

    def name_of(self, path: Path) -> str:
        """How a view is called in messages and ``Capture.names``: its path in the folder, else its file name."""
        if self.root is not None:
            try:
                return path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return path.name

    def mask_for(self, image: Path) -> Optional[Path]:
        """The user's mask of ``image``: `<stem>_mask.*` / `<stem>.mask.*` beside it, or `<stem>.*` /
        `<name>.png` in a `masks/` folder beside it, beside its folder or in the capture folder."""
        folders = [image.parent, image.parent / "masks", image.parent / "mask"]
        if self.root is not None:
            if image.parent != self.root:
                folders += [image.parent.parent / "masks", image.parent.parent / "mask"]
            folders += [self.root / "masks", self.root / "mask"]
        indexes = [self._index(f) for f in dict.fromkeys(folders)]
        if self.root is None:
            indexes.append({key: p for p in self.listed if is_mask(p) for key in _mask_keys(p)})
        for index in indexes:
            hit = index.get(image.name) or index.get(image.stem)
            if hit is not None and hit != image:
                return hit
        return None

    def _index(self, folder: Path) -> dict[str, Path]:  # mask files in a folder by the image name they belong to
        if folder not in self._mask_index:
            files = [p for p in images_in(folder, masks=True) if is_mask(p)] if folder.is_dir() else []
            self._mask_index[folder] = {key: p for p in files for key in _mask_keys(p)}
        return self._mask_index[folder]


def images_in(folder: Path, masks: bool = False) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (LLFF row order); masks left out unless ``masks``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p) and (masks or not is_mask(p)))
