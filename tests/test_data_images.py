"""Buckets and image opening: geometry, every mode, EXIF, and each kind of bad file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from tests.data_fixtures import jpeg_bytes, noise_image, png_header_only, save_image
from training.data.buckets import Bucket, make_buckets, nearest_bucket, plan_fit
from training.data.images import ImageRejected, fit_image_file, to_rgb

WHITE = (255, 255, 255)


@pytest.mark.parametrize("resolution", [512, 768, 1024, 640])
def test_buckets_are_multiples_of_16_within_area_and_aspect(resolution):
    buckets = make_buckets(resolution, max_aspect_ratio=2.0)
    assert Bucket(resolution, resolution) in buckets
    for bucket in buckets:
        assert bucket.width % 16 == 0 and bucket.height % 16 == 0
        assert bucket.width * bucket.height <= resolution**2
        assert bucket.width * bucket.height > 0.9 * resolution**2
        assert max(bucket.aspect, 1 / bucket.aspect) <= 2.0
    assert len(buckets) == len(set(buckets))


def test_bucket_choice_and_fit_plan():
    buckets = make_buckets(1024)
    assert nearest_bucket(1920, 1080, buckets) == Bucket(1360, 768)
    assert nearest_bucket(1000, 1000, buckets) == Bucket(1024, 1024)
    plan = plan_fit(2000, 1000, Bucket(1024, 1024))
    assert plan.scale == pytest.approx(1.024) and plan.needs_upscale
    assert plan.source_box == pytest.approx((500.0, 0.0, 1500.0, 1000.0))


@pytest.mark.parametrize("bad", [0, 8, 4097])
def test_bad_resolution_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="resolution"):
        make_buckets(bad)


def _fit(path, resolution=64, upscale=False, **kwargs):
    return fit_image_file(path, make_buckets(resolution), upscale=upscale, background=WHITE, **kwargs)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".JPG"])
def test_every_file_format_fits_its_bucket(tmp_path, suffix):
    path = save_image(tmp_path / f"photo{suffix}", noise_image(150, 100))
    fitted = _fit(path)
    assert fitted.image.mode == "RGB"
    assert fitted.image.size == (fitted.plan.bucket.width, fitted.plan.bucket.height)
    assert fitted.plan.bucket.width > fitted.plan.bucket.height
    assert fitted.original_size == (150, 100)


def test_large_jpeg_uses_draft_and_still_covers_bucket(tmp_path):
    path = save_image(tmp_path / "big.jpg", noise_image(1600, 1200))
    fitted = _fit(path)
    assert fitted.image.size == (fitted.plan.bucket.width, fitted.plan.bucket.height)
    assert fitted.plan.scale <= 1.0


def _expect_rejection(path, match, **kwargs):
    with pytest.raises(ImageRejected, match=match):
        _fit(path, **kwargs)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _expect_rejection(path, "0 bytes")


def test_non_image_with_image_extension(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is a text file, not a JPEG")
    _expect_rejection(path, "unreadable image")


def test_corrupt_jpeg(tmp_path):
    data = bytearray(jpeg_bytes(noise_image(120, 120)))
    data[200:] = b"\x00\xff" * ((len(data) - 200) // 2) + b"\x00" * ((len(data) - 200) % 2)
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(bytes(data))
    _expect_rejection(path, "unreadable image")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path, suffix):
    full = save_image(tmp_path / f"full{suffix}", noise_image(120, 120))
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _expect_rejection(path, "unreadable image")


def test_decompression_bomb_is_refused_without_pillow_warning(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(60_000, 60_000))
    over_our_limit = save_image(tmp_path / "big.png", noise_image(200, 200))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        _expect_rejection(huge, "decompression bomb")
        _expect_rejection(over_our_limit, "decompression bomb.*exceeds max_image_pixels=10000", max_image_pixels=10_000)


def test_too_small_is_skipped_or_upscaled(tmp_path):
    path = save_image(tmp_path / "tiny.png", noise_image(20, 20))
    _expect_rejection(path, "too small: 20x20")
    fitted = _fit(path, upscale=True)
    assert fitted.image.size == (64, 64) and fitted.plan.needs_upscale


def test_exif_rotation_is_applied(tmp_path):
    stored = np.zeros((128, 64, 3), dtype=np.uint8)  # portrait as stored: red top half, blue bottom half
    stored[:64, :, 0] = 255
    stored[64:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    fitted = _fit(path)
    assert fitted.original_size == (128, 64)
    assert fitted.plan.bucket.width > fitted.plan.bucket.height
    pixels = np.asarray(fitted.image).astype(int)
    width = pixels.shape[1]
    assert pixels[:, : width // 4, 2].mean() > 200 and pixels[:, : width // 4, 0].mean() < 50  # left is blue
    assert pixels[:, -width // 4 :, 0].mean() > 200 and pixels[:, -width // 4 :, 2].mean() < 50  # right is red


def test_sixteen_bit_grayscale(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (96, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
        rgb = to_rgb(image, WHITE)
    array = np.asarray(rgb)
    assert array[0, 0].tolist() == [0, 0, 0] and array[0, -1].tolist() == [255, 255, 255]
    assert np.all(np.diff(array[0, :, 0].astype(int)) >= 0)
    assert _fit(path).image.mode == "RGB"


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (96, 96), (0, 255, 255, 0))  # pure red in CMYK
    path = tmp_path / "print.jpg"
    cmyk.save(path, quality=95)
    red, green, blue = np.asarray(_fit(path).image).reshape(-1, 3).mean(axis=0)
    assert red > 230 and green < 25 and blue < 25


def test_palette_with_alpha_composites_on_background(tmp_path):
    palette_image = Image.new("P", (96, 96), 0)
    palette_image.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    palette_image.paste(1, (0, 0, 48, 96))  # left half index 1 (red), right half index 0 (transparent)
    palette_image.info["transparency"] = 0
    path = tmp_path / "sticker.png"
    palette_image.save(path, transparency=0)
    rgb = np.asarray(fit_image_file(path, make_buckets(64), upscale=False, background=(0, 128, 0)).image)
    assert rgb[32, 4].tolist() == [255, 0, 0]
    assert rgb[32, 60].tolist() == [0, 128, 0]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "1", "I", "F", "CMYK", "YCbCr", "P"])
def test_every_mode_converts_to_rgb(mode):
    image = noise_image(32, 32).convert(mode)
    rgb = to_rgb(image, WHITE)
    assert rgb.mode == "RGB" and rgb.size == (32, 32)


def test_rgba_fully_transparent_gives_background():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba, (1, 2, 3)))[0, 0].tolist() == [1, 2, 3]


def test_tall_png_whose_crop_box_had_float_noise_is_packed(tmp_path):
    # Regression (issue 13 defect 2): 411x1018 at resolution 512 gave the box top -5.7e-14 and Pillow refused it.
    path = save_image(tmp_path / "tall.png", noise_image(411, 1018))
    fitted = _fit(path, resolution=512)
    assert fitted.image.size == (320, 800) and fitted.plan.source_box[1] == 0.0


def _random_sizes(count: int, seed: int, largest: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(1, largest + 1, 2)) for _ in range(count)]


@pytest.mark.parametrize("resolution", [64, 512, 768, 1024])
def test_crop_box_fuzz_lies_inside_the_image_and_keeps_the_bucket_aspect(resolution):
    buckets = make_buckets(resolution)
    sizes = _random_sizes(3000, seed=resolution, largest=6000) + [(w, h) for w in range(1, 60) for h in (1, 59, 1018)]
    for width, height in sizes:
        bucket = nearest_bucket(width, height, buckets)
        plan = plan_fit(width, height, bucket)
        left, top, right, bottom = plan.source_box
        where = f"{width}x{height} -> {bucket.name}: box {plan.source_box}"
        assert 0.0 <= left < right <= width and 0.0 <= top < bottom <= height, where
        assert (left, right) == (0.0, width) or (top, bottom) == (0.0, height), where  # one side kept whole
        assert left == pytest.approx(width - right, abs=1e-9) and top == pytest.approx(height - bottom, abs=1e-9)
        assert (right - left) / (bottom - top) == pytest.approx(bucket.aspect, rel=1e-9), where
        assert plan.scale == pytest.approx(max(bucket.width / width, bucket.height / height), rel=1e-12), where


def test_crop_box_fuzz_is_accepted_by_pillow():
    buckets = make_buckets(128)
    for width, height in _random_sizes(1500, seed=7, largest=700):
        plan = plan_fit(width, height, nearest_bucket(width, height, buckets))
        resized = Image.new("L", (width, height)).resize(
            (plan.bucket.width, plan.bucket.height), Image.Resampling.BILINEAR, box=plan.source_box
        )
        assert resized.size == (plan.bucket.width, plan.bucket.height)
