"""The FID Inception-v3's weights: torch-fidelity's / pytorch-fid's state_dict (weights-inception-2015-12-05
-6726825d.pth; the same names) <-> jaxdiff params, and jaxdiff's weights file.

    python -m jaxdiff.convert.inception convert --pth weights-inception-2015-12-05-6726825d.pth \
        --out inception_fid.npz [--force]
reads the PyTorch weights with torch, needed for this step only, and writes a weights file that numpy
and JAX load alone: `params/<path>` arrays (Flax layout), `format` ("jaxdiff-inception-fid-v1"),
`fingerprint` (checked on load), `source` (the converted file's name), written atomically."""

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

from jaxdiff.convert.common import checked_params, load_state_dict, make_layout, mismatch_error
from jaxdiff.models.inception import InceptionV3
from jaxdiff.util import files

INPUT_SIZE = 299


FORMAT = "jaxdiff-inception-fid-v1"


FINGERPRINT_NAME = "inception-v3-fid-2015-12-05"


_PREFIX = "params/"


# Flax leaf name -> the PyTorch ports' state_dict suffix, for each layer kind
_CONV_LEAVES = {"kernel": "conv.weight", "scale": "bn.weight", "bias": "bn.bias", "mean": "bn.running_mean",
                "var": "bn.running_var"}


_FC_LEAVES = {"kernel": "weight", "bias": "bias"}


_UNUSED_SUFFIX = ".bn.num_batches_tracked"  # in the real files; not needed for inference


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
    """The state_dict entry (convert.Entry) of every parameter."""
    return make_layout(_abstract_params(), _torch_key, _transform)


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
    return checked_params(_layout(), sd, "Inception state_dict does not fit the FID Inception-v3", limit=12)


def check_params(params: Any) -> None:
    """Raise ValueError naming every missing, unexpected or wrongly shaped leaf of Flax `params`."""
    if not isinstance(params, Mapping):
        raise TypeError(f"Inception params must be a nested mapping of arrays, got {type(params).__name__}")
    expected = {k: tuple(a.shape) for k, a in flatten_dict(_abstract_params(), sep="/").items()}
    given = {k: tuple(np.shape(a)) for k, a in flatten_dict(params, sep="/").items()}
    err = mismatch_error("Inception params does not fit the FID Inception-v3", expected, given, limit=12)
    if err:
        raise ValueError(err)


def fingerprint(params: Any) -> str:
    """sha256 of the weights (jaxdiff.eval.metrics.params_fingerprint under the name of this network)."""
    from jaxdiff.util.fingerprint import params_fingerprint

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


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdiff.convert.inception",
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
