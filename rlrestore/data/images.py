"""Image I/O: any file PIL reads becomes an ``HxWx3`` uint8 RGB array, or a clear ``ImageLoadError``.

Conversions (chosen so that every face reaches the model as plain 8-bit RGB):

- alpha (RGBA, LA, PA, palette transparency) is composited onto a white background;
- grayscale, palette, CMYK and other modes go through PIL's ``convert("RGB")``;
- 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I``) maps 0..65535 to 0..255 by rounding
  ``v / 257``, so 65535 -> 255 and 257*k -> k exactly; 16-bit RGB PNGs are reduced by PIL itself;
- the EXIF orientation tag is applied, so the array is upright;
- multi-frame files (GIF, animated WebP) give their first frame.

Truncated files are rejected: the full decode is forced with ``img.load()`` and PIL's
``LOAD_TRUNCATED_IMAGES`` is left off.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
DEFAULT_MAX_PIXELS = 100_000_000
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_WHITE = (255, 255, 255, 255)


class ImageLoadError(ValueError):
    """A file (or byte string) could not be decoded as an image; names the source and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot load image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an upright ``HxWx3`` uint8 RGB array.

    Raises ``ImageLoadError`` for missing, empty, non-image, truncated, zero-size or corrupt
    files and for images with more than ``max_pixels`` pixels (checked from the header, before
    decoding).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "no such file")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    with open(path, "rb") as handle:
        return _decode(handle, path, max_pixels, formats=None)


def decode_png(data: bytes, label: str = "<png bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG bytes to an ``HxWx3`` uint8 RGB array; ``label`` names the source in errors."""
    if not data:
        raise ImageLoadError(label, "empty byte string")
    return _decode(io.BytesIO(data), label, max_pixels, formats=("PNG",))


def encode_png(img: np.ndarray, optimize: bool = False) -> bytes:
    """Encode an ``HxWx3`` uint8 array as PNG; ``optimize`` trades time for smaller bytes.

    The bytes carry no timestamps or other metadata, so equal arrays give equal bytes.
    """
    buffer = io.BytesIO()
    Image.fromarray(_check_rgb(img)).save(buffer, format="PNG", optimize=optimize)
    return buffer.getvalue()


def _decode(
    source: io.BufferedIOBase, label: str | Path, max_pixels: int, formats: tuple[str, ...] | None
) -> np.ndarray:
    # PIL raises many exception types for broken files (OSError, SyntaxError, struct.error,
    # EOFError, ValueError, ...); each becomes one ImageLoadError naming the file.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source, formats=formats)
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageLoadError(label, f"zero-size image ({width}x{height})")
        if width * height > max_pixels:
            raise ImageLoadError(
                label, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
            )
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img, label)
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageLoadError(label, "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(label, f"too large for PIL ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - PIL's failure types are open-ended (see above)
        raise ImageLoadError(label, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None


def _to_rgb(img: Image.Image, label: str | Path) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.float64)
        gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise ImageLoadError(label, "unsupported floating-point pixel mode 'F'")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or img.has_transparency_data:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _check_rgb(img: np.ndarray) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", type(img).__name__)
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got shape {shape} dtype {dtype}")
    return img


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then resize to ``size x size`` with Lanczos (anti-aliased when shrinking)."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    height, width = _check_rgb(img).shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = img[top : top + side, left : left + side]
    if side == size:
        return crop.copy()
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.LANCZOS)
    return np.array(resized, dtype=np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """``HxWx3`` uint8 -> float32 tensor ``[3, H, W]`` in [-1, 1]."""
    array = torch.from_numpy(np.require(_check_rgb(img), requirements=["C", "W"]))
    return array.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of ``to_tensor``: ``[3, H, W]`` in [-1, 1] (values outside are clamped) -> ``HxWx3`` uint8."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] tensor, got shape {tuple(tensor.shape)}")
    scaled = (tensor.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def save_image(image: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """Write a uint8 ``HxWx3`` array or a ``[3, H, W]`` tensor in [-1, 1]; the suffix picks the format."""
    path = Path(path)
    array = to_uint8(image) if isinstance(image, torch.Tensor) else _check_rgb(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(array).save(path)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"cannot save image {path}: unsupported file type {path.suffix!r} ({exc})") from None
    return path


def iter_image_files(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive), sorted by relative path, hidden files/dirs skipped.

    Extensions are matched case-insensitively against ``IMAGE_EXTENSIONS``.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"image directory {root} does not exist or is not a directory")
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        found.extend(
            Path(directory) / name
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def image_grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Stack equally sized images into a grid with 2-pixel white gutters."""
    gap = 2
    h, w = rows[0][0].shape[:2]
    grid = np.full((len(rows) * (h + gap) - gap, len(rows[0]) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = image
    return grid
