"""Browser uploads -> what `pipeline.importers.load_capture` reads.

The drop zone delivers each file in its own temporary folder, under its original name. Loose
files go to the loader as a list (it matches photos, masks and camera files by name); one .zip of
a capture folder is unpacked, safely, and read as a folder. Files the loader would not use, and
files named like photos whose content is not one, are left out with a notice rather than failing
the run; so is every photo the run will turn or resize (`pipeline.importers.plan_capture`), all at
once. `check_uploads` applies the `InputLimits` from file sizes and the archive's directory
alone, so a bad upload is refused before it waits for the GPU or anything is unpacked.
"""

from __future__ import annotations

import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, List, Optional, Sequence, Union

from pipeline.errors import PipelineError
from pipeline.importers import plan_capture
from pipeline.importers.pixels import FORMATS as PHOTO_FORMATS
from pipeline.importers.sources import MASK_FOLDERS, is_image, is_mask
from pipeline.limits import DEFAULT_LIMITS, MiB, InputLimits, describe, sniff

_COPY_CHUNK = 1024 * 1024
# What zipfile raises for a damaged, encrypted or oddly compressed archive (zlib's for a bad
# deflate stream, RuntimeError for a password).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, ValueError,
               RuntimeError, zlib.error)
# Members smaller than this may compress better than `max_compression_ratio` (a flat mask PNG
# inside a zip, a short text file): only the archive as a whole is held to the ratio then.
_RATIO_FLOOR_BYTES = 1 * MiB

CAMERA_FILE_HELP = (
    "transforms.json / transforms_train.json, cameras.json, poses_bounds.npy, or a COLMAP model "
    "(cameras, images[, points3D] as .bin or .txt)"
)
_CAMERA_FILE_NAME = re.compile(
    r"^(transforms(_\w+)?\.json|cameras\.json|poses_bounds\.npy|(cameras|images|points3D|rigs|frames)\.(bin|txt))$"
)
# Files that archivers add and nobody means as input (macOS resource forks, Finder and
# Explorer metadata).
_ARCHIVE_JUNK = re.compile(r"(^|/)(__MACOSX/|\._|\.DS_Store$|Thumbs\.db$)")


@dataclass
class Uploads:
    """The uploads, sorted out."""

    source: Union[Path, List[Path]]  # for load_capture: an unpacked folder, or the loose files
    photos: List[Path]  # the photos (not masks), in name order, for the gallery
    notices: List[str] = field(default_factory=list)  # files left out, and why
    # Upload paths as messages should show them: temporary folders mean nothing to the user.
    shown_as: Dict[str, str] = field(default_factory=dict)

    def tidy(self, message: str) -> str:
        """``message`` with every upload path replaced by the name the user knows."""
        for path in sorted(self.shown_as, key=len, reverse=True):
            message = message.replace(path, self.shown_as[path])
        return message


def is_camera_file(path: Path) -> bool:
    return bool(_CAMERA_FILE_NAME.match(path.name))


def check_uploads(files: Optional[Sequence[Union[str, Path]]], limits: InputLimits = DEFAULT_LIMITS) -> None:
    """Refuse, with a PipelineError that says what to do, uploads beyond ``limits`` or that cannot
    be one capture; reads only file sizes, first bytes and an archive's directory."""
    paths = _checked_paths(files, limits)
    if paths[0].suffix.lower() == ".zip":
        with _open_zip(paths[0]) as zf:
            _safe_members(zf, paths[0], limits)


def sort_uploads(files: Optional[Sequence[Union[str, Path]]], workdir: Path,
                 limits: InputLimits = DEFAULT_LIMITS) -> Uploads:
    """Sort the uploaded ``files`` into a capture source; a .zip is unpacked under ``workdir``.

    Raises PipelineError when there is nothing to use, beyond ``limits``, or for a bad or unsafe zip.
    """
    paths = _checked_paths(files, limits)
    if paths[0].suffix.lower() == ".zip":
        return _unpacked(paths[0], workdir, limits)  # checks the archive's members as it goes

    kept, notices = [], []
    for path in paths:
        if is_image(path):
            if _is_photo(path, notices):
                kept.append(path)
        elif is_camera_file(path):
            kept.append(path)
        elif path.suffix.lower() in (".json", ".npy", ".bin", ".txt"):
            notices.append(f"{path.name}: not a camera file name the app knows, so it was left out. "
                           f"If it holds the cameras, rename it: {CAMERA_FILE_HELP}.")
        else:
            notices.append(f"{path.name}: not a photo (JPEG, PNG or WebP), mask, camera file or .zip; left out.")
    if not any(is_image(p) for p in kept):
        why = f" ({notices[0]})" if notices else ""
        raise PipelineError(f"None of the uploaded files is a photo: {', '.join(p.name for p in paths[:5])}{why}. "
                            "Upload JPEG, PNG or WebP photos of the object (at least 3).")
    photos = sorted((p for p in kept if is_image(p) and not is_mask(p)), key=lambda p: p.name)
    shown_as = {str(p): p.name for p in paths}
    uploads = Uploads(source=kept, photos=photos, notices=notices, shown_as=shown_as)
    uploads.notices += _photo_notes(uploads, limits)
    return uploads


def _photo_notes(uploads: "Uploads", limits: InputLimits) -> List[str]:
    """Every photo the run will leave out, turn or resize, said once at upload time (from the
    photos' headers: nothing is decoded), or the error the run would stop with."""
    try:
        return [uploads.tidy(note) for note in plan_capture(uploads.source, limits=limits)]
    except PipelineError as error:
        return [f"Run will stop here: {uploads.tidy(str(error))}"]


