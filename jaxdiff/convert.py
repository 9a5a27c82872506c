"""Loading openai/guided-diffusion and openai/glide-text2im (PyTorch) checkpoints into jaxdiff models.

    python -m jaxdiff.convert (--pt FILE.pt | --npz FILE.npz) --kind unet|classifier|superres \
        --flags "<guided-diffusion command-line flags>" --out DIR [--force]
    python -m jaxdiff.convert --source glide (--pt | --npz) FILE [--kind text2im|...|clip-image|clip-text] \
        [--flags "<GLIDE options or clip/config.yaml values>"] --out DIR [--force]

writes DIR/config.json ({"kind", "model", "diffusion", "source"}) and DIR/params (orbax), atomically;
an existing non-empty DIR is only replaced with --force. GLIDE's options and kinds: `convert_glide`,
`convert_clip`.

Layout mapping: Conv2d OIHW -> HWIO; Linear (out, in) -> (in, out); the token-wise conv1d layers (qkv,
proj_out, qkv_proj, c_proj, encoder_kv; weight (O, I, 1)) -> Dense (I, O); GroupNorm weight -> scale;
Embedding weight -> embedding; the classifier's positional_embedding (C, T) -> (T, C). GLIDE's caption
encoder (top-level state_dict keys) lives under `text_encoder`; its Linear layers -> Dense.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdiff import config_util

__all__ = ["abstract_params", "describe_key_problem", "expected_state_dict_shapes", "flags_from_args",
           "from_guided_diffusion", "key_problems", "load_converted", "load_state_dict", "main", "parse_gd_flags",
           "save_converted", "to_guided_diffusion"]

KINDS = ("unet", "classifier", "superres")  # guided-diffusion's; the text-conditional ones: convert_glide
SOURCES = ("guided-diffusion", "glide")
NUM_CLASSES = 1000

# --- guided-diffusion's command-line flags (script_util's defaults) ---------------------------------
_DIFFUSION_DEFAULTS = dict(learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                           use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False)
_MODEL_DEFAULTS = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                       num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
                       class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
                       use_fp16=False, use_new_attention_order=False)
_CLASSIFIER_DEFAULTS = dict(image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
                            classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
                            classifier_resblock_updown=True, classifier_pool="attention")
_SR_DEFAULTS = dict(large_size=256, small_size=64)
# Flags of guided-diffusion's sampling / training scripts that do not shape the network: accepted and
# returned by parse_gd_flags, ignored by flags_from_args.
_SCRIPT_DEFAULTS = dict(
    clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="", classifier_path="",
    classifier_scale=1.0, base_samples="", data_dir="", val_data_dir="", schedule_sampler="uniform", lr=1e-4,
    weight_decay=0.0, lr_anneal_steps=0, microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000,
    resume_checkpoint="", fp16_scale_growth=1e-3, noised=True, iterations=150000, anneal_lr=False, eval_interval=5)
_ALL_DEFAULTS = {**_SCRIPT_DEFAULTS, **_DIFFUSION_DEFAULTS, **_CLASSIFIER_DEFAULTS, **_SR_DEFAULTS, **_MODEL_DEFAULTS}
_UNET_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_SR_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
# U-Net flags guided-diffusion's and GLIDE's create_model pass on as they are
_PASSED = ("dropout", "use_fp16", "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
           "resblock_updown")


def _typed(name: str, v: str, defaults: Mapping):
    """`v` converted to the type of defaults[name] (booleans as argparse's str2bool)."""
    default = defaults[name]
    if isinstance(default, bool):
        if v.lower() in ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"):
            return v.lower() in ("yes", "true", "t", "y", "1")
        raise ValueError(f"--{name} {v!r}: boolean value expected (True/False)")
    try:
        return type(default)(v) if isinstance(default, (int, float)) else v
    except ValueError:
        raise ValueError(f"--{name} {v!r}: expected {type(default).__name__}") from None


def _parse_given(argstring: str, defaults: Mapping = _ALL_DEFAULTS, source: str = "guided-diffusion") -> dict:
    """The flags given in `argstring` ("--name value" or "--name=value"), typed like their entries in
    `defaults` (guided-diffusion's by default); unknown names raise ValueError with a suggestion."""
    tokens = shlex.split(argstring) if isinstance(argstring, str) else list(argstring)
    given = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected token {tok!r} in {source} flags (expected --name value)")
        if "=" in tok:
            name, value = tok[2:].split("=", 1)
            i += 1
        else:
            name = tok[2:]
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"--{name} needs a value ({source} flags are '--name value')")
            value = tokens[i + 1]
            i += 2
        if name not in defaults:
            hint = config_util.did_you_mean(name, defaults, cutoff=0.5, quote=lambda n: "--" + n)
            raise ValueError(f"unknown {source} flag --{name}{hint}")
        given[name] = _typed(name, value, defaults)
    return given


