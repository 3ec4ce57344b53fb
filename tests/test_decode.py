"""The one decoding rule, on real files of every mode it handles."""

from __future__ import annotations

import contextlib
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
    assert (header.format, header.width, header.height) == ("GIF", 5, 5)
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


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def repeat_last_scan(data: bytes, times: int) -> bytes:
    """A progressive JPEG whose last scan comes ``times`` more times (bytes surgery)."""
    last = data.rindex(b"\xff\xda")
    assert data.endswith(b"\xff\xd9")
    return data[:-2] + data[last:-2] * times + data[-2:]


def test_jpeg_with_too_many_scans_refused_before_any_decoding(monkeypatch):
    from PIL import JpegImagePlugin

    data = encode(noise(64, 48), "JPEG", progressive=True)
    decode.verify(data)  # libjpeg's own progression: 10 scans
    hostile = repeat_last_scan(data, decode.DEFAULT_MAX_JPEG_SCANS)
    loads = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", lambda self: loads.append(self))
    for call in (decode.verify, decode.check_pixels, decode.decode_rgb):
        with pytest.raises(decode.ImageTooComplex) as e:
            call(hostile)
        assert e.value.code == "image_too_complex" and "scans" in str(e.value)
    assert loads == []  # refused before decoding
    decode.check_pixels(hostile, max_jpeg_scans=200)  # the limit is the caller's


def test_tiff_pages_are_never_walked(monkeypatch):
    """PIL's n_frames walks every page, quadratically: probing or decoding reads the first only."""
    from PIL import TiffImagePlugin

    pages = [Image.new("L", (4, 4), i) for i in range(300)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    seeks = []
    original = TiffImagePlugin.TiffImageFile._seek
    monkeypatch.setattr(
        TiffImagePlugin.TiffImageFile,
        "_seek",
        lambda self, frame: (seeks.append(frame), original(self, frame)),
    )
    header = decode.probe(data)
    decode.verify(data)
    out = decode.decode_rgb(data)
    assert (header.width, header.height) == out.size == (4, 4) and out.getpixel((0, 0)) == (0, 0, 0)
    assert set(seeks) == {0}


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("cut", [0.3, 0.6, 0.85])
def test_truncated_jpeg_with_eoi_appended_refused(progressive, cut):
    """libjpeg fills a scan that ends early at a marker with grey and only warns: refused."""
    data = encode(noise(96, 64), "JPEG", progressive=progressive, quality=95)
    if progressive and cut == 0.85:
        cut = 0.7  # (a cut inside a progressive file's last scan is not detected: see jpeg_scans)
    body = data[: int(len(data) * cut)]
    for tail in (b"\xff\xd9", b"\xff\xfe\x00\x04hi\xff\xd9"):  # EOI, or a comment then EOI
        for call in (decode.verify, decode.decode_rgb):
            with pytest.raises(decode.CorruptImage):
                call(body + tail)


def test_jpeg_header_claiming_more_pixels_than_its_data_refused():
    """A small JPEG whose frame header claims 3000x3000: libjpeg would decode 9 MP of grey."""
    data = bytearray(encode(Image.new("L", (8, 8), 100), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (3000).to_bytes(2, "big") * 2
    assert len(data) < 700
    for call in (decode.verify, decode.decode_rgb):
        with pytest.raises(decode.CorruptImage, match="fewer than its"):
            call(bytes(data))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"quality": 100, "subsampling": 0},
        {"subsampling": 2, "optimize": True},
        {"progressive": True},
        {"progressive": True, "subsampling": 0, "quality": 40},
        {"restart_marker_blocks": 3},
        {"restart_marker_rows": 1, "progressive": True},
    ],
)
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_complete_jpegs_decode_to_the_same_pixels_as_pil(options, mode):
    """The truncation check changes no pixel of a complete file (sizes that end mid-block too)."""
    for size in [(1, 1), (8, 8), (17, 9), (130, 71)]:
        data = encode(noise(*size, seed=size[0]).convert(mode), "JPEG", **options)
        decode.verify(data)
        expected = decode.to_rgb(Image.open(io.BytesIO(data)).convert(mode))
        assert decode.decode_rgb(data).tobytes() == expected.tobytes(), (size, options, mode)


