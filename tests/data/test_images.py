"""load_image: every mode conversion, EXIF orientation rule and failure kind, on files made here with PIL."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from picosam_pipeline.data.images import BadImageError, load_image
from picosam_pipeline.errors import PipelineError


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """A (40, 64, 3) uint8 test picture: smooth ramps (survive JPEG) plus a sharp corner marker."""
    yy, xx = np.mgrid[0:40, 0:64]
    pixels = np.stack([xx * 4, yy * 6, 255 - xx * 3], -1).astype(np.uint8)
    pixels[:8, :8] = 255  # top-left marker to tell orientations apart
    return pixels


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _raises(path: Path, kind: str, expected_size=None) -> BadImageError:
    with pytest.raises(BadImageError) as info:
        load_image(path, expected_size)
    err = info.value
    assert isinstance(err, PipelineError)
    assert err.kind == kind
    assert err.path == str(path)
    assert str(path) in str(err)  # the message names the file
    return err


def test_rgb_png_is_returned_unchanged(tmp_path, rgb):
    out = load_image(_save(tmp_path / "a.png", Image.fromarray(rgb)), expected_size=(64, 40))
    assert out.conversions == ()
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (40, 64, 3) and out.pixels.flags.c_contiguous
    np.testing.assert_array_equal(out.pixels, rgb)
    assert out.size == (64, 40)


def test_rgb_jpeg_decodes_close_to_source(tmp_path, rgb):
    out = load_image(_save(tmp_path / "a.jpg", Image.fromarray(rgb), quality=95))
    assert out.conversions == ()
    assert np.abs(out.pixels.astype(int) - rgb).mean() < 4


def test_grayscale_is_replicated_to_three_channels(tmp_path, rgb):
    gray = Image.fromarray(rgb).convert("L")
    out = load_image(_save(tmp_path / "g.png", gray))
    assert out.conversions == ("grayscale->rgb",)
    for c in range(3):
        np.testing.assert_array_equal(out.pixels[..., c], np.asarray(gray))


def test_cmyk_jpeg_is_converted(tmp_path, rgb):
    path = _save(tmp_path / "c.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    assert out.conversions == ("cmyk->rgb",)
    assert out.pixels.shape == (40, 64, 3)
    assert np.abs(out.pixels.astype(int) - rgb).mean() < 12  # PIL's naive CMYK round trip plus JPEG loss


def test_palette_png_is_expanded(tmp_path, rgb):
    palette = Image.fromarray(rgb).quantize(colors=16)
    out = load_image(_save(tmp_path / "p.png", palette))
    assert out.conversions == ("palette->rgb",)
    np.testing.assert_array_equal(out.pixels, np.asarray(palette.convert("RGB")))


def test_palette_gif_named_png_is_decoded_by_content(tmp_path, rgb):
    path = _save(tmp_path / "p.png", Image.fromarray(rgb).quantize(colors=16), format="GIF")
    assert load_image(path).conversions == ("palette->rgb",)


def test_rgba_drops_alpha(tmp_path, rgb):
    rgba = np.concatenate([rgb, np.full((40, 64, 1), 128, np.uint8)], -1)
    out = load_image(_save(tmp_path / "a.png", Image.fromarray(rgba)))
    assert out.conversions == ("rgba->rgb",)
    np.testing.assert_array_equal(out.pixels, rgb)


def test_16_bit_is_rejected_not_clipped(tmp_path):
    path = _save(tmp_path / "deep.png", Image.fromarray(np.full((8, 8), 40000, np.uint16)))
    assert "pixel mode" in str(_raises(path, "unreadable"))


# --------------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.fixture
def rotated(tmp_path, rgb) -> Path:
    """Displayed image = ``rgb`` (64 x 40); stored turned 90 deg back (40 x 64) with Orientation=6. PNG: lossless."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    stored = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)
    return _save(tmp_path / "r.png", stored, exif=exif.tobytes())


@pytest.mark.parametrize("expected_size", [None, (64, 40)])
def test_exif_rotation_applied_when_annotations_use_the_displayed_size(rotated, rgb, expected_size):
    assert Image.open(rotated).size == (40, 64)
    out = load_image(rotated, expected_size)
    assert out.conversions == ("exif-rotated",)
    np.testing.assert_array_equal(out.pixels, rgb)


def test_exif_rotation_ignored_when_annotations_use_the_stored_size(rotated, rgb):
    out = load_image(rotated, expected_size=(40, 64))
    assert out.conversions == ("exif-ignored",)
    np.testing.assert_array_equal(out.pixels, np.rot90(rgb))  # ROTATE_90 = counter-clockwise = np.rot90


def test_exif_rotation_with_neither_size_is_a_size_mismatch(rotated):
    msg = str(_raises(rotated, "size_mismatch", expected_size=(50, 50)))
    assert "50x50" in msg and "40x64" in msg and "64x40" in msg  # the JSON size and both file sizes


def test_exif_rotated_jpeg(tmp_path, rgb):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    stored = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)
    path = _save(tmp_path / "r.jpg", stored, quality=95, exif=exif.tobytes())
    out = load_image(path, expected_size=(64, 40))
    assert out.conversions == ("exif-rotated",)
    assert out.pixels[:8, :8].min() > 230  # the marker is back at the top-left


def test_size_mismatch_without_exif_names_both_sizes(tmp_path, rgb):
    path = _save(tmp_path / "a.png", Image.fromarray(rgb))
    msg = str(_raises(path, "size_mismatch", expected_size=(40, 64)))
    assert "40x64" in msg and "64x40" in msg and "width/height" in msg


# --------------------------------------------------------------------------------------------------
# failures


def _jpeg_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_missing_file(tmp_path):
    assert "download" in str(_raises(tmp_path / "nope.jpg", "missing"))


def test_garbage_bytes_are_unreadable(tmp_path):
    path = tmp_path / "g.jpg"
    path.write_bytes(b"<!DOCTYPE html><html>404</html>" + bytes(range(256)) * 4)
    assert "<!DOCTYPE" in str(_raises(path, "unreadable"))  # shows what the file actually starts with


def test_empty_file_is_truncated(tmp_path):
    path = tmp_path / "e.jpg"
    path.write_bytes(b"")
    _raises(path, "truncated")


def test_corrupt_scan_data_is_unreadable_or_truncated(tmp_path, rgb):
    data = bytearray(_jpeg_bytes(rgb))
    data[600:] = b"\xff\xd8" * ((len(data) - 600) // 2) + b"\xff\xd9"  # markers where scan data should be
    path = tmp_path / "c.jpg"
    path.write_bytes(bytes(data))
    with pytest.raises(BadImageError) as info:
        load_image(path)
    assert info.value.kind in ("unreadable", "truncated")


@pytest.mark.parametrize("load_truncated_flag", [False, True])
def test_truncated_jpeg_is_caught_whatever_the_global_pil_flag(tmp_path, rgb, monkeypatch, load_truncated_flag):
    data = _jpeg_bytes(rgb)
    path = tmp_path / "t.jpg"
    path.write_bytes(data[: len(data) * 6 // 10])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated_flag)
    if load_truncated_flag:
        Image.open(path).load()  # PIL alone now decodes the cut file without a word
    assert "download it again" in str(_raises(path, "truncated"))


@pytest.mark.parametrize("load_truncated_flag", [False, True])
def test_truncated_png_is_caught_whatever_the_global_pil_flag(tmp_path, rgb, monkeypatch, load_truncated_flag):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    path = tmp_path / "t.png"
    path.write_bytes(buffer.getvalue()[:-30])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated_flag)
    _raises(path, "truncated")
