"""space/imaging.py: untrusted uploads are refused before decoding when they should be, and every mode becomes the
RGB a viewer would expect; the letterbox geometry maps CLIP's grid back onto the image's own pixels."""

import io
import struct
import zlib

import imaging
import numpy as np
import pytest
from imaging import ImageRejected, decode_image, to_rgb
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` but whose pixel data is a few bytes: decoding it would fail,
    so a refusal that names the size proves the check ran on the header, before any decode or resize."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 4)) + chunk(b"IEND", b"")
    )


def gradient(width: int = 24, height: int = 16) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 60.0)], axis=2)  # fmt: skip
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")


# ---- formats and refusals ----


@pytest.mark.parametrize("fmt", imaging.ALLOWED_FORMATS)
def test_allowed_formats_decode_to_rgb_of_the_same_picture(fmt):
    source = gradient()
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    decoded = decode_image(encode(source, fmt, **options))
    assert decoded.mode == "RGB" and decoded.size == source.size
    lossless = fmt in ("PNG", "BMP")
    difference = np.abs(np.asarray(decoded, np.int16) - np.asarray(source, np.int16))
    assert difference.max() == 0 if lossless else difference.mean() < 6  # GIF: a 256-colour palette


def test_a_file_path_decodes_like_bytes(tmp_path):
    path = tmp_path / "photo.png"
    gradient().save(path)
    assert np.array_equal(np.asarray(decode_image(path)), np.asarray(gradient()))
    assert np.array_equal(np.asarray(decode_image(str(path))), np.asarray(gradient()))


@pytest.mark.parametrize(
    "payload",
    [
        b"hello, I am a text file",
        b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
        encode(gradient(), "TIFF"),
        encode(gradient(), "PPM"),
        b"",
    ],
    ids=["text", "svg", "tiff", "ppm", "empty"],
)
def test_other_formats_are_refused_with_the_allowed_list(payload):
    with pytest.raises(ImageRejected, match="not a PNG, JPEG, WEBP, GIF or BMP image"):
        decode_image(payload)


def test_truncated_image_is_refused_readably():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(ImageRejected, match="damaged or truncated"):
        decode_image(data[: len(data) // 2])


def test_too_many_pixels_is_refused_from_the_header_before_decoding():
    with pytest.raises(ImageRejected, match=r"6000×5000 = 30\.0 megapixels; the limit is 25 megapixels"):
        decode_image(png_header_only(6000, 5000))
    with pytest.raises(ImageRejected, match=r"too many pixels to process safely; the limit is 25 megapixels"):
        decode_image(png_header_only(30000, 30000))  # beyond Pillow's own hard limit: refused inside Image.open


def test_pixel_limit_is_configurable():
    data = encode(gradient(100, 100), "PNG")
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageRejected, match="megapixels"):
        decode_image(data, max_pixels=9_999)


def test_pillow_bomb_limit_is_lowered_and_its_warning_and_error_become_refusals(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    imaging.harden_pillow()
    assert Image.MAX_IMAGE_PIXELS == imaging.MAX_PIXELS < 89_478_485  # Pillow's default
    imaging.harden_pillow(1000)  # now Pillow itself warns above 1000 pixels and raises above 2000
    for side in (40, 50):  # 1600 pixels: Pillow's warning; 2500: Pillow's DecompressionBombError
        with pytest.raises(ImageRejected, match="too many pixels to process safely; the limit is 0.001 megapixels"):
            decode_image(encode(gradient(side, side), "PNG"), max_pixels=10**9)
    with pytest.raises(Image.DecompressionBombError):  # plain Pillow in this process is bounded too
        Image.open(io.BytesIO(encode(gradient(50, 50), "PNG")))


def test_oversized_file_is_refused_before_opening(monkeypatch):
    monkeypatch.setattr(imaging, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(ImageRejected, match=r"the limit is 0 MB"):
        decode_image(b"\x00" * 1001)


@pytest.mark.parametrize("size", [(20000, 10), (10, 20000), (111, 10)])
def test_extreme_aspect_ratios_are_refused_before_resizing(size):
    with pytest.raises(ImageRejected, match="aspect ratio .* the limit is 10:1"):
        decode_image(png_header_only(*size))


@pytest.mark.parametrize("size", [(1, 1), (10, 1), (1, 10), (2, 3), (100, 10)])
def test_tiny_and_thin_images_within_the_limit_work(size):
    decoded = decode_image(encode(Image.new("RGB", size, (10, 200, 30)), "PNG"))
    assert decoded.size == size and decoded.getpixel((0, 0)) == (10, 200, 30)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert decode_image(buffer.getvalue()).getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("orientation", "size", "red_corner"),
    [(1, (40, 20), (0, 0)), (3, (40, 20), (39, 19)), (6, (20, 40), (19, 0)), (8, (20, 40), (0, 39))],
)
def test_exif_orientation_is_applied(orientation, size, red_corner):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:10, :20] = (255, 0, 0)  # stored top-left quadrant is red
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    assert decoded.size == size
    red = np.asarray(decoded)[..., 0] > 128
    assert red[red_corner[1], red_corner[0]] and red.mean() == pytest.approx(0.25, abs=0.03)


def test_broken_exif_does_not_fail_the_upload():
    exif = Image.Exif()
    exif[0x0112] = 99  # not an orientation
    decoded = decode_image(encode(gradient(), "JPEG", exif=exif.tobytes()))
    assert decoded.size == gradient().size


# ---- every mode becomes the RGB a viewer sees ----


def pixel(image: Image.Image, xy=(0, 0)):
    return to_rgb(image).getpixel(xy)


def test_bilevel_and_gray():
    assert pixel(Image.new("1", (2, 2), 1)) == (255, 255, 255)
    assert pixel(Image.new("1", (2, 2), 0)) == (0, 0, 0)
    assert pixel(Image.new("L", (2, 2), 100)) == (100, 100, 100)


def test_alpha_is_composited_over_white():
    assert pixel(Image.new("LA", (2, 2), (100, 0))) == (255, 255, 255)
    assert pixel(Image.new("LA", (2, 2), (100, 255))) == (100, 100, 100)
    half = pixel(Image.new("RGBA", (2, 2), (0, 0, 200, 128)))
    assert half == pytest.approx((127, 127, round(200 * 128 / 255 + 255 * 127 / 255)), abs=1)
    assert pixel(Image.new("RGBA", (2, 2), (10, 20, 30, 255))) == (10, 20, 30)
    assert pixel(Image.new("RGBA", (2, 2), (10, 20, 30, 0))) == (255, 255, 255)


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    assert [pixel(palette, (x, 0)) for x in (0, 1)] == [(0, 0, 0), (200, 30, 40)]
    palette.info["transparency"] = 0
    assert [pixel(palette, (x, 0)) for x in (0, 1)] == [(255, 255, 255), (200, 30, 40)]
    decoded = decode_image(encode(palette, "PNG"))  # tRNS survives a PNG round trip
    assert [decoded.getpixel((x, 0)) for x in (0, 1)] == [(255, 255, 255), (200, 30, 40)]


def test_rgb_with_a_transparent_colour_key():
    image = Image.new("RGB", (2, 1), (1, 2, 3))
    image.putpixel((1, 0), (9, 9, 9))
    image.info["transparency"] = (1, 2, 3)
    assert [pixel(image, (x, 0)) for x in (0, 1)] == [(255, 255, 255), (9, 9, 9)]


def test_cmyk():
    assert pixel(Image.new("CMYK", (2, 2), (0, 0, 0, 0))) == (255, 255, 255)
    assert pixel(Image.new("CMYK", (2, 2), (255, 0, 0, 0))) == (0, 255, 255)
    assert pixel(Image.new("CMYK", (2, 2), (0, 0, 0, 255))) == (0, 0, 0)
    jpeg = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert np.allclose(jpeg.getpixel((8, 8)), (255, 0, 0), atol=6)


SIXTEEN_BIT = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 on the 8-bit scale


def test_sixteen_bit_keeps_its_levels_where_pillow_would_clip():
    image = Image.fromarray(SIXTEEN_BIT)
    assert image.mode == "I;16"
    assert [pixel(image, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    assert image.convert("RGB").getpixel((2, 0)) == (255, 255, 255)  # why we do not use Pillow's conversion
    decoded = decode_image(encode(image, "PNG"))  # a real 16-bit PNG
    assert [decoded.getpixel((x, 0)) for x in range(4)] == [(v, v, v) for v in (0, 1, 128, 255)]


def test_big_endian_sixteen_bit():
    image = Image.frombytes("I;16B", (4, 1), SIXTEEN_BIT.astype(">u2").tobytes())
    assert [pixel(image, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_32_bit_integer_is_read_as_sixteen_bit_and_clipped():
    image = Image.fromarray(np.array([[-5, 257, 32896, 65535, 70000]], dtype=np.int32))
    assert image.mode == "I"
    assert [pixel(image, (x, 0))[0] for x in range(5)] == [0, 1, 128, 255, 255]


def test_float_uses_pillows_eight_bit_scale():
    image = Image.fromarray(np.array([[12.6, np.nan, 300.0, -4.0, np.inf]], dtype=np.float32))
    assert image.mode == "F"
    assert [pixel(image, (x, 0))[0] for x in range(5)] == [13, 0, 255, 0, 255]


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr", "HSV", "LAB"]
)
def test_every_mode_gives_rgb_of_the_same_size(mode):
    source = gradient(7, 5)
    image = source.convert("L").convert(mode) if mode in ("I;16", "I", "F", "1") else source.convert(mode)
    result = to_rgb(image)
    assert result.mode == "RGB" and result.size == (7, 5)


def test_rgb_is_returned_as_a_copy():
    source = gradient()
    result = to_rgb(source)
    result.putpixel((0, 0), (1, 2, 3))
    assert source.getpixel((0, 0)) != (1, 2, 3)


# ---- geometry ----


def test_letterbox_centres_the_image_on_the_fill():
    square, box = imaging.letterbox(Image.new("RGB", (40, 20), (200, 0, 0)), 32, (1, 2, 3))
    assert square.size == (32, 32)
    assert (box.left, box.top, box.right, box.bottom) == (0.0, 0.25, 1.0, 0.75)
    pixels = np.asarray(square)
    assert (pixels[:8] == (1, 2, 3)).all() and (pixels[24:] == (1, 2, 3)).all() and (pixels[8:24] == (200, 0, 0)).all()


@pytest.mark.parametrize("size", [(1, 1), (1, 10), (10, 1), (333, 100)])
def test_letterbox_keeps_at_least_one_pixel(size):
    square, box = imaging.letterbox(Image.new("RGB", size, (9, 9, 9)), 64, (0, 0, 0))
    assert square.size == (64, 64) and box.right > box.left and box.bottom > box.top


def test_normalize_matches_clips_processor_on_a_square():
    from transformers import CLIPImageProcessor

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    processor = CLIPImageProcessor(image_mean=list(mean), image_std=list(std), do_resize=False, do_center_crop=False)
    image = gradient(32, 32)
    expected = processor(images=image, return_tensors="np")["pixel_values"][0]
    assert np.allclose(imaging.normalize(image, mean, std), expected, atol=1e-5)
    fill = Image.new("RGB", (4, 4), imaging.mean_fill(mean))
    assert np.abs(imaging.normalize(fill, mean, std)).max() < 0.01  # padding carries (almost) no signal


def test_display_size_keeps_the_aspect_ratio():
    assert imaging.display_size((4000, 3000), 640) == (640, 480)
    assert imaging.display_size((1, 1), 256) == (256, 256)
    assert imaging.display_size((10, 100), 512) == (51, 512)


@pytest.mark.parametrize("size", [(64, 32), (32, 64), (50, 50), (1, 1), (7, 70)])
def test_map_on_image_lands_on_the_same_place_of_the_picture(size):
    """A hot cell at the grid position of the image's top-left corner peaks at the image's top-left corner."""
    grid = 8
    square, box = imaging.letterbox(Image.new("RGB", size), 64, (0, 0, 0))
    cell_row, cell_col = int(box.top * grid), int(box.left * grid)
    hot = np.zeros((grid, grid), np.float32)
    hot[cell_row, cell_col] = 3.0
    display = imaging.display_size(size, 256)
    mapped = imaging.map_on_image(hot, box, display)
    assert mapped.shape == (display[1], display[0]) and mapped.max() == pytest.approx(1.0) and mapped.min() >= 0
    peak_y, peak_x = np.unravel_index(mapped.argmax(), mapped.shape)
    assert peak_y <= max(1, display[1] // 4) and peak_x <= max(1, display[0] // 4)
    cold = imaging.map_on_image(np.zeros((grid, grid)), box, display)
    assert cold.shape == mapped.shape and not cold.any()


def test_an_upload_that_is_gone_asks_for_it_again(tmp_path):
    with pytest.raises(imaging.ImageRejected, match="no longer on the server .* Please upload it again"):
        imaging.decode_image(tmp_path / "deleted-by-the-cache-cleaner.png")
