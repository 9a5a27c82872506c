"""The FID Inception-v3 around its network: preprocessing, weights, and the jitted feature function.

    python -m jaxdiff.inception convert --pth weights-inception-2015-12-05-6726825d.pth \
        --out inception_fid.npz [--force]
reads the PyTorch weights of torch-fidelity (weights-inception-2015-12-05-6726825d.pth) or
pytorch-fid (pt_inception-2015-12-05-6726825d.pth; the same state_dict names) with torch, needed
for this step only, and writes a jaxdiff weights file that numpy and JAX load alone.

Preprocessing (`mode`)
* "tf1" (default; guided-diffusion's evaluator, torch-fidelity): uint8 -> float32 in [0, 255];
  bilinear resize to 299x299 as TensorFlow 1's legacy resize_bilinear (no half-pixel offset:
  source coordinate = destination index * in_size / 299); then (x - 128) / 128.
* "pytorch_fid" (pytorch-fid): x / 255; bilinear resize with half-pixel centres (PyTorch's
  F.interpolate(mode="bilinear", align_corners=False): source = (index + 0.5) * in / out - 0.5,
  clamped at 0); then 2x - 1. Its numbers are pytorch-fid's, not the ADM evaluator's.
Neither antialiases. The resize is two interpolation-matrix products at full float32 precision.

Weights file (.npz, written atomically): `params/<path>` arrays (Flax layout), `format`
("jaxdiff-inception-fid-v1"), `fingerprint` (checked on load), `source` (the converted file's name).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdiff import cpu, files
from jaxdiff.convert import _checked_params, _make_layout, _mismatch_error, load_state_dict
from jaxdiff.models.inception import InceptionV3

__all__ = ["FORMAT", "INPUT_SIZE", "MODES", "check_images", "check_params", "expected_state_dict_shapes",
           "feature_fn", "features", "fingerprint", "load_params", "main", "params_from_state_dict", "preprocess",
           "resize_matrix", "save_params", "source_coordinates"]

MODES = ("tf1", "pytorch_fid")
INPUT_SIZE = 299
FORMAT = "jaxdiff-inception-fid-v1"
FINGERPRINT_NAME = "inception-v3-fid-2015-12-05"
_HIGHEST = jax.lax.Precision.HIGHEST
_PREFIX = "params/"

# Flax leaf name -> the PyTorch ports' state_dict suffix, for each layer kind
_CONV_LEAVES = {"kernel": "conv.weight", "scale": "bn.weight", "bias": "bn.bias", "mean": "bn.running_mean",
                "var": "bn.running_var"}
_FC_LEAVES = {"kernel": "weight", "bias": "bias"}
_UNUSED_SUFFIX = ".bn.num_batches_tracked"  # in the real files; not needed for inference


# --- Preprocessing -----------------------------------------------------------------------------------


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown Inception preprocessing mode {mode!r}; expected one of {MODES} "
                         f"('tf1': guided-diffusion's evaluator / torch-fidelity, 'pytorch_fid': pytorch-fid)")
    return mode


def check_images(images: Any) -> None:
    """Refuse anything but uint8 NHWC RGB images [B, H, W, 3] (works on tracers: shapes and dtypes only)."""
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"images must be a uint8 array [B, H, W, 3], got {type(images).__name__}")
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"images must be a uint8 array [B, H, W, 3] (NHWC), got shape {shape} ({len(shape)} dimensions)")
    if images.dtype != np.uint8:
        raise ValueError(f"images must have dtype uint8 (0..255, as guided-diffusion's samples.npz), got {images.dtype}; "
                         "convert [-1, 1] floats with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
    if shape[-1] != 3:
        hint = " (channels first? transpose NCHW to NHWC)" if shape[1] == 3 else ""
        raise ValueError(f"images must be RGB with 3 channels on the last axis (NHWC), got shape {shape}{hint}")
    if min(shape[1:3]) < 1:
        raise ValueError(f"images must have a positive height and width, got shape {shape}")


def source_coordinates(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """Where each output pixel samples the input: tf1 i * in / out; pytorch_fid max((i + 0.5) * in / out
    - 0.5, 0). Computed in float32 as TensorFlow 1 and PyTorch compute them (scale = float(in) / out,
    then one float multiply): over a few hundred pixels that rounding moves a coordinate by up to
    ~4e-5 pixels, i.e. up to ~1e-2 on the 0-255 scale between two very different neighbours, so the
    float64 formula would not reproduce their resized images to 1e-3."""
    _check_mode(mode)
    dst = np.arange(out_size, dtype=np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    if mode == "tf1":
        return dst * scale
    return np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))


def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """[out_size, in_size] float64 bilinear weights: row i mixes the two input pixels around
    `source_coordinates(...)[i]`; indices past the last pixel are clamped to it. No antialiasing, so
    downsampling skips pixels as TF1 and PyTorch do."""
    src = source_coordinates(in_size, out_size, mode).astype(np.float64)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    w = np.zeros((out_size, in_size), np.float64)
    np.add.at(w, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(w, (np.arange(out_size), hi), frac)
    return w


def _resize(x: jax.Array, mode: str) -> jax.Array:
    """Bilinear resize of float32 NHWC x to 299x299 (two matrix products; skipped where the identity)."""
    wy, wx = (resize_matrix(n, INPUT_SIZE, mode) for n in x.shape[1:3])
    if not np.array_equal(wy, np.eye(INPUT_SIZE)):
        x = jnp.einsum("oh,nhwc->nowc", jnp.asarray(wy, jnp.float32), x, precision=_HIGHEST)
    if not np.array_equal(wx, np.eye(INPUT_SIZE)):
        x = jnp.einsum("pw,nhwc->nhpc", jnp.asarray(wx, jnp.float32), x, precision=_HIGHEST)
    return x


def preprocess(images: jax.Array, mode: str = "tf1") -> jax.Array:
    """uint8 [B, H, W, 3] -> the network's float32 input [B, 299, 299, 3] (see the module doc)."""
    _check_mode(mode)
    check_images(images)
    x = images.astype(jnp.float32)
    if mode == "tf1":
        return (_resize(x, mode) - 128.0) / 128.0
    return 2.0 * _resize(x / 255.0, mode) - 1.0


