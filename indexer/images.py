"""Image cells of input rows: parse them when a row is read, decode them only when encoded.

A row's image column holds a local path (relative paths are taken from the data file's
folder), raw bytes (a Parquet binary column), or a dict ``{"bytes": ..., "path": ...}``
as Hugging Face ``datasets`` writes its ``Image`` feature. Reading a row only records
where the image is (:class:`ImageRef`); the file is opened and decoded by
:func:`open_image` when the sample reaches the model, one sample at a time, so a corpus
of images is never held in memory. A missing or undecodable image raises
:class:`ImageError`, one line naming the row and the field, which the build may skip
and count (``--on-bad skip``).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forvalue.schemas.errors import InputDataError

# 512 visual tokens of Qwen2-VL (28 x 28 pixels each): about 634 x 634 pixels.
DEFAULT_IMAGE_MAX_PIXELS = 512 * 28 * 28


class ImageError(InputDataError):
    """An image cell points at a missing file or at bytes that do not decode as an image."""


@dataclass(frozen=True)
class ImageRef:
    """Where a row's image is; nothing is read until :func:`open_image`.

    Attributes
    ----------
    path : Path or None
        Resolved local file (set when the cell is a path and carries no bytes).
    data : bytes or None
        Encoded image bytes (PNG, JPEG, ...) from the cell itself.
    key : str
        Stable identity used in content ids: the path as written in the cell, or
        ``sha256:<hex>`` of the bytes.
    source : str
        ``"file:line"`` (or ``"file:row"``) of the row, for messages.
    column : str
        The image column's name, for messages.
    """

    path: Path | None
    data: bytes | None
    key: str
    source: str
    column: str

    def content_sha256(self) -> str:
        """SHA-256 of the image file or bytes (reads the file; used for validation caches)."""
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError as exc:
            raise self.error(f"cannot read image '{self.path}' ({exc.strerror or exc})") from None

    def error(self, message: str) -> ImageError:
        return ImageError(self.source, message, field=self.column)


def parse_image_cell(value: Any, base_dir: Path, source: str, column: str) -> ImageRef:
    """An :class:`ImageRef` for one cell.

    Raises :class:`~forvalue.schemas.errors.InputDataError` on a cell of the wrong type.

    Parameters
    ----------
    value : str, bytes or dict
        A path, encoded bytes, or ``{"bytes": bytes | None, "path": str | None}``.
    base_dir : Path
        Folder that relative paths are resolved against (the data file's folder).
    source : str
        ``"file:line"`` of the row.
    column : str
        Name of the image column.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            value = data
        elif path is not None:
            value = path
        else:
            raise InputDataError(source, "image dict has neither 'bytes' nor 'path'", field=column)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise ImageError(source, "empty image bytes", field=column)
        return ImageRef(None, data, "sha256:" + hashlib.sha256(data).hexdigest(), source, column)
    if isinstance(value, str):
        if not value.strip():
            raise InputDataError(
                source, "empty value; give an image path relative to the data file's folder", field=column
            )
        path = Path(value).expanduser()
        return ImageRef(path if path.is_absolute() else base_dir / path, None, value, source, column)
    raise InputDataError(
        source, f"expected an image path, bytes or a {{'bytes', 'path'}} dict, got {type(value).__name__}", field=column
    )


def open_image(ref: ImageRef, max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS):
    """Decode an image as RGB, downscaled (aspect ratio kept) to at most ``max_pixels`` pixels.

    Parameters
    ----------
    ref : ImageRef
    max_pixels : int
        Upper bound on ``width * height`` before the model's own processor runs (which
        may round the size further, e.g. to multiples of 28 for Qwen2-VL); 0 keeps the
        image's size.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, fully decoded.

    Raises
    ------
    ImageError
        The file is missing or unreadable, or the data is not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    fix = "fix the image or the row, or pass --on-bad skip to skip and count such rows"
    shown = f"'{ref.path}'" if ref.data is None else "in the row's bytes"
    try:
        stream = io.BytesIO(ref.data) if ref.data is not None else ref.path.open("rb")
    except FileNotFoundError:
        raise ref.error(
            f"image file '{ref.path}' does not exist (relative paths are read from the data file's folder); {fix}"
        ) from None
    except OSError as exc:
        raise ref.error(f"cannot read image '{ref.path}' ({exc.strerror or exc}); {fix}") from None
    try:
        with stream, Image.open(stream) as img:
            img.load()  # decode now: a truncated file fails here, not inside the processor
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ref.error(f"image {shown} does not decode ({first}); {fix}") from None
    return _downscale(rgb, max_pixels)


def _downscale(img, max_pixels: int):
    width, height = img.size
    if not max_pixels or width * height <= max_pixels:
        return img
    scale = math.sqrt(max_pixels / (width * height))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    from PIL import Image

    return img.resize(size, Image.Resampling.BICUBIC)
