"""Image and label arrays as the evaluators and samplers take them: validation and guided-diffusion's sample files."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

Array = np.ndarray


def validate_images(images: Any, *, image_shape: Optional[Sequence[int]] = None, what: str = "images") -> Array:
    """Checks a uint8 NHWC batch (optionally of a given (H, W, C)) and returns it as a numpy array."""
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise ValueError(f"{what} must be a uint8 array of shape [N, H, W, C], got {type(images).__name__}")
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{what} must be a uint8 array of shape [N, H, W, C] (NHWC), got shape {images.shape} "
                         f"with {images.ndim} dimensions")
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must have dtype uint8 (values 0..255, NHWC), got dtype {images.dtype}; "
                         "convert float images in [-1, 1] with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
    if images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must be NHWC with 1, 3 or 4 channels on the last axis, got shape {images.shape}"
                         + (" (channels-first NCHW? transpose to NHWC)" if images.shape[1] in (1, 3, 4) else ""))
    if image_shape is not None and tuple(images.shape[1:]) != tuple(int(s) for s in image_shape):
        raise ValueError(f"{what} have per-image shape {tuple(images.shape[1:])} (H, W, C) but the reference images "
                         f"have {tuple(int(s) for s in image_shape)}; samples must match the reference image shape")
    return images


def validate_labels(labels: Any, *, num_samples: int, num_classes: Optional[int], what: str = "labels") -> Array:
    """Checks integer class labels: shape [num_samples], every value in [0, num_classes) (>= 0 when
    num_classes is None)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{what} must be a 1-D integer array of shape [N], got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        # Integral floats (e.g. labels saved as float) are accepted; anything else is not.
        integral = labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))
        if labels.size and not integral:
            raise ValueError(f"{what} must be integers, got dtype {labels.dtype}")
    if labels.shape[0] != num_samples:
        raise ValueError(
            f"{what} count {labels.shape[0]} != samples count {num_samples}; there must be one label per sample")
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            allowed = "[0, inf)" if num_classes is None else f"[0, {num_classes}) for num_classes={num_classes}"
            raise ValueError(f"{what} contain {lo if lo < 0 else hi}, outside the allowed range {allowed}")
    return labels.astype(np.int64)


def load_samples_npz(path: Union[str, os.PathLike], *, num_classes: Optional[int] = None,
                     image_shape: Optional[Sequence[int]] = None) -> Tuple[Array, Optional[Array]]:
    """Reads guided-diffusion's sample file: ``arr_0`` uint8 NHWC images, optional ``arr_1`` labels.

    Returns (images, labels or None), validated like evaluate_samples' inputs (labels checked against
    [0, num_classes) when num_classes is given, images against image_shape when given).
    """
    path = os.fspath(path)
    with np.load(path, allow_pickle=False) as z:
        if "arr_0" not in z.files:
            raise ValueError(f"{path} has no 'arr_0' (uint8 NHWC images); it holds {z.files}")
        images = validate_images(z["arr_0"], image_shape=image_shape, what=f"{path}:arr_0")
        labels = None if "arr_1" not in z.files else validate_labels(
            z["arr_1"], num_samples=images.shape[0], num_classes=num_classes, what=f"{path}:arr_1 labels")
    return images, labels