# --- Feature function --------------------------------------------------------------------------------


def features(params: Any, images: jax.Array, mode: str = "tf1") -> dict:
    """Pure function: uint8 [B, H, W, 3] -> {"pool3" [B, 2048], "logits_unbiased" [B, 1008],
    "logits" [B, 1008], "spatial" [B, 2023]} (float32), for use inside other jitted/sharded code."""
    return InceptionV3().apply({"params": params}, preprocess(images, mode))


def pure_feature_fn(mode: str = "tf1"):
    """`fn(params, images_uint8) -> outputs` for `mode`, not jitted: for use inside other jitted or
    sharded programs (e.g. `jaxdiff.adm_eval`)."""
    return functools.partial(features, mode=_check_mode(mode))


@functools.lru_cache(maxsize=None)
def _jitted(mode: str):
    return cpu.jit(pure_feature_fn(mode))


def feature_fn(params: Any = None, mode: str = "tf1"):
    """The jitted `fn(params, images_uint8[B, H, W, 3]) -> outputs dict` of `features` for `mode`.

    `params`, when given, is checked against the network (every missing, unexpected or wrongly shaped
    leaf named) before anything is compiled. One compiled program per input shape."""
    _check_mode(mode)
    if params is not None:
        check_params(params)
    return _jitted(mode)


# --- Weights -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _abstract_params() -> dict:
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda x: InceptionV3().init(jax.random.key(0), x), x)["params"]


def _torch_key(path: tuple) -> str:
    leaves = _FC_LEAVES if path[0] == "fc" else _CONV_LEAVES
    return ".".join(path[:-1] + (leaves[path[-1]],))


def _transform(path: tuple, shape: tuple) -> str:
    return ("conv2d" if len(shape) == 4 else "dense") if path[-1] == "kernel" else "identity"


@functools.lru_cache(maxsize=None)
def _layout() -> tuple:
    """The state_dict entry (convert._Entry) of every parameter."""
    return _make_layout(_abstract_params(), _torch_key, _transform)


def expected_state_dict_shapes() -> dict:
    """state_dict key -> PyTorch shape of every tensor the network needs (the `*.bn.num_batches_tracked`
    counters of the real files are accepted too, and ignored)."""
    return {e.key: e.shape for e in _layout()}


