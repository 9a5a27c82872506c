"""Image transforms: resizing to a model's size (pad, resize, center_crop) and the model's [-1, 1] range.

Resizing to a model's ``image_size`` (square), when it differs from the stored size:
* ``"pad"`` (Fashion-MNIST, MNIST-like): centre the image on a ``pad_value`` background (0, the
  datasets' black background): Fashion-MNIST 28 -> 32 adds 2 pixels on each side.
* ``"resize"`` (digits): bicubic resize to image_size x image_size (e.g. 8 -> 16 or 32).
* ``"center_crop"`` (other tfds datasets): guided-diffusion's ``center_crop_arr``: box
  downsampling by 2 while the short side is >= 2 * image_size, bicubic resize of the short side
  to image_size, centre crop.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESIZE_MODES = ("pad", "resize", "center_crop")



def _pil_resize(image: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    # size is (width, height) as Pillow wants it.
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize(size, resample=resample))
    return out[..., None] if out.ndim == 2 else out


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr on one (H, W, C) uint8 image."""
    h, w = image.shape[:2]
    while min(h, w) >= 2 * size:
        image = _pil_resize(image, (w // 2, h // 2), Image.BOX)
        h, w = image.shape[:2]
    scale = size / min(h, w)
    image = _pil_resize(image, (round(w * scale), round(h * scale)), Image.BICUBIC)
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top: top + size, left: left + size]


def resize_images(images, image_size: int | None, mode: str, pad_value: int = 0) -> np.ndarray:
    """uint8 (n, image_size, image_size, C) from an (n, H, W, C) array or a list of images."""
    if image_size is None:
        return images if isinstance(images, np.ndarray) else np.stack(images)
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    s = int(image_size)
    if isinstance(images, np.ndarray) and images.shape[1:3] == (s, s):
        return images
    if mode == "pad" and isinstance(images, np.ndarray):
        h, w = images.shape[1:3]
        if h > s or w > s:
            raise ValueError(f"resize_mode='pad' cannot fit {h}x{w} images into {s}x{s}")
        top, left = (s - h) // 2, (s - w) // 2
        return np.pad(images, ((0, 0), (top, s - h - top), (left, s - w - left), (0, 0)),
                      constant_values=pad_value)
    out = []
    for im in images:
        if im.shape[:2] == (s, s):
            out.append(im)
        elif mode == "pad":
            out.append(resize_images(im[None], s, "pad", pad_value)[0])
        elif mode == "resize":
            out.append(_pil_resize(im, (s, s), Image.BICUBIC))
        else:
            out.append(_center_crop(im, s))
    return np.stack(out)


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 [-1, 1] (x / 127.5 - 1)."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
