"""Decode one image file into RGB pixels in the orientation its annotations use, or say why it cannot be.

Every image the pipeline reads goes through :func:`load_image` (PIL only: ``torchvision.io.decode_jpeg`` does
not work with the registry's CUDA-linked torchvision over the CPU torch build: ``_torchvision_compat.py``). Real
datasets hold files that a plain ``Image.open(p).convert("RGB")`` gets wrong without a word:

* **truncated files** (interrupted downloads). PIL fills the missing rows with grey when any library has set
  the process-global ``ImageFile.LOAD_TRUNCATED_IMAGES = True``; we force a full decode *and* check the
  end-of-image marker of JPEG / PNG files ourselves, so truncation is caught whatever that flag says;
* **other pixel modes**: grayscale, CMYK (print JPEGs), palette PNG/GIF, RGBA; converted to RGB and
  reported in :attr:`DecodedImage.conversions`;
* **EXIF orientation**: phone photos store pixels sideways plus an Orientation tag. Which orientation the
  annotations were drawn in depends on the tool, so the annotation's ``width``/``height`` decide (see
  :func:`load_image`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.untrusted import UntrustedInputError, open_regular, read_bounded_bytes

BadImageKind = Literal["missing", "unreadable", "truncated", "size_mismatch"]

# The largest image file read: well above any photo PIL decodes within its decompression-bomb limit, far below
# what would exhaust memory.
MAX_IMAGE_BYTES = 1 << 30

# EXIF orientations 5..8 swap width and height when applied (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

# PIL mode -> the name used in DecodedImage.conversions. Modes not listed here (16/32-bit integer and float
# images) have no single right mapping to 8-bit RGB, so they are rejected rather than silently clipped.
_MODE_CONVERSIONS = {
    "1": "grayscale->rgb",
    "L": "grayscale->rgb",
    "LA": "grayscale+alpha->rgb",
    "La": "grayscale+alpha->rgb",
    "P": "palette->rgb",
    "PA": "palette->rgb",
    "RGBA": "rgba->rgb",
    "RGBa": "rgba->rgb",
    "RGBX": "rgba->rgb",
    "CMYK": "cmyk->rgb",
    "YCbCr": "ycbcr->rgb",
    "LAB": "lab->rgb",
    "HSV": "hsv->rgb",
}


class BadImageError(PipelineError):
    """An image that cannot be used as it is; ``kind`` says why and the message says what to do."""

    def __init__(self, kind: BadImageKind, path: str | Path, message: str) -> None:
        super().__init__(message)
        self.kind: BadImageKind = kind
        self.path = str(path)

    def __reduce__(self):  # rebuilt from all three arguments when pickled (to or from a dask worker)
        return type(self), (self.kind, self.path, str(self))


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels plus what was done to them.

    Attributes:
        pixels: ``(H, W, 3)`` uint8 RGB in ``0..255``, C-contiguous, in the orientation the annotations use.
        conversions: steps applied, in order, e.g. ``("exif-rotated", "cmyk->rgb")``; empty for a plain
            RGB file. ``"exif-ignored"`` means the file has an EXIF rotation that was *not* applied
            because the annotation size matches the stored (raw) pixels.
    """

    pixels: np.ndarray
    conversions: tuple[str, ...]

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``, the order COCO's JSON and PIL use."""
        return self.pixels.shape[1], self.pixels.shape[0]


def load_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> DecodedImage:
    """Fully decode ``path`` to RGB and orient it as the annotations expect.

    Args:
        path: image file (any format PIL reads; the extension is not trusted, the content decides).
        expected_size: ``(width, height)`` from the annotation JSON, or None.

    Orientation: with ``expected_size``, the EXIF rotation is applied when the rotated size matches it;
    when only the stored (raw) size matches, the rotation is skipped (``"exif-ignored"``); when neither
    matches the file and the JSON disagree and a ``size_mismatch`` error names both sizes. Without
    ``expected_size`` the EXIF rotation is always applied, as an image viewer would.

    Raises:
        BadImageError: ``kind`` is ``missing`` (no such file), ``unreadable`` (not an image PIL can decode,
            or an unsupported pixel mode), ``truncated`` (the data stops before the end of the image) or
            ``size_mismatch`` (decoded size differs from ``expected_size``).
    """
    image, conversions = load_rgb(path, expected_size)
    pixels = np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    return DecodedImage(pixels=pixels, conversions=conversions)


