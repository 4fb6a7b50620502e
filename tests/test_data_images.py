"""Image decoding: every PIL mode becomes correct 8-bit RGB; broken files raise BadImageError."""

from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from massrl.data import BadImageError, load_image
from massrl.data.images import as_rgb, decode_at_least, to_rgb


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def test_rgb_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = load_image(_save(Image.fromarray(arr), tmp_path / "a.png"))
    assert out.mode == "RGB" and out.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(out), arr)


def test_grey_is_repeated(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = np.asarray(load_image(_save(Image.fromarray(arr, "L"), tmp_path / "g.png")))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    for name in ("d.png", "d.tif"):
        out = np.asarray(load_image(_save(img, tmp_path / name)))[0, :, 0]
        assert out[0] == 0 and out[1] == 1 and out[3] == 255
        assert abs(int(out[2]) - 128) <= 1  # a clip would give 255


def test_32bit_int_and_float(tmp_path):
    wide = np.array([[0, 65535]], dtype=np.int32)
    out = np.asarray(load_image(_save(Image.fromarray(wide, "I"), tmp_path / "i.tif")))
    assert out[0, :, 0].tolist() == [0, 255]
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = np.asarray(load_image(_save(Image.fromarray(unit, "F"), tmp_path / "f.tif")))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_one_bit(tmp_path):
    arr = np.array([[0, 1, 1, 0]], dtype=bool)
    out = np.asarray(load_image(_save(Image.fromarray(arr), tmp_path / "b.png")))
    assert out[0, :, 1].tolist() == [0, 255, 255, 0]


def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((1, 3, 4), dtype=np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque: kept
    arr[0, 1] = (0, 0, 0, 0)  # transparent black: white, not black
    arr[0, 2] = (0, 0, 0, 128)  # half transparent black over white: mid grey
    out = np.asarray(load_image(_save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png")))
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert 120 <= out[0, 2, 0] <= 135


def test_grey_alpha_and_palette_transparency(tmp_path):
    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8), "LA")
    out = np.asarray(load_image(_save(la, tmp_path / "la.png")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [50, 50, 50]
    # the premultiplied form, which PIL converts to LA only, the same
    assert np.asarray(to_rgb(la.convert("La"))).tolist() == out.tolist()
    with pytest.raises(TypeError, match="to_pil_image"):
        as_rgb(np.asarray(la))

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 1  # index 1 (black) is transparent
    out = np.asarray(load_image(_save(pal, tmp_path / "p.png", transparency=1)))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_palette_without_transparency_and_gif(tmp_path):
    img = Image.fromarray(np.full((4, 4, 3), (0, 200, 0), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
    for name in ("p.png", "p.gif"):
        out = np.asarray(load_image(_save(img, tmp_path / name)))
        assert out.shape == (4, 4, 3) and tuple(out[0, 0]) == (0, 200, 0)


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(load_image(_save(cmyk, tmp_path / "c.jpg", quality=100)))
    r, g, b = (int(v) for v in out[1, 1])
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_detected_even_with_global_flag(tmp_path, monkeypatch, fmt):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    path = tmp_path / f"t.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    # Some libraries switch this on globally; truncation must still be an error.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImageError, match="truncated") as info:
        load_image(path)
    assert info.value.path == str(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_zero_bytes_and_not_an_image(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(BadImageError, match="0 bytes"):
        load_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n")
    with pytest.raises(BadImageError, match="notes.png") as info:
        load_image(text)
    assert info.value.reason and isinstance(info.value, OSError)


def test_missing_file_is_bad_image(tmp_path):
    with pytest.raises(BadImageError):
        load_image(tmp_path / "nope.png")


def test_error_pickles_for_worker_processes(tmp_path):
    err = pickle.loads(pickle.dumps(BadImageError(tmp_path / "x.png", "broken")))
    assert err.path.endswith("x.png") and err.reason == "broken" and "broken" in str(err)


def _photo(path, size=(800, 600), **kwargs):
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (size[1] // 50, size[0] // 50, 3), np.uint8))
    small.resize(size, Image.Resampling.BICUBIC).save(path, **kwargs)
    return path


def test_jpeg_decoded_down_to_the_side_asked_for(tmp_path):
    from massrl.data.images import decode_at_least

    jpg = _photo(tmp_path / "p.jpg")
    png = _photo(tmp_path / "p.png")
    assert load_image(jpg).size == (800, 600)  # full size outside the block
    with decode_at_least(70):  # 600 // 70 = 8: the 1/8 scale keeps 75 >= 70
        assert load_image(jpg).size == (100, 75)
        assert load_image(png).size == (800, 600)  # only JPEGs have a cheap reduced decode
    with decode_at_least(160):  # 1/4 would leave 150 < 160: 1/2
        assert load_image(jpg).size == (400, 300)
    with decode_at_least(700):  # not even 1/2 keeps 700: full size
        assert load_image(jpg).size == (800, 600)
    with decode_at_least(None):
        assert load_image(jpg).size == (800, 600)
    # the reduced picture is the full one, smaller: close to a good downscale of it
    with decode_at_least(150):
        small = np.asarray(load_image(jpg), dtype=float)
    full = load_image(jpg).resize((200, 150), Image.Resampling.BOX)
    assert np.abs(small - np.asarray(full, dtype=float)).mean() < 4


def test_reduced_decode_keeps_exif_orientation_and_mode(tmp_path):
    from massrl.data.images import decode_at_least

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored 800x600 is shown 600x800
    jpg = _photo(tmp_path / "r.jpg", exif=exif.tobytes())
    grey = tmp_path / "g.jpg"
    Image.open(_photo(tmp_path / "c.png")).convert("L").save(grey)
    with decode_at_least(150):
        rotated = load_image(jpg)
        g = load_image(grey)
    assert rotated.size == (150, 200) and rotated.mode == "RGB"
    assert g.size == (200, 150) and g.mode == "RGB"


def test_a_very_large_image_is_named_in_the_warning(tmp_path, monkeypatch):
    """PIL's decompression-bomb warning names no file; massrl's says which one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12 x 12 = 144: large, not refused
    path = tmp_path / "huge.png"
    Image.new("RGB", (12, 12)).save(path)
    with pytest.warns(Image.DecompressionBombWarning, match=r"huge\.png: a very large image "
                      r"\(12 x 12 px\)"):
        assert load_image(path).size == (12, 12)
    Image.new("RGB", (15, 15)).save(path)  # 225 px, over twice the limit: refused, named
    with pytest.raises(BadImageError, match="huge.png.*decompression bomb"):
        load_image(path)
    # a JPEG decoded down to what the crops need is not large: no warning (it said so of a
    # 10,000 px photo that training decodes at 1/8 scale)
    jpg = tmp_path / "photo.jpg"
    Image.new("RGB", (12, 12)).save(jpg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with decode_at_least(3):
            assert load_image(jpg).size == (3, 3)