def _checked_paths(files: Optional[Sequence[Union[str, Path]]], limits: InputLimits) -> List[Path]:
    """The uploads as paths, after the checks that need only names and sizes: some files, one .zip
    alone or loose files, the count and the bytes of each and in all."""
    paths = [Path(f) for f in (files or [])]
    if not paths:
        raise PipelineError("No files uploaded: drop the photos (and masks and camera file) or one .zip of the capture folder.")
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    if zips and len(paths) > 1:
        raise PipelineError(
            f"{zips[0].name} came with {len(paths) - 1} other file(s): upload either one .zip of the capture "
            "folder or the loose photos, masks and camera file, not both."
        )
    limits.check_count(len(paths), "The upload")
    total = 0
    for path in paths:
        size = path.stat().st_size
        limits.check_bytes(path, size, camera_file=is_camera_file(path))
        total += size
    limits.check_total(total, "The upload")
    return paths


def _is_photo(path: Path, notices: List[str], shown: Optional[str] = None) -> bool:
    """Whether a file named like a photo holds one (by content); a notice says why not."""
    if sniff(path) in PHOTO_FORMATS:
        return True
    notices.append(f"{shown or path.name}: named like a photo, but its content is {describe(path)}; left out.")
    return False


def _open_zip(archive: Path) -> zipfile.ZipFile:
    if sniff(archive) != "zip":
        raise PipelineError(f"{archive.name}: not a zip archive (its content is {describe(archive)}). "
                            "Zip the capture folder again, or upload the photos themselves.")
    try:
        return zipfile.ZipFile(archive)
    except _ZIP_ERRORS as e:
        raise PipelineError(f"{archive.name}: not a readable zip file ({e}). Zip the capture folder again "
                            "(without a password).") from None


def _unpacked(archive: Path, workdir: Path, limits: InputLimits) -> Uploads:
    target = workdir / archive.stem
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    try:
        with _open_zip(archive) as zf:
            for info, parts in _safe_members(zf, archive, limits):
                _extract(zf, info, target.joinpath(*parts), archive.name)
    except _ZIP_ERRORS as e:
        raise PipelineError(f"{archive.name}: not a readable zip file ({e}). Zip the capture folder again "
                            "(without a password).") from None
    root = _single_folder(target)
    notices: List[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_image(p)):
        if not _is_photo(path, notices, shown=f"{archive.name}: {path.relative_to(target).as_posix()}"):
            path.unlink()
    photos = sorted(
        (p for p in root.rglob("*") if p.is_file() and is_image(p) and not is_mask(p)
         and not _in_mask_folder(p, root)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not photos:
        raise PipelineError(f"{archive.name} holds no photos (JPEG, PNG or WebP). Zip the folder that holds them.")
    uploads = Uploads(source=root, photos=photos, notices=notices,
                      shown_as={str(root): archive.name, str(archive): archive.name})
    uploads.notices += _photo_notes(uploads, limits)
    return uploads


def _safe_members(zf: zipfile.ZipFile, archive: Path, limits: InputLimits) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """(member, path parts) to extract; refuses members that could land outside the target folder,
    links, and archives beyond ``limits`` (count, unpacked bytes, compression ratio: zip bombs)."""
    label = archive.name
    members, total = [], 0
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        if info.is_dir() or _ARCHIVE_JUNK.search(name):
            continue
        parts = PurePosixPath(name).parts
        if name.startswith("/") or PureWindowsPath(info.filename).drive or ".." in parts:
            raise PipelineError(f"{label}: member '{info.filename}' points outside the archive (absolute path or '..'). "
                                "Zip the capture folder itself, with relative paths.")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise PipelineError(f"{label}: member '{info.filename}' is a symbolic link; links are not accepted. "
                                "Zip the files themselves.")
        if info.file_size > _RATIO_FLOOR_BYTES and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1):
            raise PipelineError(f"{label}: member '{info.filename}' unpacks {info.file_size / max(info.compress_size, 1):.0f} "
                                f"times larger than it is packed (more than {limits.max_compression_ratio:.0f}); photos do "
                                "not compress like that, so this is refused as a zip bomb.")
        limits.check_bytes(Path(name), info.file_size, camera_file=is_camera_file(Path(name)))
        total += info.file_size
        members.append((info, parts))
        limits.check_count(len(members), label)
        limits.check_total(total, f"{label} unpacked")
    if total > _RATIO_FLOOR_BYTES and total > limits.max_compression_ratio * max(archive.stat().st_size, 1):
        raise PipelineError(f"{label}: unpacks to {total / max(archive.stat().st_size, 1):.0f} times its size (more than "
                            f"{limits.max_compression_ratio:.0f}); photos do not compress like that, so this is refused "
                            "as a zip bomb.")
    return members


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, label: str) -> None:
    """Copy one member, stopping at its declared size (a forged header cannot inflate it further)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(info) as src, target.open("wb") as dst:
        while chunk := src.read(_COPY_CHUNK):
            written += len(chunk)
            if written > info.file_size:
                raise PipelineError(f"{label}: member '{info.filename}' unpacks to more than it declares. "
                                    "The archive is damaged or forged; zip the capture folder again.")
            dst.write(chunk)


def _single_folder(folder: Path) -> Path:
    """The capture folder inside an unpacked zip: a lone top-level folder is the usual case."""
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return _single_folder(entries[0])
    return folder


def _in_mask_folder(path: Path, root: Path) -> bool:
    return any(part.lower() in MASK_FOLDERS for part in path.relative_to(root).parts[:-1])
