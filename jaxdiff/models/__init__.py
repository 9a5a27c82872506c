"""ADM networks (openai/guided-diffusion architectures) in Flax linen, NHWC.

    create_model(kind, **flags) -> nn.Module      kind: "unet" | "classifier" | "superres" | "clip" |
                                                  "unet2d_condition" | one of TEXT_KINDS
    check_labels(y, num_classes, null_label=False) -> np.ndarray
    encode_text(module, params, tokens, mask) -> (xf_proj, xf_out)   (text-conditional kinds)

Flags are the keyword arguments of guided-diffusion's UNetModel / EncoderUNetModel / SuperResModel
(attention_resolutions as downsampling factors ds), plus `null_label` (U-Net, super-res) and `dtype`.
The text-conditional kinds (GLIDE's Text2ImUNet "text2im", SuperResText2ImUNet "text2im_superres",
and the inpainting "text2im_inpaint", "text2im_superres_inpaint") take GLIDE's constructor flags, see
text_unet.py. "clip" is a noised CLIP's two encoders and logit scale (`clip.ClipModel`, glide's
clip/config.yaml names). "unet2d_condition" is diffusers' UNet2DConditionModel (the DeepFloyd IF / unCLIP
subset, `unet2d_condition.py`): its flags are the fields of a diffusers config.json plus `dtype`; "prior" is
diffusers' PriorTransformer (`prior.py`, config.json fields plus `dtype`); "unclip_decoder" is unCLIP's
text_proj + decoder U-Net trained together (`unclip_decoder.py`; flags text_proj, decoder: the two
config.json dicts, and `dtype`).
create_model validates every flag in Python, before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import numpy as np

from jaxdiff.models import layers
from jaxdiff.models.classifier import EncoderUNetModel
from jaxdiff.models.clip import ClipModel
from jaxdiff.models.layers import (
    AttentionBlock,
    AttentionPool2d,
    Conv,
    Downsample,
    GroupNorm32,
    ResBlock,
    Upsample,
    check_architecture,
    make_plan,
    timestep_embedding,
)
from jaxdiff.models.prior import PriorTransformer, prior_config
from jaxdiff.models.text import check_text_flags
from jaxdiff.models.text_unet import (
    InpaintText2ImUNet,
    SuperResInpaintText2ImUNet,
    SuperResText2ImUNet,
    Text2ImUNet,
    encode_text,
)
from jaxdiff.models.unclip_decoder import UnCLIPDecoder
from jaxdiff.models.unclip_text_proj import text_proj_config
from jaxdiff.models.unet import SuperResModel, UNetModel, check_labels, upsample_bilinear
from jaxdiff.models.unet2d_condition import SUPPORTED_DEFAULTS as _UNET2D_CONDITION_FIELDS
from jaxdiff.models.unet2d_condition import UNet2DConditionModel, unet2d_condition_config
from jaxdiff.util.config import did_you_mean

__all__ = ["AttentionBlock", "AttentionPool2d", "ClipModel", "Conv", "Downsample", "EncoderUNetModel", "GroupNorm32",
           "InpaintText2ImUNet", "MODEL_KINDS", "PriorTransformer", "ResBlock", "SuperResInpaintText2ImUNet", "SuperResModel",
           "SuperResText2ImUNet", "TEXT_KINDS", "Text2ImUNet", "UNet2DConditionModel", "UnCLIPDecoder", "UNetModel", "Upsample", "check_architecture",
           "check_labels", "create_model", "encode_text", "layers", "make_plan", "model_flag_names", "normalize_flags",
           "timestep_embedding", "upsample_bilinear"]

TEXT_KINDS = {"text2im": Text2ImUNet, "text2im_superres": SuperResText2ImUNet, "text2im_inpaint": InpaintText2ImUNet,
              "text2im_superres_inpaint": SuperResInpaintText2ImUNet}
MODEL_KINDS = {"unet": UNetModel, "classifier": EncoderUNetModel, "superres": SuperResModel, "clip": ClipModel,
               "unet2d_condition": UNet2DConditionModel, "prior": PriorTransformer, "unclip_decoder": UnCLIPDecoder,
               **TEXT_KINDS}

_REQUIRED = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions")
_TEXT_REQUIRED = ("text_ctx", "xf_width", "xf_layers", "xf_heads", "xf_final_ln")

# guided-diffusion script (command-line) names people pass by mistake -> constructor flags.
_SCRIPT_ALIASES = {
    "num_channels": "model_channels",
    "class_cond": "num_classes",
    "learn_sigma": "out_channels",
    "large_size": "image_size",
    "classifier_width": "model_channels",
    "classifier_depth": "num_res_blocks",
    "classifier_pool": "pool",
    "classifier_attention_resolutions": "attention_resolutions",
    "classifier_use_scale_shift_norm": "use_scale_shift_norm",
    "classifier_resblock_updown": "resblock_updown",
    "classifier_use_fp16": "use_fp16",
}


def model_flag_names(kind: str) -> tuple:
    """Constructor flags accepted for `kind` ("unet2d_condition": the supported diffusers config.json fields
    and "dtype")."""
    cls = _kind_class(kind)
    if kind == "unet2d_condition":
        return tuple(_UNET2D_CONDITION_FIELDS) + ("dtype",)
    if kind == "prior":
        from jaxdiff.models.prior import DEFAULTS

        return tuple(DEFAULTS) + ("dtype",)
    if kind == "unclip_decoder":
        return ("text_proj", "decoder", "dtype")
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))


def _kind_class(kind: str):
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}{did_you_mean(kind, MODEL_KINDS)}; expected one of "
                         f"{sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind]


def normalize_flags(kind: str, **flags) -> dict:
    """Check flag names and values for `kind` and return them normalised (tuples, ints); raises
    ValueError naming the bad flag/value and what is allowed. Does not build anything."""
    if kind == "unet2d_condition":
        return _unet2d_condition_flags(flags)
    if kind == "prior":
        out = dict(flags)
        dtype = _dtype_flag(out.pop("dtype", None))
        prior_config(out)
        return {**out, "dtype": dtype}
    if kind == "unclip_decoder":
        return _unclip_decoder_flags(flags)
    names = model_flag_names(kind)
    for k in flags:
        if k not in names:
            alias = _SCRIPT_ALIASES.get(k)
            if alias in names:
                hint = (f" (did you mean {alias!r}? {k!r} is a guided-diffusion command-line flag; "
                        f"jaxdiff.convert.guided_diffusion.flags_from_args translates those)")
            else:
                hint = did_you_mean(k, names, cutoff=0.5)
            raise ValueError(f"unknown flag {k!r} for a {kind!r} model{hint}; allowed flags: {', '.join(names)}")
    if kind == "clip":
        ClipModel(**flags)  # its __post_init__ checks every value
        return dict(flags)
    missing = [k for k in _REQUIRED + (_TEXT_REQUIRED if kind in TEXT_KINDS else ()) if k not in flags]
    if missing:
        raise ValueError(f"missing required flag(s) {missing} for a {kind!r} model")
    out = {k: int(v) if isinstance(v, np.integer) else v for k, v in flags.items()}
    for key in ("attention_resolutions", "channel_mult"):
        if key in out:
            v = out[key]
            if isinstance(v, str):
                v = [float(a) for a in v.split(",") if a.strip()]
            try:  # integral numbers as ints
                out[key] = tuple(int(a) if isinstance(a, (float, np.number)) and float(a).is_integer() else a
                                 for a in v)
            except TypeError:
                raise ValueError(f"{key}={out[key]!r}: expected a sequence of numbers") from None
    if out.get("dtype") is not None and not isinstance(out["dtype"], str):
        try:
            out["dtype"] = np.dtype(out["dtype"]).name
        except TypeError:
            raise ValueError(f"dtype={out['dtype']!r} is not supported; use 'float32' or 'bfloat16'") from None
    cls = MODEL_KINDS[kind]
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    ns = type("Flags", (), {**defaults, **out})()
    check_architecture(ns, "classifier" if kind == "classifier" else "unet")
    if kind in TEXT_KINDS:
        check_text_flags(ns)
    return out


def _dtype_flag(dtype) -> str:
    """The compute dtype flag as a name: "float32" (default) or "bfloat16" (else ValueError)."""
    dtype = dtype or "float32"
    if not isinstance(dtype, str):
        try:
            dtype = np.dtype(dtype).name
        except TypeError:
            dtype = repr(dtype)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r} is not supported; use 'float32' or 'bfloat16'")
    return dtype


def _unet2d_condition_flags(flags: dict) -> dict:
    """A "unet2d_condition" model's flags: diffusers' config.json fields (checked by
    `unet2d_condition_config`, which names the first field outside the subset) and the compute dtype."""
    out = dict(flags)
    dtype = _dtype_flag(out.pop("dtype", None))
    unet2d_condition_config(out)
    return {**out, "dtype": dtype}


def _unclip_decoder_flags(flags: dict) -> dict:
    """An "unclip_decoder" model's flags: text_proj and decoder (config.json dicts, each checked, then checked
    to fit each other) and the decoder's compute dtype."""
    from jaxdiff.models.unclip_decoder import check_unclip_decoder

    bad = sorted(set(flags) - {"text_proj", "decoder", "dtype"})
    if bad or "text_proj" not in flags or "decoder" not in flags:
        raise ValueError(f"an 'unclip_decoder' model takes the flags text_proj and decoder (config.json dicts) and "
                         f"dtype; got {sorted(flags)}")
    tp, dec = dict(flags["text_proj"]), dict(flags["decoder"])
    check_unclip_decoder(text_proj_config(tp), unet2d_condition_config(dec))
    return {"text_proj": tp, "decoder": dec, "dtype": _dtype_flag(flags.get("dtype"))}


def create_model(kind: str, **flags) -> nn.Module:
    """Build a UNetModel ("unet"), EncoderUNetModel ("classifier"), SuperResModel ("superres"), a
    text-conditional GLIDE U-Net (TEXT_KINDS), a noised CLIP pair ("clip") or diffusers' UNet2DConditionModel
    ("unet2d_condition": its config.json fields plus dtype) from the constructor flags (+ null_label, dtype),
    validating them first."""
    flags = normalize_flags(kind, **flags)  # checks the kind too
    if kind == "unet2d_condition":
        dtype = flags.pop("dtype")
        return UNet2DConditionModel(unet2d_condition_config(flags), dtype=dtype)
    if kind == "prior":
        dtype = flags.pop("dtype")
        return PriorTransformer(prior_config(flags), dtype=dtype)
    if kind == "unclip_decoder":
        return UnCLIPDecoder(text_proj_config(flags["text_proj"]), unet2d_condition_config(flags["decoder"]),
                             dtype=flags["dtype"])
    return MODEL_KINDS[kind](**flags)
