"""What input the pipeline accepts at most, checked before anything is decoded or unpacked.

One `InputLimits` holds every limit (docs/SECURITY.md lists them and why). The importers apply it
to what they read (photo count, file sizes, pixels from the image header, camera file size); the
app applies it to uploads as well (file count and bytes, archives). Files are recognised by their
first bytes, not their names: a ``.png`` that is not a PNG, JPEG, WebP, TIFF or BMP is not a photo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import PipelineError

MiB = 1024**2
GiB = 1024**3

# Leading bytes of the formats Pillow reads for us. Only the start counts: a file that is a PNG
# at its start and a zip at its end (a polyglot) is a PNG here, and is never unpacked.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
ZIP_SIGNATURE = b"PK\x03\x04"


@dataclass(frozen=True)
class InputLimits:
    """Upper bounds on one job's input. The defaults fit 100 photos of 48 megapixels with masks."""

    max_files: int = 500  # photos, masks and camera files, loose or inside one archive
    max_file_bytes: int = 100 * MiB  # any one file (a 48 MP JPEG is about 25 MB)
    max_total_bytes: int = 2 * GiB  # all files together, and an archive's unpacked contents
    max_image_pixels: int = 64_000_000  # width x height of one photo or mask, read from its header
    max_compression_ratio: float = 100.0  # unpacked : packed, for an archive and each large member
    max_camera_file_bytes: int = 64 * MiB  # transforms.json, cameras.json, poses_bounds.npy, COLMAP files

    def check_count(self, count: int, what: str) -> None:
        if count > self.max_files:
            raise PipelineError(f"{what}: {count} files, more than the {self.max_files} one job takes. "
                                "Upload only the photos (up to 100 or so), their masks and one camera file.")

    def check_bytes(self, path: Path, size: int, camera_file: bool = False) -> None:
        limit = self.max_camera_file_bytes if camera_file else self.max_file_bytes
        if size > limit:
            fix = ("No camera file of one capture is that large: check that this is the right file." if camera_file
                   else "Export it at a lower quality or size.")
            raise PipelineError(f"{path.name}: {size / MiB:.0f} MB, more than the {limit / MiB:.0f} MB "
                                f"{'a camera file' if camera_file else 'a file'} may have. {fix}")

    def check_total(self, total: int, what: str) -> None:
        if total > self.max_total_bytes:
            raise PipelineError(f"{what}: {total / GiB:.1f} GB in all, more than {self.max_total_bytes / GiB:.1f} GB. "
                                "Use fewer or smaller photos.")

    def check_pixels(self, path: Path, height: int, width: int) -> None:
        if height * width > self.max_image_pixels:
            raise PipelineError(
                f"{path.name}: {width}x{height} pixels ({height * width / 1e6:.0f} megapixels), more than the "
                f"{self.max_image_pixels / 1e6:.0f} megapixels a photo may have. Downscale it (the pipeline works "
                "at 2048 px or less anyway)."
            )


DEFAULT_LIMITS = InputLimits()


def sniff(path: Path) -> Optional[str]:
    """The format of ``path`` from its first bytes: 'PNG', 'JPEG', 'WebP', 'TIFF', 'BMP', 'zip', or None."""
    with open(path, "rb") as f:
        head = f.read(16)
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith(ZIP_SIGNATURE):
        return "zip"
    return None


def describe(path: Path) -> str:
    """What a file that is not a photo looks like, for messages: 'empty', 'text', 'a zip archive', ..."""
    known = sniff(path)
    if known is not None:
        return f"a {known} {'archive' if known == 'zip' else 'image'}"
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<svg", b"<?xml")):
        return "markup (HTML/SVG/XML)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown kind"
    printable = all(c.isprintable() or c in "\t\r\n" for c in text)
    return "text" if printable else "binary data of an unknown kind"