def parse_gd_flags(argstring: str) -> dict:
    """Every guided-diffusion command-line flag (model, classifier, super-res, diffusion and script
    flags) with script_util's defaults, overridden by the typed values in `argstring`."""
    return {**_ALL_DEFAULTS, **_parse_given(argstring)}


def _channel_mult_for(image_size: int, table: dict, what: str):
    if image_size not in table:
        raise ValueError(f"unsupported {what}: {image_size} (guided-diffusion knows {sorted(table)})")
    return table[image_size]


def _ds(resolutions: str, size: int) -> tuple:
    return tuple(size // int(res) for res in str(resolutions).split(","))


def _unet_flags(a: Mapping, size: int, channel_mult: tuple) -> dict:
    """The U-Net constructor flags guided-diffusion's and GLIDE's create_model derive alike."""
    return dict(image_size=size, in_channels=3, model_channels=a["num_channels"],
                out_channels=6 if a["learn_sigma"] else 3, num_res_blocks=a["num_res_blocks"],
                attention_resolutions=_ds(a["attention_resolutions"], size), channel_mult=channel_mult,
                **{k: a[k] for k in _PASSED})


def _infer_kind(given: dict) -> str:
    if "large_size" in given or "small_size" in given:
        return "superres"
    model_specific = set(_MODEL_DEFAULTS) - {"image_size"}
    classifier = [k for k in given if k.startswith("classifier_") and k not in ("classifier_path", "classifier_scale")]
    return "classifier" if classifier and not model_specific & set(given) else "unet"


def flags_from_args(argstring: str, kind: Optional[str] = None) -> tuple:
    """guided-diffusion command-line flags -> (model constructor kwargs, diffusion kwargs).

    Reproduces script_util.create_model ("unet"), create_classifier ("classifier") and
    sr_create_model ("superres"): channel_mult chosen by image size, attention resolutions turned into
    downsampling factors ds = image_size // res, out_channels 6 with learn_sigma, num_classes 1000
    with class_cond; classifiers get out_channels 1000 and num_head_channels 64. `kind=None` infers
    it (large_size/small_size -> superres, only classifier_* flags -> classifier, else unet).
    The diffusion dict holds the flags of _DIFFUSION_DEFAULTS. Script-only flags are ignored.
    """
    given = _parse_given(argstring)
    a = {**_ALL_DEFAULTS, **given}
    kind = kind or _infer_kind(given)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    diffusion = {k: a[k] for k in _DIFFUSION_DEFAULTS}
    if kind == "classifier":
        size = a["image_size"]
        return dict(image_size=size, in_channels=3, model_channels=a["classifier_width"], out_channels=1000,
                    num_res_blocks=a["classifier_depth"],
                    attention_resolutions=_ds(a["classifier_attention_resolutions"], size),
                    channel_mult=_channel_mult_for(size, _UNET_MULT, "image size"),
                    use_fp16=a["classifier_use_fp16"], num_head_channels=64,
                    use_scale_shift_norm=a["classifier_use_scale_shift_norm"],
                    resblock_updown=a["classifier_resblock_updown"], pool=a["classifier_pool"]), diffusion
    if kind == "superres":
        for flag in ("channel_mult", "use_new_attention_order"):
            if flag in given and given[flag] != _MODEL_DEFAULTS[flag]:
                raise ValueError(f"--{flag} is not a flag of guided-diffusion's super-resolution scripts "
                                 f"(sr_create_model fixes it); remove it")
        size = a["large_size"]
        channel_mult = _channel_mult_for(size, _SR_MULT, "large size")
    else:
        size = a["image_size"]
        if a["channel_mult"]:
            channel_mult = tuple(int(v) if v.is_integer() else v for v in map(float, a["channel_mult"].split(",")))
        else:
            channel_mult = _channel_mult_for(size, _UNET_MULT, "image size")
    model = _unet_flags(a, size, channel_mult)
    model.update(num_classes=NUM_CLASSES if a["class_cond"] else None, use_checkpoint=a["use_checkpoint"])
    if kind == "unet":
        model["use_new_attention_order"] = a["use_new_attention_order"]
    return model, diffusion


# --- Parameter layout: jaxdiff param tree <-> state_dict ---------------------------------------------

_CONV1D = {"qkv", "encoder_kv", "proj_out", "qkv_proj", "c_proj"}
_TEXT = "text_encoder"  # GLIDE's caption encoder; its parameters are top-level keys of the state_dict
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
         "positional_embedding": "positional_embedding", "padding_embedding": "padding_embedding"}
