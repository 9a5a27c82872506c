"""Writing outputs so that a crash never leaves a half-written file: one `atomic_write` under every
file jaxdiff writes (JSON, text, npz, PNG), plus the formats built on it."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, BinaryIO, Callable, Optional, Sequence, Union

import numpy as np

Content = Union[str, bytes, Callable[[BinaryIO], None]]


def atomic_write(path: Union[str, os.PathLike], content: Content) -> str:
    """Write `content` (text, bytes, or a function writing to a binary file) to a temporary file in
    the target's directory, then rename it into place. Returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: Union[str, os.PathLike], obj: Any) -> str:
    """JSON (indented, numpy numbers as floats), atomically."""
    return atomic_write(path, json.dumps(obj, indent=1, default=float) + "\n")


def save_npz(path: Union[str, os.PathLike], images: np.ndarray, labels: Optional[np.ndarray] = None,
             captions: Optional[Sequence[str]] = None) -> str:
    """guided-diffusion's samples layout: arr_0 images (and arr_1 int64 labels), plus `captions` (a
    unicode array) for text-conditional samples, atomically."""
    arrays = [images] if labels is None else [images, np.asarray(labels, np.int64)]
    named = {} if captions is None else {"captions": np.asarray(list(captions), dtype=str)}
    return atomic_write(path, lambda f: np.savez(f, *arrays, **named))


def save_grid(path: Union[str, os.PathLike], images: np.ndarray, labels: Optional[np.ndarray] = None,
              ncol: int = 8, size: int = 512) -> str:
    """uint8 [N, H, W, C] as one PNG, `ncol` images a row, scaled up to about `size` pixels, each
    tile captioned with its label when `labels` are given."""
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    n, h, w, c = images.shape
    ncol = max(1, min(int(ncol), n))
    nrow = -(-n // ncol)
    scale = max(1, size // max(nrow * h, ncol * w))
    th, tw = h * scale, w * scale
    top = 12 if labels is not None else 0
    canvas = Image.new("RGB", (ncol * (tw + 2) + 2, nrow * (th + top + 2) + 2), (64, 64, 64))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, q = divmod(i, ncol)
        tile = images[i][..., 0] if c == 1 else images[i]
        img = Image.fromarray(tile).convert("RGB").resize((tw, th), Image.NEAREST)
        x0, y0 = 2 + q * (tw + 2), 2 + r * (th + top + 2)
        canvas.paste(img, (x0, y0 + top))
        if labels is not None:
            draw.text((x0 + 1, y0), f"y={int(labels[i])}", fill=(255, 255, 255))
    return atomic_write(path, lambda f: canvas.save(f, format="PNG"))
