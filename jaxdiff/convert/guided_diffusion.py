"""openai/guided-diffusion checkpoints: its command-line flags -> jaxdiff model flags, and its state_dict
layout <-> jaxdiff params (GLIDE's text U-Nets share this layout, `glide.py`).

Layout mapping: Conv2d OIHW -> HWIO; Linear (out, in) -> (in, out); the token-wise conv1d layers (qkv,
proj_out, qkv_proj, c_proj, encoder_kv; weight (O, I, 1)) -> Dense (I, O); GroupNorm weight -> scale;
Embedding weight -> embedding; the classifier's positional_embedding (C, T) -> (T, C). GLIDE's caption
encoder (top-level state_dict keys) lives under `text_encoder`; its Linear layers -> Dense."""

from __future__ import annotations

import functools
import re
import shlex
from typing import Mapping, Optional

from jaxdiff.convert.common import checked_params, load_state_dict, make_layout, state_dict_from_layout
from jaxdiff.util import config as config_util

__all__ = ["abstract_params", "expected_state_dict_shapes", "flags_from_args", "from_guided_diffusion", "infer_kind",
           "parse_gd_flags", "to_guided_diffusion"]


KINDS = ("unet", "classifier", "superres")  # guided-diffusion's; the text-conditional ones: convert_glide


NUM_CLASSES = 1000


DIFFUSION_DEFAULTS = dict(learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
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


_ALL_DEFAULTS = {**_SCRIPT_DEFAULTS, **DIFFUSION_DEFAULTS, **_CLASSIFIER_DEFAULTS, **_SR_DEFAULTS, **_MODEL_DEFAULTS}


UNET_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


_SR_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


# U-Net flags guided-diffusion's and GLIDE's create_model pass on as they are
_PASSED = ("dropout", "use_fp16", "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
           "resblock_updown")


def typed_flag(name: str, v: str, defaults: Mapping):
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


def parse_given(argstring: str, defaults: Mapping = _ALL_DEFAULTS, source: str = "guided-diffusion") -> dict:
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
        given[name] = typed_flag(name, value, defaults)
    return given


def parse_gd_flags(argstring: str) -> dict:
    """Every guided-diffusion command-line flag (model, classifier, super-res, diffusion and script
    flags) with script_util's defaults, overridden by the typed values in `argstring`."""
    return {**_ALL_DEFAULTS, **parse_given(argstring)}


def channel_mult_for(image_size: int, table: dict, what: str):
    if image_size not in table:
        raise ValueError(f"unsupported {what}: {image_size} (guided-diffusion knows {sorted(table)})")
    return table[image_size]


def _ds(resolutions: str, size: int) -> tuple:
    return tuple(size // int(res) for res in str(resolutions).split(","))


def unet_flags(a: Mapping, size: int, channel_mult: tuple) -> dict:
    """The U-Net constructor flags guided-diffusion's and GLIDE's create_model derive alike."""
    return dict(image_size=size, in_channels=3, model_channels=a["num_channels"],
                out_channels=6 if a["learn_sigma"] else 3, num_res_blocks=a["num_res_blocks"],
                attention_resolutions=_ds(a["attention_resolutions"], size), channel_mult=channel_mult,
                **{k: a[k] for k in _PASSED})


def infer_kind(given: dict) -> str:
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
    The diffusion dict holds the flags of DIFFUSION_DEFAULTS. Script-only flags are ignored.
    """
    given = parse_given(argstring)
    a = {**_ALL_DEFAULTS, **given}
    kind = kind or infer_kind(given)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    diffusion = {k: a[k] for k in DIFFUSION_DEFAULTS}
    if kind == "classifier":
        size = a["image_size"]
        return dict(image_size=size, in_channels=3, model_channels=a["classifier_width"], out_channels=1000,
                    num_res_blocks=a["classifier_depth"],
                    attention_resolutions=_ds(a["classifier_attention_resolutions"], size),
                    channel_mult=channel_mult_for(size, UNET_MULT, "image size"),
                    use_fp16=a["classifier_use_fp16"], num_head_channels=64,
                    use_scale_shift_norm=a["classifier_use_scale_shift_norm"],
                    resblock_updown=a["classifier_resblock_updown"], pool=a["classifier_pool"]), diffusion
    if kind == "superres":
        for flag in ("channel_mult", "use_new_attention_order"):
            if flag in given and given[flag] != _MODEL_DEFAULTS[flag]:
                raise ValueError(f"--{flag} is not a flag of guided-diffusion's super-resolution scripts "
                                 f"(sr_create_model fixes it); remove it")
        size = a["large_size"]
        channel_mult = channel_mult_for(size, _SR_MULT, "large size")
    else:
        size = a["image_size"]
        if a["channel_mult"]:
            channel_mult = tuple(int(v) if v.is_integer() else v for v in map(float, a["channel_mult"].split(",")))
        else:
            channel_mult = channel_mult_for(size, UNET_MULT, "image size")
    model = unet_flags(a, size, channel_mult)
    model.update(num_classes=NUM_CLASSES if a["class_cond"] else None, use_checkpoint=a["use_checkpoint"])
    if kind == "unet":
        model["use_new_attention_order"] = a["use_new_attention_order"]
    return model, diffusion


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
    return make_layout(abstract_params(module, kind), _torch_key, _transform, _order_key)


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


_GD_FOOTER = ("  (num_heads / num_head_channels / use_new_attention_order do not change shapes: check them "
              "against the checkpoint's release flags too)")


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
    params = checked_params(_layout(module, kind), load_state_dict(state_dict),
                             f"{source} state_dict does not fit the {kind!r} model built from these flags",
                             hint_fn=_hint, kind=kind, footer=footer)
    return module, params


def to_guided_diffusion(params, module, kind: Optional[str] = None) -> dict:
    """Inverse of from_guided_diffusion: jaxdiff params -> {state_dict key: np.ndarray} (torch layout,
    state_dict order)."""
    return state_dict_from_layout(params, _layout(module, kind))
