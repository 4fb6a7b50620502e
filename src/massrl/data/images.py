"""Robust image decoding: any file PIL can read becomes an 8-bit RGB image, anything else a
`BadImageError` that names the file and the reason.

Mode conversions (PIL's own `convert("RGB")` is wrong for several of them):

- ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``RGBX`` ...: PIL's conversion.
- Transparent images (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, ``P`` with a transparency entry)
  are composited on a **white** background. Dropping alpha instead would expose whatever colour
  the encoder left under fully transparent pixels (often black or garbage); white is what a
  viewer shows and what web images (logos, product photos) are designed against.
- ``I;16*`` (16-bit grey): scaled by 255/65535 (65535 -> 255, 32768 -> 128), not clipped.
- ``I`` (32-bit int): values within 0..255 are kept, within 0..65535 scaled like 16-bit,
  anything else min-max stretched.
- ``F`` (float): values within 0..1 are scaled by 255, within 0..255 kept, else min-max stretched.

EXIF orientation is applied, and multi-frame files (GIF, TIFF) yield their first frame.

Inside `decode_at_least(side)` a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
scaling) when its shorter side stays >= side: a transform that needs no more detail than that
(a small crop size, a test resize) gets the same picture several times faster from a large photo.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_DECODE_SIDE: ContextVar[int | None] = ContextVar("massrl_decode_side", default=None)


@contextmanager
def decode_at_least(side: int | None) -> Iterator[None]:
    """JPEGs that `load_image` decodes in this block keep a shorter side of at least `side`
    pixels, and may come out smaller than the file (None: full size)."""
    token = _DECODE_SIDE.set(side)
    try:
        yield
    finally:
        _DECODE_SIDE.reset(token)


class BadImageError(OSError):
    """A file that cannot be decoded into an image (truncated, empty, not an image, ...)."""

    exit_status = 2  # bad input, as a missing dataset (cli._failure)

    def __init__(self, path: str | os.PathLike, reason: str = "") -> None:
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        # A DataLoader worker re-raises with a single message argument: then there is no reason.
        if not self.reason:
            return self.path
        return f"cannot decode image {self.path}: {self.reason}"


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB PIL image (see the module docstring for the conversions).

    Raises BadImageError for an empty, truncated, corrupt or non-image file.
    """
    image = _read(Path(path), decode=True)
    assert image is not None
    return image


def check_image_header(path: str | os.PathLike) -> None:
    """Raise BadImageError for an empty file, one that is not an image, or one too large to
    decode, reading its header only (corrupt pixel data is found when it is decoded)."""
    _read(Path(path), decode=False)


def _open_quietly(path: Path | BinaryIO) -> Image.Image:
    """Image.open (of a path or an open file) without PIL's warning about a very large image
    (a possible decompression bomb, naming no file): `_warn_if_large` says it, with the name,
    of the size decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _warn_if_large(path: Path, img: Image.Image) -> None:
    """A very large image, as it will be decoded (a JPEG decoded down is not)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        warnings.warn(f"{path}: a very large image ({img.width} x {img.height} px) takes much "
                      "memory to decode; downscale it if it is not meant to be this large",
                      Image.DecompressionBombWarning, stacklevel=4)


def _read(path: Path, decode: bool) -> Image.Image | None:
    try:
        _check_file(path)
        with _open_quietly(path) as img:
            if not decode:
                return None
            side = _DECODE_SIDE.get()
            if side and img.format in ("JPEG", "MPO"):  # (MPO: a camera's multi-picture JPEG)
                img.draft(None, (side, side))  # largest 1/2^k scale with both sides >= side
            _warn_if_large(path, img)
            _load_fully(img)
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file PIL can identify") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, f"refused as a decompression bomb: {exc} (a genuine image "
                            "this large must be downscaled first)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL signals truncated and corrupt data with OSError, SyntaxError or ValueError.
        raise BadImageError(path, f"{type(exc).__name__}: {exc}") from None


def _check_file(path: Path) -> None:
    """BadImageError for what PIL should not open: an empty file, or no regular file (a named
    pipe had it wait forever for a writer; reading a device never ends); a symlink loop says so
    (OSError's text repeated the path)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise BadImageError(path, exc.strerror or str(exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise BadImageError(path, "not a regular file (a named pipe, socket or device)")
    if st.st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")


def _load_fully(img: Image.Image) -> None:
    """Decode all pixel data, failing on truncation even if some library enabled
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` globally (that flag pads missing data with grey)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.seek(0)
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def as_rgb(img: Image.Image) -> Image.Image:
    """`img` if it is RGB already, else to_rgb's conversion; a clear error for what is not a PIL
    image (a tensor or an array: torchvision's to_pil_image converts them)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}: "
                        "torchvision.transforms.functional.to_pil_image converts a tensor or array")
    return img if img.mode == "RGB" else to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an already loaded image of any PIL mode to 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        return _composite_on_white(img)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(img), mode="L").convert("RGB")
    if mode == "1":
        img = img.convert("L")  # 1-bit -> 0/255 grey
    return img.convert("RGB")


def _composite_on_white(img: Image.Image) -> Image.Image:
    if img.mode == "La":  # (premultiplied grey: PIL converts it to LA only)
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Map a 16-bit, 32-bit int or float grey image to 0..255 without clipping its range."""
    arr = np.asarray(img).astype(np.float64)
    if arr.size == 0:
        return arr.astype(np.uint8)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    mode = img.mode
    if mode.startswith("I;16"):
        scaled = arr * (255.0 / 65535.0)
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = arr
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scaled = arr * (255.0 / 65535.0)
    else:  # an unknown range: stretch what is there to the full 8-bit range
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)