def params_from_state_dict(state_dict: Any) -> dict:
    """torch-fidelity's / pytorch-fid's Inception state_dict (a mapping of numpy arrays or torch tensors,
    or a .pth/.npz path) -> Flax params (float32 jax arrays). Strict: every missing, unexpected or
    wrongly shaped key is named in one ValueError."""
    expected = expected_state_dict_shapes()
    sd = {k: v for k, v in load_state_dict(state_dict).items()
          if not (k.endswith(_UNUSED_SUFFIX) and k[: -len(_UNUSED_SUFFIX)] + ".conv.weight" in expected)}
    return _checked_params(_layout(), sd, "Inception state_dict does not fit the FID Inception-v3", limit=12)


def check_params(params: Any) -> None:
    """Raise ValueError naming every missing, unexpected or wrongly shaped leaf of Flax `params`."""
    if not isinstance(params, Mapping):
        raise TypeError(f"Inception params must be a nested mapping of arrays, got {type(params).__name__}")
    expected = {k: tuple(a.shape) for k, a in flatten_dict(_abstract_params(), sep="/").items()}
    given = {k: tuple(np.shape(a)) for k, a in flatten_dict(params, sep="/").items()}
    err = _mismatch_error("Inception params does not fit the FID Inception-v3", expected, given, limit=12)
    if err:
        raise ValueError(err)


def fingerprint(params: Any) -> str:
    """sha256 of the weights (jaxdiff.metrics.params_fingerprint under the name of this network)."""
    from jaxdiff.metrics import params_fingerprint

    return params_fingerprint(params, name=FINGERPRINT_NAME)


def save_params(path, params: Any, *, source: str = "", force: bool = False) -> str:
    """Write a weights file (see the module doc) atomically; returns its fingerprint. Refuses to
    replace an existing file unless force."""
    check_params(params)
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass --force (force=True) to replace it")
    fp = fingerprint(params)
    arrays = {_PREFIX + k: np.asarray(a, np.float32) for k, a in flatten_dict(params, sep="/").items()}
    arrays.update(format=np.asarray(FORMAT), fingerprint=np.asarray(fp), source=np.asarray(str(source)))
    files.atomic_write(path, lambda f: np.savez(f, **arrays))
    return fp


def load_params(path) -> dict:
    """Flax params (float32 jax arrays) from a file written by `save_params` / the converter (its
    fingerprint is checked), or from the PyTorch weights themselves: a .pth/.pt (needs torch) or an
    .npz of the state_dict."""
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"no Inception weights at {path}")
    if path.suffix != ".npz":
        return params_from_state_dict(path)
    with np.load(path, allow_pickle=False) as z:
        if "format" not in z.files:
            return params_from_state_dict({k: z[k] for k in z.files})
        if str(z["format"]) != FORMAT:
            raise ValueError(f"{path} has format {str(z['format'])!r}; this jaxdiff reads {FORMAT!r}")
        stored = str(z["fingerprint"])
        params = unflatten_dict({k[len(_PREFIX):]: z[k] for k in z.files if k.startswith(_PREFIX)}, sep="/")
    check_params(params)
    if fingerprint(params) != stored:
        raise ValueError(f"{path}: the weights' fingerprint differs from the one stored in the file "
                         "(damaged or modified); convert the .pth again")
    return jax.device_put(params)


# --- Command line ------------------------------------------------------------------------------------


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdiff.inception",
                                description="The FID Inception-v3's weights for jaxdiff.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="PyTorch .pth (torch-fidelity / pytorch-fid) -> jaxdiff weights file")
    c.add_argument("--pth", required=True, help="e.g. weights-inception-2015-12-05-6726825d.pth (needs torch)")
    c.add_argument("--out", required=True, help="output .npz, e.g. inception_fid.npz")
    c.add_argument("--force", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)

    src, out = Path(args.pth), Path(args.out).absolute()
    if not src.is_file():
        print(f"error: no file at --pth {src}", file=sys.stderr)
        return 2
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    if src.suffix != ".npz" and not _torch_available():
        print(f"error: reading {src} needs PyTorch, for this conversion step only (pip install torch; the CPU "
              "build is enough). The converted file then loads with numpy/JAX alone.", file=sys.stderr)
        return 2
    params = params_from_state_dict(src)
    fp = save_params(out, params, source=src.name, force=args.force)
    n = sum(int(np.prod(np.shape(a))) for a in flatten_dict(params).values())
    print(json.dumps({"out": str(out), "parameters": n, "fingerprint": fp}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