_ORDER = [
    "positional_embedding", "padding_embedding",
    "time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out",
    "transformer", "final_ln", "token_embedding", "transformer_proj",
    "in_layers", "emb_layers", "out_layers", "skip_connection", "op", "conv",
    "norm", "qkv", "encoder_kv", "proj_out", "qkv_proj",
    "resblocks", "attn", "ln_1", "mlp", "ln_2", "c_qkv", "c_fc", "c_proj", "weight", "bias",
]
_RANK = {n: i for i, n in enumerate(_ORDER)}


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple  # path in the Flax params tree
    key: str  # state_dict key
    shape: tuple  # torch shape
    flax_shape: tuple
    transform: str  # conv2d | conv1d | dense | identity


def _to_flax(a: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv2d":
        return a.transpose(2, 3, 1, 0)
    if transform == "conv1d":
        return a[:, :, 0].T
    return a.T if transform == "dense" else a


def _to_torch(a: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv2d":
        return a.transpose(3, 2, 0, 1)
    if transform == "conv1d":
        return a.T[:, :, None]
    return a.T if transform == "dense" else a


def _make_layout(abstract, key_of: Callable, transform_of: Callable, order: Optional[Callable] = None) -> tuple:
    """An _Entry per leaf of an abstract params tree (sorted by `order` of the keys when given).
    `transform_of(path, flax_shape)` names the layout change."""
    entries = []
    for path, leaf in flatten_dict(abstract).items():
        shape = tuple(leaf.shape)
        tr = transform_of(path, shape)
        # the torch shape: a zero-stride view of the Flax shape transposed (nothing is allocated)
        torch_shape = _to_torch(np.broadcast_to(np.float32(0), shape), tr).shape
        entries.append(_Entry(path, key_of(path), torch_shape, shape, tr))
    return tuple(sorted(entries, key=lambda e: order(e.key)) if order else entries)


def _torch_key(path: tuple) -> str:
    if path[0] == _TEXT:  # names like ln_1 keep their underscore; only resblocks_<i> is indexed
        mods = [re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", p) for p in path[1:-1]]
    else:
        mods = [re.sub(r"_(\d+)", r".\1", p) for p in path[:-1]]
    return ".".join(mods + [_LEAF[path[-1]]])


def _order_key(key: str):
    return [(0, int(p), "") if p.isdigit() else (1, _RANK.get(p, len(_RANK)), p) for p in key.split(".")]


def _transform(path: tuple, shape: tuple) -> str:
    leaf = path[-1]
    if path[0] == _TEXT:
        return "dense" if leaf == "kernel" else "identity"
    if leaf == "kernel":
        return "conv2d" if len(shape) == 4 else "conv1d" if path[-2] in _CONV1D else "dense"
    return "dense" if leaf == "positional_embedding" else "identity"


def _kind_of(module) -> str:
    from jaxdiff.models import MODEL_KINDS

    kinds = [kind for kind, cls in MODEL_KINDS.items() if isinstance(module, cls)]
    if not kinds:
        raise ValueError(f"not a jaxdiff ADM model: {type(module).__name__}")
    return next((k for k in kinds if type(module) is MODEL_KINDS[k]), kinds[-1])


def abstract_params(module, kind: Optional[str] = None):
    """Shapes/dtypes of `module`'s params (jax.eval_shape of init: nothing is computed or allocated)."""
    import jax
    import jax.numpy as jnp

    kind = kind or _kind_of(module)
    s = module.image_size
    x = jax.ShapeDtypeStruct((1, s, s, module.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    kw = {}
    if kind.startswith(("superres", "text2im_superres")):
        kw["low_res"] = x
    if kind.startswith("text2im"):
        kw["tokens"] = jax.ShapeDtypeStruct((1, module.text_ctx), jnp.int32)
        kw["mask"] = jax.ShapeDtypeStruct((1, module.text_ctx), jnp.bool_)
    elif kind != "classifier" and module.num_classes is not None:
        kw["y"] = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(lambda x, t, kw: module.init(jax.random.key(0), x, t, **kw), x, t, kw)["params"]


@functools.lru_cache(maxsize=64)
def _layout_cached(module, kind: str) -> tuple:
    return _make_layout(abstract_params(module, kind), _torch_key, _transform, _order_key)


def _layout(module, kind: Optional[str] = None) -> tuple:
    kind = kind or _kind_of(module)
    try:
        return _layout_cached(module, kind)
    except TypeError:  # unhashable flags
        return _layout_cached.__wrapped__(module, kind)


def expected_state_dict_shapes(module, kind: Optional[str] = None) -> dict:
    """guided-diffusion state_dict key -> torch shape that `module` requires, in state_dict order.
    Computed with jax.eval_shape; the converter checks checkpoints against exactly this."""
    return {e.key: e.shape for e in _layout(module, kind)}


# --- Error hints -------------------------------------------------------------------------------------


def _num_blocks(keys, which: str) -> int:
    idx = [int(k.split(".")[1]) for k in keys if k.startswith(which + ".")]
    return max(idx) + 1 if idx else 0


_TEXT_KEYS = ("positional_embedding", "padding_embedding", "token_embedding", "transformer", "final_ln",
              "transformer_proj")


def _text_hint(key, problem, kind, expected: dict, given: dict) -> Optional[str]:
    """The hint for GLIDE's caption-encoder keys and encoder_kv; None for other keys."""
    parts = key.split(".")
    top = parts[0]
    if not (top in _TEXT_KEYS or "encoder_kv" in parts):
        return None
    exp_shape, got_shape = expected.get(key), given.get(key)
    if not kind.startswith("text2im"):
        return ("the model kind: a text-conditional GLIDE checkpoint needs a 'text2im*' kind (python -m "
                "jaxdiff.convert --source glide)")
    if top == "padding_embedding" and problem != "shape":
        return f"xf_padding: the checkpoint {'has no' if problem == 'missing' else 'has a'} padding embedding"
    if top == "final_ln" and problem != "shape":
        return f"xf_final_ln: the checkpoint {'has no' if problem == 'missing' else 'has a'} final LayerNorm"
    if top == "transformer" and problem != "shape":
        n = {which: len({k.split(".")[2] for k in keys if k.startswith("transformer.resblocks.")})
             for which, keys in (("given", given), ("expected", expected))}
        return f"xf_layers: the checkpoint has {n['given']} transformer blocks, these flags give {n['expected']}"
    if problem != "shape":
        return ("the model kind: the checkpoint has no caption encoder / encoder_kv (a guided-diffusion checkpoint?)"
                if problem == "missing" else "the model kind or the checkpoint (key not produced by GLIDE's constructors)")
    if top == "token_embedding" and exp_shape[0] != got_shape[0]:
        return f"n_vocab (the tokenizer's vocabulary size): the checkpoint has {got_shape[0]} token rows"
    if top in ("positional_embedding", "padding_embedding") and exp_shape[0] != got_shape[0]:
        return f"text_ctx: the checkpoint's text embeddings have {got_shape[0]} positions"
    if top == "transformer_proj" or "encoder_kv" in parts:
        return "xf_width / model_channels / channel_mult (channel counts differ)"
    return f"xf_width: the checkpoint's caption encoder is {got_shape[-1]} wide"


def _hint(key, problem, kind, expected: dict, given: dict) -> str:
    text = _text_hint(key, problem, kind, expected, given)
    if text is not None:
        return text
    parts = key.split(".")
    top = parts[0]
    exp_shape, got_shape = expected.get(key), given.get(key)
    if top == "label_emb":
        if problem == "missing":
            return "the flags build a class-conditional model but the checkpoint is not: num_classes=None (class_cond False)"
        if problem == "unexpected":
            return "the checkpoint is class-conditional: set num_classes (class_cond True)"
        return f"num_classes (class_cond; null_label adds one row): checkpoint has {got_shape[0]} label rows"
    if top == "time_embed":
        return "model_channels (num_channels / classifier_width)"
    if top in ("input_blocks", "output_blocks", "middle_block"):
        for which in ("input_blocks", "output_blocks"):
            ne, ng = _num_blocks(expected, which), _num_blocks(given, which)
            if ne != ng:
                return f"num_res_blocks / channel_mult: the checkpoint has {ng} {which}, these flags give {ne}"
        if key == "input_blocks.0.0.weight" and problem == "shape" and exp_shape[1] != got_shape[1]:
            return (f"in_channels: the checkpoint's first conv takes {got_shape[1]} channels, these flags give "
                    f"{exp_shape[1]} (super-resolution and inpainting models widen the input: kind 'superres' vs "
                    f"'unet', 'text2im_superres' / 'text2im_inpaint' vs 'text2im')")
        if problem == "shape":
            if ".emb_layers." in key and exp_shape and got_shape:
                if got_shape[0] == 2 * exp_shape[0]:
                    return "use_scale_shift_norm: the checkpoint uses scale-shift norm (emb_layers give 2C)"
                if exp_shape[0] == 2 * got_shape[0]:
                    return "use_scale_shift_norm: the checkpoint does not use scale-shift norm (emb_layers give C)"
            return "model_channels / channel_mult (channel counts differ)"
        if top != "middle_block" and len(parts) > 3:  # a layer of an input or output block
            layer = ".".join(parts[:3])
            other = given if problem == "missing" else expected
            theirs = {k.split(".")[3] for k in other if k.startswith(layer + ".") and len(k.split(".")) > 4}
            resample = {"op", "conv"}
            if (parts[3] in resample and theirs and not theirs & resample) or (
                    parts[3] not in resample and theirs & resample):
                return "resblock_updown (ResBlock up/down vs Upsample/Downsample layers)"
            if parts[3] in resample and not theirs:
                return "conv_resample / resblock_updown (learned up/down-sampling convolutions)"
        if (top != "middle_block" and {"norm", "qkv", "proj_out"} & set(parts[3:])) or (
                top == "middle_block" and parts[1] == "1"):
            return "attention_resolutions (where attention layers sit)"
        if "skip_connection" in parts:
            return "model_channels / channel_mult (a skip connection exists only where channels change)"
        return "num_res_blocks / channel_mult / attention_resolutions (block layout differs)"
    if top == "out":
        if kind == "classifier":
            if problem == "shape":
                if "positional_embedding" in parts:
                    return "image_size / channel_mult (the attention pool's positional embedding covers image_size // ds pixels)"
                if "c_proj" in parts or (parts[1] in ("2", "3") and exp_shape and got_shape and exp_shape[0] != got_shape[0]):
                    return f"out_channels (number of classes): the checkpoint has {got_shape[0]}"
                return "model_channels / channel_mult"
            return "pool (adaptive / attention / spatial / spatial_v2 have different heads)"
        if problem == "shape" and exp_shape and got_shape and exp_shape[0] != got_shape[0]:
            return f"out_channels / learn_sigma: the checkpoint outputs {got_shape[0]} channels (6 = learned sigma, 3 = fixed)"
        return "model_channels / channel_mult"
    return "the model kind or the checkpoint (key not produced by guided-diffusion's constructors)"


def key_problems(expected: Mapping, given: Mapping) -> list:
    """(problem, key) for every key whose shape differs ("shape"), then every key not expected
    ("unexpected"), then every expected key not given ("missing"); `expected` and `given` map
    keys to shapes."""
    wrong = [k for k in expected if k in given and tuple(given[k]) != tuple(expected[k])]
    unexpected = [k for k in given if k not in expected]
    missing = [k for k in expected if k not in given]
    return [("shape", k) for k in wrong] + [("unexpected", k) for k in unexpected] + [("missing", k) for k in missing]


def describe_key_problem(problem: str, key: str, expected: Mapping, given: Mapping) -> str:
    """One line naming the key, its shape and what the model needs (a `key_problems` entry)."""
    if problem == "shape":
        return f"key {key!r} has shape {tuple(given[key])}, the model needs {tuple(expected[key])}"
    if problem == "unexpected":
        return f"unexpected key {key!r} {tuple(given[key])} (not in the model)"
    return f"missing key {key!r} {tuple(expected[key])} (the model needs it)"


_GD_FOOTER = ("  (num_heads / num_head_channels / use_new_attention_order do not change shapes: check them "
              "against the checkpoint's release flags too)")


def _mismatch_error(what: str, expected: dict, given: dict, hint_fn: Optional[Callable] = None, kind: str = "",
                    footer: Optional[str] = None, limit: int = 8) -> Optional[str]:
    """None when `given` (key -> shape) matches `expected` exactly; else "`what` (counts)" and a line per
    missing, unexpected or wrongly shaped key (up to `limit`), each with the flag `hint_fn(key, problem,
    kind, expected, given)` most likely responsible when hint_fn is given."""
    problems = key_problems(expected, given)
    if not problems:
        return None
    counts = collections.Counter(p for p, _ in problems)
    head = (f"{what} ({counts['missing']} missing, {counts['unexpected']} unexpected, {counts['shape']} wrongly "
            f"shaped keys)")
    lines = [f"  {describe_key_problem(p, k, expected, given)}" for p, k in problems]
    if hint_fn is None:
        head += ":"
    else:
        hints = [hint_fn(k, p, kind, expected, given) for p, k in problems]
        ranked = [h for h, _ in collections.Counter(hints).most_common()]
        head += f"; most likely flag: {ranked[0]}" + (f" (also: {'; '.join(ranked[1:3])})" if len(ranked) > 1 else "")
        lines = [f"{line}; likely flag: {h}" for line, h in zip(lines, hints)]
    more = [f"  ... and {len(lines) - limit} more"] if len(lines) > limit else []
    return "\n".join([head] + lines[:limit] + more + ([footer] if footer else []))


# --- Conversion --------------------------------------------------------------------------------------


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def load_state_dict(source) -> dict:
    """A guided-diffusion state_dict as {key: np.ndarray}, from a mapping (numpy arrays or torch
    tensors), a .npz file, or a .pt file (read with torch.load(map_location='cpu', weights_only=True))."""
    if isinstance(source, Mapping):
        return {str(k): _as_numpy(v) for k, v in source.items()}
    path = Path(os.fspath(source))
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch); or convert the state_dict to .npz"
        ) from None
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state_dict (got {type(sd).__name__})")
    return {str(k): _as_numpy(v) for k, v in sd.items()}


def from_guided_diffusion(state_dict, kind: str, **flags):
    """Build the jaxdiff model for guided-diffusion constructor `flags` and convert `state_dict`.

    state_dict: mapping of numpy arrays / torch tensors, or a path to a .pt or .npz file.
    kind: "unet" (UNetModel), "classifier" (EncoderUNetModel) or "superres" (SuperResModel, given
    in_channels=3 like guided-diffusion), or a GLIDE text-conditional kind (`models.TEXT_KINDS`, GLIDE's
    constructor flags; `convert_glide.from_glide` takes GLIDE's options instead).
    Returns (module, params) for module.apply({'params': params}, ...).
    Every key must be consumed: a missing, unexpected or wrongly shaped key raises ValueError naming
    the key and the flag that most likely differs.
    """
    from jaxdiff.models import create_model

    module = create_model(kind, **flags)  # kind and flags are checked before the file is read
    source = "GLIDE" if kind.startswith("text2im") else "guided-diffusion"
    footer = _GD_FOOTER.replace("use_new_attention_order", "xf_heads") if source == "GLIDE" else _GD_FOOTER
    params = _checked_params(_layout(module, kind), load_state_dict(state_dict),
                             f"{source} state_dict does not fit the {kind!r} model built from these flags",
                             hint_fn=_hint, kind=kind, footer=footer)
    return module, params


def _checked_params(layout: tuple, sd: dict, what: str, **mismatch) -> dict:
    """Flax params (float32) from a state_dict, once its keys and shapes match `layout` (else
    ValueError: `_mismatch_error(what, ..., **mismatch)`)."""
    import jax

    err = _mismatch_error(what, {e.key: e.shape for e in layout}, {k: tuple(np.shape(v)) for k, v in sd.items()},
                          **mismatch)
    if err:
        raise ValueError(err)
    flat = {}
    for e in layout:
        a = np.asarray(sd[e.key])
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"key {e.key!r} has dtype {a.dtype}, expected floating point")
        flat[e.path] = np.ascontiguousarray(_to_flax(a.astype(np.float32), e.transform))
    return jax.device_put(unflatten_dict(flat))  # one transfer of the whole tree (per leaf is ~10x slower)


def _state_dict_from_layout(params, layout: tuple) -> dict:
    """{state_dict key: np.ndarray} in torch layout and `layout` order, from Flax params."""
    flat, out = flatten_dict(params), {}
    for e in layout:
        a = np.asarray(flat[e.path], dtype=np.float32)
        if tuple(a.shape) != e.flax_shape:
            raise ValueError(f"param {'/'.join(e.path)} has shape {a.shape}, expected {e.flax_shape}")
        out[e.key] = np.ascontiguousarray(_to_torch(a, e.transform))
    return out


def to_guided_diffusion(params, module, kind: Optional[str] = None) -> dict:
    """Inverse of from_guided_diffusion: jaxdiff params -> {state_dict key: np.ndarray} (torch layout,
    state_dict order)."""
    return _state_dict_from_layout(params, _layout(module, kind))


# --- Converted checkpoints on disk -------------------------------------------------------------------


def save_converted(directory, params, kind: str, model_flags: dict, diffusion_flags: Optional[dict] = None,
                   force: bool = False, *, source: str = "guided-diffusion", extra: Optional[dict] = None) -> Path:
    """Write DIR/config.json and DIR/params (orbax), atomically via DIR.tmp + rename. Refuses an
    existing non-empty DIR unless force. `source` (one of SOURCES) is recorded in config.json and
    `extra` entries are added to it."""
    import orbax.checkpoint as ocp

    if source not in SOURCES:
        raise ValueError(f"source={source!r}: expected one of {SOURCES}")
    out = Path(os.fspath(directory)).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force (force=True) to replace it")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        ckptr.close()
        config = {"kind": kind, "model": dict(model_flags), "diffusion": dict(diffusion_flags or {}),
                  "source": source, **(extra or {})}
        with open(tmp / "config.json", "w") as f:
            json.dump(config_util.jsonable(config), f, indent=1)
        if out.exists():
            old = out.with_name(out.name + ".old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_converted(directory, **overrides):
    """(module, params, config) from a directory written by `python -m jaxdiff.convert`.

    `overrides` replace model flags that do not change parameter shapes, e.g. dtype="float32" (a
    checkpoint converted with use_fp16=True computes in bfloat16 unless dtype is given) or
    use_checkpoint=True. config is the file's content (without the overrides). CLIP encoders
    (kind clip-image / clip-text) have config["clip"] with glide's CLIP config (logit_scale)."""
    import orbax.checkpoint as ocp

    from jaxdiff.models import create_model
    from jaxdiff.models.clip import CLIP_KINDS, create_clip_encoder

    d = Path(os.fspath(directory)).absolute()
    with open(d / "config.json") as f:
        config = json.load(f)
    flags = {**config["model"], **overrides}
    if config["kind"] in CLIP_KINDS:
        from jaxdiff.convert_clip import abstract_clip_params

        module = create_clip_encoder(config["kind"], **flags)
        abstract = abstract_clip_params(module)
    else:
        module = create_model(config["kind"], **flags)
        abstract = abstract_params(module, config["kind"])
    # Restored on the host, as numpy (as checkpoints.load_model does): with no target sharding,
    # orbax would place the arrays as saved, on process 0's device, which fails on other processes.
    import jax

    ckptr = ocp.PyTreeCheckpointer()
    try:
        params = ckptr.restore(d / "params", args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)))
    finally:
        ckptr.close()
    return module, params, config


def main(argv=None) -> int:
    from jaxdiff import convert_glide
    from jaxdiff.models import TEXT_KINDS
    from jaxdiff.models.clip import CLIP_KINDS

    p = argparse.ArgumentParser(
        prog="python -m jaxdiff.convert",
        description="Convert an openai/guided-diffusion or openai/glide-text2im checkpoint (text U-Nets and "
                    "the noised CLIP encoders) into a jaxdiff checkpoint directory.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pt", help="PyTorch .pt state_dict (needs torch)")
    src.add_argument("--npz", help="numpy .npz state_dict (keys as in the .pt file)")
    glide_kinds = tuple(TEXT_KINDS) + tuple(CLIP_KINDS)
    p.add_argument("--source", choices=SOURCES, default=None,
                   help="the repository the checkpoint comes from (default: glide for a GLIDE --kind, else "
                        "guided-diffusion)")
    p.add_argument("--kind", choices=KINDS + glide_kinds, default=None,
                   help=f"guided-diffusion: {', '.join(KINDS)}; glide: {', '.join(glide_kinds)} (default: "
                        f"inferred from --flags)")
    p.add_argument("--flags", default="",
                   help='guided-diffusion command-line flags, e.g. "--image_size 64 --num_channels 192 ...", '
                        'GLIDE\'s options, e.g. "--super_res True" (absent ones take GLIDE\'s defaults), or for '
                        'CLIP kinds clip/config.yaml values as "--n_embd 512 ..." (default: the released config)')
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    if args.source is None:
        args.source = "glide" if args.kind in glide_kinds else "guided-diffusion"

    save_kw = {"source": args.source}
    if args.source == "glide":
        if args.kind is not None and args.kind not in glide_kinds:
            p.error(f"--kind {args.kind} is a guided-diffusion kind; GLIDE's are {', '.join(glide_kinds)}")
        if args.kind in CLIP_KINDS:
            from jaxdiff.convert_clip import clip_config, encoder_kwargs, from_glide_clip

            config = clip_config(args.flags)
            kind, model_flags = args.kind, encoder_kwargs(args.kind, config)
            diffusion_flags = {"diffusion_steps": config["n_timesteps"], "noise_schedule": config["beta_schedule"]}
            convert, save_kw["extra"] = from_glide_clip, {"clip": config}
        else:
            kind, model_flags, diffusion_flags = convert_glide.flags_from_glide(args.flags, args.kind)
            convert = from_guided_diffusion
    else:
        if args.kind is not None and args.kind not in KINDS:
            p.error(f"--kind {args.kind} is a GLIDE kind: add --source glide")
        if not args.flags:
            p.error(f"--flags (guided-diffusion command-line flags) is required for --kind {args.kind or 'unet'}")
        kind = args.kind or _infer_kind(_parse_given(args.flags))
        model_flags, diffusion_flags = flags_from_args(args.flags, kind)
        convert = from_guided_diffusion
    out = Path(args.out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        print(f"error: {out} exists and is not empty; pass --force to replace it", file=sys.stderr)
        return 2
    _, params = convert(args.pt or args.npz, kind, **model_flags)
    save_converted(out, params, kind, model_flags, diffusion_flags, force=args.force, **save_kw)
    n = sum(int(np.prod(np.shape(v))) for v in flatten_dict(params).values())
    print(json.dumps({"out": str(out), "kind": kind, "parameters": n}))
    return 0


if __name__ == "__main__":
    from jaxdiff import cli

    cli.main_of(main, "python -m jaxdiff.convert")
