"""The one decoding rule, on real files of every mode it handles."""

from __future__ import annotations

import io

import numpy as np
import pytest
from mmstore_client import decode
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    img.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> mid grey
    out = decode.decode_rgb(encode(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0))[0] in (127, 128)
    assert out.getpixel((2, 0)) == (255, 0, 0)


def test_la_and_palette_transparency():
    la = Image.new("LA", (2, 1), (0, 0))
    assert decode.decode_rgb(encode(la, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (2, 1), 0)
    p.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    p.putpixel((1, 0), 1)
    data = encode(p, "PNG", transparency=0)
    out = decode.decode_rgb(data)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (40, 50, 60)


def test_cmyk_jpeg_and_grayscale():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    r, g, b = decode.decode_rgb(encode(cmyk, "JPEG", quality=100)).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    gray = Image.new("L", (3, 3), 77)
    assert decode.decode_rgb(encode(gray, "PNG")).getpixel((1, 1)) == (77, 77, 77)
    one = Image.new("1", (3, 3), 1)
    assert decode.decode_rgb(encode(one, "BMP")).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_grayscale_scaled_not_clipped():
    arr = np.array([[0, 256 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    out = decode.decode_rgb(encode(img, "PNG"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    tiff = decode.decode_rgb(encode(img, "TIFF"))
    assert [tiff.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_multiframe_gif_first_frame():
    frames = [Image.new("RGB", (5, 5), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    header = decode.probe(data)
    assert header.frames == 2
    r, _, b = decode.decode_rgb(data).getpixel((2, 2))
    assert r > 200 and b < 60


def test_exif_orientation_applied_and_probe_swaps_size():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white left strip
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = encode(img, "JPEG", exif=exif, quality=95)
    header = decode.probe(data)
    assert (header.raw_width, header.raw_height) == (40, 20)
    assert (header.width, header.height) == (20, 40)
    out = decode.decode_rgb(data)
    assert out.size == (20, 40)
    assert out.getpixel((10, 2))[0] > 200 and out.getpixel((10, 38))[0] < 60  # strip now on top


@pytest.mark.parametrize("cut", [0.3, 0.7])
def test_truncated_refused(cut):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = encode(img, fmt)
        with pytest.raises(decode.CorruptImage):
            decode.verify(data[: int(len(data) * cut)])
        with pytest.raises(decode.CorruptImage):
            decode.decode_rgb(data[: int(len(data) * cut)])


def test_refusals_have_codes():
    with pytest.raises(decode.UnsupportedImage) as e:
        decode.probe(b"hello")
    assert e.value.code == "unsupported_media_type"
    with pytest.raises(decode.ImageTooLarge) as e:
        decode.probe(encode(Image.new("1", (5000, 5000)), "PNG"), max_pixels=1_000_000)
    assert e.value.code == "image_too_large"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pil_and_probe(orientation):
    from PIL import ImageOps

    rng = np.random.default_rng(orientation)
    img = Image.fromarray(rng.integers(0, 255, (20, 36, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    for fmt in ("PNG", "TIFF"):  # lossless, so pixels compare exactly
        data = encode(img, fmt, exif=exif)
        out = decode.decode_rgb(data)
        expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        assert out.tobytes() == expected.tobytes(), (fmt, orientation)
        header = decode.probe(data)
        assert (header.width, header.height) == out.size


def test_probe_reads_headers_only():
    """A probe never decodes pixels: a PNG whose pixel data is garbage still probes."""
    data = bytearray(encode(Image.new("RGB", (300, 200), (1, 2, 3)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8 : idat + 20] = b"\\x00" * 12  # corrupt the compressed pixels
    header = decode.probe(bytes(data))
    assert (header.width, header.height) == (300, 200)
    with pytest.raises(decode.CorruptImage):
        decode.decode_rgb(bytes(data))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoded_images_carry_no_orientation_for_vllm_to_reapply(orientation):
    """vLLM's normalize_image applies EXIF orientation itself: after the rule, it must be a no-op."""
    from vllm.multimodal.image import normalize_image

    img = Image.new("RGB", (64, 32), (10, 200, 30))
    img.paste((250, 0, 0), (0, 0, 16, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    for fmt in ("JPEG", "PNG"):
        out = decode.decode_rgb(encode(img, fmt, exif=exif))
        again = normalize_image(out)
        assert again.size == out.size and again.tobytes() == out.tobytes(), (fmt, orientation)
