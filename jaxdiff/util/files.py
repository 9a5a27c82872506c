"""Writing outputs so that a crash never leaves a half-written file: one `atomic_write` under every
file jaxdiff writes (JSON, text, npz, PNG), plus the formats built on it (`write_npz` streams an
array too large for memory into an npz, chunk by chunk)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

Content = Union[str, bytes, Callable[[BinaryIO], None]]


def atomic_write(path: Union[str, os.PathLike], content: Content) -> str:
    """Write `content` (text, bytes, or a function writing to a binary file) to a temporary file in
    the target's directory, then rename it into place. Returns the path.

    A URL (gs://...) is written through etils.epath in one go: object stores publish an object
    whole when it is closed, so there is no temporary file to rename."""
    path = os.fspath(path)
    if "://" in path:
        from etils import epath

        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as f:
            content(f) if callable(content) else f.write(content.encode() if isinstance(content, str) else content)
        return path
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


@dataclasses.dataclass(frozen=True)
class Rows:
    """An array to write as chunks of rows: its full shape and dtype and an iterable of the chunks."""

    shape: Tuple[int, ...]
    dtype: Any
    chunks: Iterable[np.ndarray]


def write_npz(path: Union[str, os.PathLike], arrays: Mapping[str, Union[np.ndarray, Rows]],
              comment: bytes = b"") -> str:
    """Writes ``arrays`` as ``np.savez`` does (uncompressed members ``<name>.npy``), streaming ``Rows``
    chunk by chunk, atomically; ``comment`` becomes the zip archive's comment (``np.load`` ignores
    it; at most 65535 bytes). Returns the path."""

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.comment = bytes(comment)
            for name, value in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    if isinstance(value, Rows):
                        _write_rows(member, name, value)
                    else:
                        np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    return atomic_write(path, write)


def _write_rows(member, name: str, rows: Rows) -> None:
    dtype, shape = np.dtype(rows.dtype), tuple(int(s) for s in rows.shape)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(member, header)
    written = 0
    for chunk in rows.chunks:
        chunk = np.ascontiguousarray(chunk, dtype)
        if chunk.shape[1:] != shape[1:]:
            raise ValueError(f"{name}: a chunk has rows of shape {chunk.shape[1:]}, expected {shape[1:]}")
        member.write(chunk.tobytes())
        written += chunk.shape[0]
    if written != shape[0]:
        raise ValueError(f"{name}: {written} rows were written, the header says {shape[0]}")


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
