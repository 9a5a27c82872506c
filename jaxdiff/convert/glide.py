"""Loading openai/glide-text2im checkpoints (Text2ImUNet and its variants) into jaxdiff models.

`options` are GLIDE's model_and_diffusion options, as command-line flags ("--image_size 256
--super_res True") or a mapping (e.g. GLIDE's model_and_diffusion_defaults() dict). Absent options take
GLIDE's defaults: model_and_diffusion_defaults() (the released "base" 64x64 model), or
model_and_diffusion_defaults_upsampler() for the super-resolution kinds. The kind follows GLIDE's
super_res / inpaint options: text2im, text2im_superres, text2im_inpaint, text2im_superres_inpaint.

Two options are jaxdiff's, not GLIDE's: n_vocab (the tokenizer's vocabulary size, 50257 for GLIDE's
GPT-2 BPE) and learn_sigma (default True: out_channels 6; False builds a fixed-variance model with 3).
cache_text_emb is accepted and ignored (jaxdiff caches explicitly: `models.encode_text`). Key mapping,
strict checks and the inverse are jaxdiff.convert's.
"""

from __future__ import annotations

from typing import Mapping, Optional

from jaxdiff.convert import guided_diffusion as convert_gd

__all__ = ["GLIDE_DEFAULTS", "GLIDE_UPSAMPLER_DEFAULTS", "flags_from_glide", "from_glide", "glide_kind"]

GLIDE_DEFAULTS = dict(
    image_size=64, num_channels=192, num_res_blocks=3, channel_mult="", num_heads=1, num_head_channels=64,
    num_heads_upsample=-1, attention_resolutions="32,16,8", dropout=0.1, text_ctx=128, xf_width=512, xf_layers=16,
    xf_heads=8, xf_final_ln=True, xf_padding=True, diffusion_steps=1000, noise_schedule="squaredcos_cap_v2",
    timestep_respacing="", use_scale_shift_norm=True, resblock_updown=True, use_fp16=True, cache_text_emb=False,
    inpaint=False, super_res=False)
GLIDE_UPSAMPLER_DEFAULTS = {**GLIDE_DEFAULTS, **dict(image_size=256, num_res_blocks=2, noise_schedule="linear",
                                                     super_res=True)}
_EXTRAS = dict(n_vocab=50257, learn_sigma=True)
_ALL = {**GLIDE_DEFAULTS, **_EXTRAS}
_KINDS = {(False, False): "text2im", (True, False): "text2im_superres", (False, True): "text2im_inpaint",
          (True, True): "text2im_superres_inpaint"}
_SCHEDULES = {"squaredcos_cap_v2": "cosine", "linear": "linear"}  # GLIDE's names -> jaxdiff's
_MULT = {size: convert_gd.UNET_MULT[size] for size in (64, 128, 256)}  # GLIDE's create_model table


def glide_kind(super_res: bool, inpaint: bool) -> str:
    """The jaxdiff kind of GLIDE's model class for options super_res / inpaint."""
    return _KINDS[(bool(super_res), bool(inpaint))]


def _given(options) -> dict:
    if isinstance(options, Mapping):
        given = {}
        for name, value in options.items():
            if name not in _ALL:
                raise ValueError(f"unknown GLIDE option {name!r}; allowed: {', '.join(_ALL)}")
            given[name] = convert_gd.typed_flag(name, value, _ALL) if isinstance(value, str) else value
        return given
    return convert_gd.parse_given(options, _ALL, "GLIDE")


def flags_from_glide(options="", kind: Optional[str] = None) -> tuple:
    """GLIDE's options -> (kind, model constructor flags, diffusion flags), as GLIDE's create_model.

    channel_mult "" is chosen by image size (64, 128, 256), else it must have log2(image_size) - 2
    entries; attention_resolutions become downsampling factors ds = image_size // res; out_channels is
    6 (3 with learn_sigma False). `kind` (None: from super_res / inpaint) picks the defaults and must
    agree with super_res / inpaint when those are given. The diffusion dict uses guided-diffusion's
    names (noise_schedule "cosine" for GLIDE's squaredcos_cap_v2, predict_xstart False, ...).
    """
    given = _given(options)
    if kind is None:
        kind = glide_kind(given.get("super_res", False), given.get("inpaint", False))
    elif kind not in _KINDS.values():
        raise ValueError(f"unknown GLIDE model kind {kind!r}; expected one of {tuple(_KINDS.values())}")
    super_res, inpaint = next(k for k, v in _KINDS.items() if v == kind)
    for name, value in (("super_res", super_res), ("inpaint", inpaint)):
        if name in given and bool(given[name]) != value:
            raise ValueError(f"--{name} {given[name]} contradicts kind {kind!r} ({name} {value})")
    a = {**(GLIDE_UPSAMPLER_DEFAULTS if super_res else GLIDE_DEFAULTS), **_EXTRAS, "inpaint": inpaint, **given}
    size = a["image_size"]
    if a["channel_mult"] == "":
        channel_mult = convert_gd.channel_mult_for(size, _MULT, "image size")
    else:
        cm = a["channel_mult"]
        channel_mult = tuple(int(c) for c in (cm.split(",") if isinstance(cm, str) else cm))
        if 2 ** (len(channel_mult) + 2) != size:
            raise ValueError(f"channel_mult {a['channel_mult']!r} has {len(channel_mult)} levels; GLIDE's "
                             f"create_model needs 2 ** (levels + 2) == image_size ({size})")
    if a["noise_schedule"] not in _SCHEDULES:
        raise ValueError(f"noise_schedule {a['noise_schedule']!r} is not one of GLIDE's: {', '.join(_SCHEDULES)}")
    model = convert_gd.unet_flags(a, size, channel_mult)
    model.update({k: a[k] for k in ("text_ctx", "xf_width", "xf_layers", "xf_heads", "xf_final_ln", "xf_padding",
                                     "n_vocab")})
    # guided-diffusion's names; GLIDE has no KL loss, x0 prediction or timestep rescaling
    diffusion = {**convert_gd.DIFFUSION_DEFAULTS, "noise_schedule": _SCHEDULES[a["noise_schedule"]],
                 **{k: a[k] for k in ("learn_sigma", "diffusion_steps", "timestep_respacing")}}
    return kind, model, diffusion


def from_glide(state_dict, options="", kind: Optional[str] = None):
    """Build the jaxdiff model for GLIDE's `options` and convert `state_dict` (mapping, .pt or .npz).

    Returns (module, params); a missing, unexpected or wrongly shaped key raises ValueError naming the
    key and the option that most likely differs (see jaxdiff.convert.guided_diffusion.from_guided_diffusion).
    """
    kind, model_flags, _ = flags_from_glide(options, kind)
    return convert_gd.from_guided_diffusion(state_dict, kind, **model_flags)