@pytest.mark.filterwarnings("ignore")
def test_malformed_gif_and_tiff_raise_only_the_rules_errors():
    """Mutated files make PIL raise IndexError, struct.error, TypeError, KeyError, SyntaxError...:
    the rule answers each with one of its own errors (the services' 415/422), nothing else."""
    import random

    frames = [Image.new("RGB", (6, 5), (i * 40, 255 - i * 40, 7)) for i in range(3)]
    seeds = [
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        encode(frames[0], "TIFF", compression="tiff_deflate"),
    ]
    rng = random.Random(0)
    for seed in seeds:
        for _ in range(150):
            data = bytearray(seed)
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(len(data))
                data[pos] = rng.randrange(256)
            for call in (decode.probe, decode.verify, decode.decode_rgb):
                with contextlib.suppress(decode.ImageError):
                    call(bytes(data))


def test_mpo_is_a_jpeg_of_its_first_picture():
    """Phone cameras write JPEGs with a multi-picture segment (PIL: format MPO)."""
    first, second = noise(40, 30, seed=1), noise(40, 30, seed=2)
    data = encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    header = decode.verify(data)
    assert (header.format, header.mime, header.width, header.height) == ("JPEG", "image/jpeg", 40, 30)
    expected = Image.open(io.BytesIO(data))
    expected.seek(0)
    assert decode.decode_rgb(data).tobytes() == expected.convert("RGB").tobytes()
    with pytest.raises(decode.CorruptImage):  # its first picture truncated, the second intact
        cut = data.index(b"\xff\xd9")
        decode.verify(data[: cut // 2] + data[cut:])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_fit_decodes_at_a_reduced_scale_that_covers_the_box(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(noise(1000, 600), fmt, exif=exif)
    full = decode.decode_rgb(data)
    small = decode.decode_rgb(data, fit=128)
    assert full.size == (600, 1000)  # oriented
    assert 128 <= min(small.size) < 300 and small.width / small.height == pytest.approx(0.6, rel=0.05)


def test_which_loaders_apply_exif_orientation_as_the_rule_says(tmp_path):
    """The module docstring's claims, checked against the installed transformers."""
    import torch
    from transformers.image_utils import load_image, load_image_as_tensor

    exif = Image.Exif()
    exif[0x0112] = 6  # upright is 90 degrees clockwise: the sides swap
    data = encode(noise(40, 20), "PNG", exif=exif)
    path = tmp_path / "rotated.png"
    path.write_bytes(data)
    upright = decode.decode_rgb(data)
    assert upright.size == (20, 40)
    assert load_image(str(path)).tobytes() == upright.tobytes()  # PIL backend: agrees
    from_pil = load_image_as_tensor(Image.open(io.BytesIO(data)))  # torchvision backend, PIL in
    assert torch.equal(from_pil, torch.from_numpy(np.asarray(upright)).permute(2, 0, 1))
    from_path = load_image_as_tensor(str(path))  # torchvision backend, a path: raw pixels
    assert tuple(from_path.shape) == (3, 20, 40)
    raw = Image.open(io.BytesIO(data)).convert("RGB")
    assert torch.equal(from_path, torch.from_numpy(np.asarray(raw)).permute(2, 0, 1))


def test_truncated_files_refused_even_if_another_library_turned_on_truncated_loading(monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some dataset code does
    for fmt in ("PNG", "JPEG"):
        data = encode(noise(64, 64), fmt)
        with pytest.raises(decode.CorruptImage):
            decode.verify(data[: len(data) // 2])


def test_jpeg_scan_reader_finds_the_end_of_a_scan_of_64_mb_of_stuffed_bytes():
    """Stuffed 0xFF 0x00 pairs are data, not markers (a scan of nothing else is the reader's
    worst case: a Python loop per pair took 8 s; the regular expression about 0.2 s, not asserted)."""
    from mmstore_client import jpeg_scans

    data = encode(Image.new("L", (16, 16), 7), "JPEG")
    sos = data.index(b"\xff\xda")
    flood = data[: sos + 10] + b"\xff\x00" * 32_000_000 + b"\xff\xd9"
    scans = jpeg_scans.read(flood, max_scans=10)
    assert len(scans.scans) == 1 and scans.scans[0].data_bytes == 64_000_000