def load_rgb(path: str | Path, expected_size: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[str, ...]]:
    """:func:`load_image` without the pixel array: the decoded, oriented PIL image (mode ``RGB``) and the conversions.

    For callers that crop and resize in PIL (``pack``) or only check the file (``prepare``): copying a COCO
    image into numpy costs about a third of its decode. Same checks and errors as :func:`load_image`.
    """
    path = Path(path)
    data = _read_bytes(path)
    image = _decode(path, data)
    conversions: list[str] = []

    orientation = exif_orientation(image)
    raw_size = image.size
    shown_size = raw_size[::-1] if orientation in _SWAPPING_ORIENTATIONS else raw_size
    if orientation == 1:
        if expected_size is not None and tuple(expected_size) != raw_size:
            raise _size_mismatch(path, expected_size, f"the file is {_wh(raw_size)}")
    elif expected_size is None or tuple(expected_size) == shown_size:
        image = ImageOps.exif_transpose(image)
        conversions.append("exif-rotated")
    elif tuple(expected_size) == raw_size:
        conversions.append("exif-ignored")
    else:
        raise _size_mismatch(
            path, expected_size, f"the file is {_wh(raw_size)} stored, {_wh(shown_size)} after its EXIF rotation"
        )

    if image.mode != "RGB":
        if image.mode not in _MODE_CONVERSIONS:
            raise BadImageError(
                "unreadable",
                path,
                f"image {str(path)!r} has pixel mode {image.mode!r} (16/32-bit or float), which has no single "
                "8-bit RGB meaning; re-encode it as an 8-bit RGB JPEG or PNG",
            )
        conversions.append(_MODE_CONVERSIONS[image.mode])
        # convert("RGB") drops alpha and keeps the stored colour under it, as the usual COCO loaders do.
        image = image.convert("RGB")
    # PIL copies a file's JPEG comment into every JPEG saved from its crops; the pixels are all we use
    image.info.clear()
    return image, tuple(conversions)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; anything but a regular file (a FIFO, a device, a folder) is refused unopened."""
    try:
        return read_bounded_bytes(path, f"image {str(path)!r}", MAX_IMAGE_BYTES)
    except UntrustedInputError as err:
        if err.kind == "missing":
            raise BadImageError(
                "missing",
                path,
                f"image {str(path)!r} does not exist; download it again or fix the split's images folder / file_name",
            ) from None
        raise BadImageError("unreadable", path, str(err)) from None


def _decode(path: Path, data: bytes) -> Image.Image:
    """Open and fully decode ``data`` (``.load()``), then check that the file really reached its end."""
    if not data:
        raise BadImageError("truncated", path, f"image {str(path)!r} is empty (0 bytes); download it again")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # Image.open only reads the header; decoding is where truncation and corruption show up
    except Image.DecompressionBombError as err:
        raise BadImageError("unreadable", path, f"image {str(path)!r} refused: {err}") from None
    except UnidentifiedImageError:
        raise BadImageError(
            "unreadable",
            path,
            f"image {str(path)!r} is not in any image format PIL knows (it starts with {data[:16]!r}); the file is "
            "corrupt or something else (e.g. an HTML error page saved by a failed download): download it again",
        ) from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises SyntaxError for some broken chunks
        if "truncated" in str(err):
            raise _truncated(path, str(err)) from None
        raise BadImageError(
            "unreadable",
            path,
            f"image {str(path)!r} cannot be decoded ({err}); the file is corrupt or not an image: "
            "download it again or re-encode it",
        ) from None
    if not _reaches_end_marker(image.format, data):
        raise _truncated(path, f"no end-of-image marker in the {image.format} data")
    return image


def _reaches_end_marker(fmt: str | None, data: bytes) -> bool:
    """Whether JPEG / PNG data contains its end marker; other formats rely on PIL's own check.

    Independent of ``ImageFile.LOAD_TRUNCATED_IMAGES``: with that flag set by any library, PIL decodes a cut
    file without error and fills the rest with grey, so the marker is checked on the bytes.
    """
    if fmt in ("JPEG", "MPO"):
        # EOI (FFD9) must follow the last start-of-scan (FFDA). Inside entropy-coded data every FF byte is
        # stuffed (FF00) or a restart marker, so neither marker can occur there by chance. Looking after the
        # last SOS skips the EOI of an EXIF thumbnail, which sits in a header segment before the scans.
        last_sos = data.rfind(b"\xff\xda")
        return last_sos >= 0 and data.find(b"\xff\xd9", last_sos) >= 0
    if fmt == "PNG":
        return data.rfind(b"IEND") >= 0
    return True


def header_sizes(path: str | Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(stored, shown)`` ``(width, height)`` of an image from its header alone (shown = after EXIF rotation).

    An annotation file may describe either (see :func:`load_image`); callers accept both.
    """
    with open(open_regular(path, f"image {str(path)!r}"), "rb") as stream, Image.open(stream) as image:
        raw = image.size
        shown = raw[::-1] if exif_orientation(image) in _SWAPPING_ORIENTATIONS else raw
    return raw, shown


def exif_orientation(image: Image.Image) -> int:
    """EXIF Orientation tag (1..8), 1 when absent, invalid or the EXIF block itself is unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _truncated(path: Path, detail: str) -> BadImageError:
    return BadImageError(
        "truncated",
        path,
        f"image {str(path)!r} is truncated ({detail}); the download was probably interrupted: download it again",
    )


def _size_mismatch(path: Path, expected_size: tuple[int, int], found: str) -> BadImageError:
    return BadImageError(
        "size_mismatch",
        path,
        f"image {str(path)!r}: the annotation JSON says {_wh(tuple(expected_size))} but {found}; "
        "fix width/height in the JSON, or replace the image with the one the annotations were made on",
    )


def _wh(size: tuple[int, ...]) -> str:
    return f"{size[0]}x{size[1]} (width x height)"
