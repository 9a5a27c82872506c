"""The training config: defaults for every task, validation, and the values derived from the dataset
(image size, channels, classes, the model's flags) and, for the IF tasks, from the frozen text encoder
(its width and token count: `encoder_info`); for the unCLIP tasks also from the frozen CLIP pair."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Optional

import jax
import ml_collections

from jaxdiff import parallel
from jaxdiff.data import sources as data_lib
from jaxdiff.diffusion import gaussian as diffusion_lib
from jaxdiff.diffusion import schedules
from jaxdiff.util import config as config_util

log = logging.getLogger(__name__)


IF_TASKS = ("if_text2im", "if_superres")  # DeepFloyd IF's stage I and stage II on frozen text-encoder states


UNCLIP_TASKS = ("unclip_prior", "unclip_decoder")  # DALL-E 2 (unCLIP) on a frozen CLIP pair's embeddings


TASKS = ("diffusion", "classifier", "text2im", "clip") + IF_TASKS + UNCLIP_TASKS


DIFFUSION_TASKS = ("diffusion", "text2im") + IF_TASKS + UNCLIP_TASKS


FROZEN_TEXT_TASKS = IF_TASKS + UNCLIP_TASKS  # conditioned on a frozen encoder's cached outputs (config.text_encoder)


TEXT_TASKS = ("text2im", "clip")  # captions word-tokenized with the dataset's vocabulary


# default probability of dropping the label / caption (IF: the empty caption's states, 10% as Imagen)
# (unCLIP: the prior drops 10 % of the captions, the decoder 50 %, as DALL-E 2)
P_UNCOND = {"diffusion": 0.1, "text2im": 0.2, "if_text2im": 0.1, "if_superres": 0.1, "unclip_prior": 0.1,
            "unclip_decoder": 0.5}
P_UNCOND_IMAGE = 0.1  # unclip_decoder: the CLIP image embedding dropped to text_proj's learned null embedding


TEXT_ENCODERS = ("clip", "t5")  # config.text_encoder.kind of the IF tasks


T5_MAX_LENGTH = 77  # IF's T5 token count (data.t5_tokenizer.IF_MAX_LENGTH)


LR_SCHEDULES = ("constant", "linear", "cosine")


DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value that cannot work (the message names the value and what is allowed)."""


# The "clip" task's model: glide's clip/config.yaml names (image_size, n_vocab and n_timesteps are
# derived from the dataset and the diffusion schedule); logit scale as `models.ClipModel`.
CLIP_MODEL_DEFAULTS = dict(n_embd=64, patch_size=2, n_head_image=2, n_head_state_image=32, n_xf_blocks_image=2,
                           n_head_text=2, n_head_state_text=32, n_xf_blocks_text=2, max_text_len=8,
                           logit_scale=1 / 0.07, learn_logit_scale=True)


# The IF tasks' model: diffusers UNet2DConditionModel config.json fields (models/unet2d_condition.py), small
# enough for the 8x8 digits; IF's block types, GELU, scale-shift ResNets, group-normed cross-attention, the
# text states projected (encoder_hid_proj) and attention-pooled into the time embedding. Derived (refused
# if set): in_channels, out_channels, encoder_hid_dim, class_embed_type; cross_attention_dim None = the
# text encoder's width.
# The IF-style U-Net layout at digits size, shared by the IF tasks and the unCLIP decoder: 8x8 -> 4x4, 32 / 64
# channels, cross-attention at 4x4 and in the middle, 32-wide heads, scale-shift ResNets.
DIGITS_UNET_LAYOUT = dict(
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=32,
    norm_num_groups=32,
    resnet_time_scale_shift="scale_shift",
    dropout=0.0,
)
IF_MODEL_DEFAULTS = dict(
    DIGITS_UNET_LAYOUT,
    act_fn="gelu",
    mid_block_scale_factor=1.0,
    cross_attention_norm="group_norm",
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text",
    addition_embed_type_num_heads=2,
)
# stage II's extras (IF-II's config): the noise-augmentation level embedded like the timestep
# (class_embed_type "timestep", derived), GELU after the summed embeddings, sqrt(2) mid-block scale.
IF_SUPERRES_MODEL_DEFAULTS = dict(IF_MODEL_DEFAULTS, time_embedding_act_fn="gelu", mid_block_scale_factor=1.414)

# config.model keys of the IF tasks that come from the data, the task and the text encoder
IF_DERIVED_MODEL_KEYS = ("in_channels", "out_channels", "encoder_hid_dim", "class_embed_type", "sample_size")

# unclip_prior's model: diffusers PriorTransformer config.json fields (Karlo's layout: prd token, SiLU time
# MLP), small. Derived from the CLIP (refused if set): embedding_dim, num_embeddings (its token count),
# embedding_proj_dim, clip_embed_dim, additional_embeddings.
UNCLIP_PRIOR_MODEL_DEFAULTS = dict(num_attention_heads=2, attention_head_dim=32, num_layers=2,
                                   time_embed_act_fn="silu", norm_in_type=None, embedding_proj_norm_type=None,
                                   added_emb_type="prd", time_embed_dim=None, dropout=0.0)
UNCLIP_PRIOR_DERIVED_KEYS = ("embedding_dim", "num_embeddings", "embedding_proj_dim", "clip_embed_dim",
                             "additional_embeddings")
# unclip_decoder's U-Net (config.model.decoder): Karlo's decoder blocks at digits size, IF-like: no
# encoder_hid_proj, no pooled-text embedding (text_proj's time embedding is the class label, "identity").
# Derived (refused if set): in_channels, out_channels, class_embed_type, sample_size, encoder_hid_dim.
UNCLIP_DECODER_MODEL_DEFAULTS = dict(
    DIGITS_UNET_LAYOUT,
    act_fn="silu",
    cross_attention_dim=64,
    encoder_hid_dim_type=None,
    addition_embed_type=None,
)
# config.model.text_proj: UnCLIPTextProjModel's one free field (the others: the CLIP's width, the decoder's)
UNCLIP_TEXT_PROJ_DEFAULTS = dict(clip_extra_context_tokens=4)
UNCLIP_TEXT_PROJ_DERIVED_KEYS = ("clip_embeddings_dim", "time_embed_dim", "cross_attention_dim")


def default_config(task: str = "diffusion") -> ml_collections.ConfigDict:
    """Every key train.py reads, with defaults. Derived values (image size, channels, num_classes,
    out_channels, null_label) are deliberately absent: they come from the dataset and the task."""
    from ml_collections.config_dict import placeholder

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = task
    c.data = ml_collections.ConfigDict(dict(
        name="digits",
        data_dir="",            # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
        split="train",
        eval_split="test",
        augment=placeholder(bool),   # None = the dataset's default (flips off for digits)
        image_size=placeholder(int),  # None = as stored; else resized/padded by jaxdiff.data
        workers=1,              # threads decoding each batch (batches identical for any number)
    ))
    if task in IF_TASKS:
        return _default_if_config(c, task)
    if task in UNCLIP_TASKS:
        return _default_unclip_config(c, task)
    c.model = ml_collections.ConfigDict(CLIP_MODEL_DEFAULTS) if task == "clip" else ml_collections.ConfigDict(dict(
        model_channels=64,
        num_res_blocks=2,
        attention_resolutions=(2,),   # downsampling factors ds
        dropout=0.0,
        channel_mult=(1, 2),
        num_heads=1,
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=False,
        dtype="float32",              # compute dtype: "float32" or "bfloat16"
        use_checkpoint=False,         # remat: recompute each block's activations in the backward pass
    ))
    if task == "classifier":
        c.model.pool = "attention"
    if task == "text2im":  # GLIDE's caption transformer (text_unet.py)
        c.model.update(text_ctx=8, xf_width=64, xf_layers=2, xf_heads=2, xf_final_ln=True, xf_padding=True)
    _common_sections(c, task)
    return c


def _common_sections(c, task: str) -> None:
    """config.diffusion, train, mesh, profile_steps and sample (every task has them)."""
    from ml_collections.config_dict import placeholder

    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine",
        num_timesteps=1000,
        prediction="eps",
        learned_sigma=True,
        p_uncond=P_UNCOND.get(task, 0.1),
        vlb_weight=placeholder(float),  # None = num_steps / 1000 (guided-diffusion)
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64,
        steps=2000,
        lr=1e-3,
        lr_schedule="constant",   # "constant" | "linear" (anneal to 0) | "cosine"
        warmup_steps=100,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        grad_clip=1.0,            # global norm; 0 = off
        ema_decay=0.999,
        ema_warmup=True,          # decay_t = min(ema_decay, (1 + t) / (10 + t))
        noised=True,              # classifier, clip: q_sample at uniform t (False: clean images, t = 0)
        log_every=50,
        checkpoint_every=500,
        keep=3,
        sample_every=0,           # diffusion: sample grid; classifier: test accuracy vs t (0 = never)
        async_checkpointing=True,
        grad_accum_steps=1,       # micro-batches per step (k of B/k each: the same update as one of B)
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,                  # data-parallel size; -1 = every device fsdp leaves
        fsdp=1,                   # devices sharing (splitting) parameters, EMA and optimizer state
        min_shard_size=parallel.DEFAULT_MIN_SHARD_SIZE,  # smaller arrays (elements) stay replicated
    ))
    c.profile_steps = ()          # (start, stop): jax.profiler trace of steps start+1..stop in W/profile
    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddim",
        steps=50,
        guidance_scale=3.0,       # CFG, Imagen convention (1 = conditional)
        per_class=8,
        seed=0,
        grid_classes=16,          # training grids show at most this many classes (evenly spaced)
    ))


def _default_if_config(c, task: str) -> ml_collections.ConfigDict:
    """The IF tasks: a UNet2DConditionModel (config.model: diffusers config.json fields plus dtype) on the
    token states of a frozen text encoder (config.text_encoder); stage II also config.superres."""
    from ml_collections.config_dict import placeholder

    c.data.name = "digits_text"
    defaults = IF_SUPERRES_MODEL_DEFAULTS if task == "if_superres" else IF_MODEL_DEFAULTS
    c.model = ml_collections.ConfigDict(dict(defaults, cross_attention_dim=placeholder(int), dtype="float32"))
    c.text_encoder = _text_encoder_section()
    if task == "if_superres":
        c.superres = ml_collections.ConfigDict(dict(
            low_res=placeholder(int),    # side of the low-resolution input (required; divides data.image_size)
            max_level=placeholder(int),  # augmentation levels are uniform in [0, max_level); None = num_timesteps
        ))
    _common_sections(c, task)
    return c


def _text_encoder_section() -> ml_collections.ConfigDict:
    """config.text_encoder of the tasks on a frozen encoder (IF, unCLIP)."""
    from ml_collections.config_dict import placeholder

    return ml_collections.ConfigDict(dict(
        kind="clip",              # "clip": a train.py "clip" workdir (its text tower); "t5": a transformers T5 folder
        path="",                  # that workdir / folder (required)
        tokenizer="",             # t5: spiece.model or its folder; "" = `path`, then IF's layout (../tokenizer)
        max_length=placeholder(int),  # tokens per caption; t5: None = 77 (IF); clip: its max_text_len (derived)
        cache_dir="",             # cached encodings of every caption; "" = W/text_states
        batch_size=256,           # captions per (jitted) encoder call while the states are computed
        attention_mask=False,     # True: the U-Net's cross-attention skips padding tokens (IF passes no mask)
    ))


def _default_unclip_config(c, task: str) -> ml_collections.ConfigDict:
    """The unCLIP tasks on a frozen CLIP pair (config.text_encoder: kind "clip", a clean CLIP workdir):
    "unclip_prior" (config.model: PriorTransformer config.json fields plus dtype; sample prediction, no learned
    variance) and "unclip_decoder" (config.model.decoder: UNet2DConditionModel fields, config.model.text_proj:
    UnCLIPTextProjModel's, plus dtype; eps, learned-range variance; diffusion.p_uncond_image)."""
    c.data.name = "digits_text"
    if task == "unclip_prior":
        c.model = ml_collections.ConfigDict(dict(UNCLIP_PRIOR_MODEL_DEFAULTS, dtype="float32"))
    else:
        c.model = ml_collections.ConfigDict(dict(decoder=dict(UNCLIP_DECODER_MODEL_DEFAULTS),
                                                 text_proj=dict(UNCLIP_TEXT_PROJ_DEFAULTS), dtype="float32"))
    c.text_encoder = _text_encoder_section()
    del c.text_encoder["tokenizer"], c.text_encoder["attention_mask"]  # a CLIP's own vocabulary; always masked
    _common_sections(c, task)
    if task == "unclip_prior":  # diffusers' UnCLIPScheduler of the prior: x_0 ("sample"), fixed variance
        c.diffusion.update(prediction="x0", learned_sigma=False)
    else:
        c.diffusion.p_uncond_image = P_UNCOND_IMAGE
    return c


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def validate_config(config) -> None:
    """Refuse bad values that need no dataset and no model (clear ValueError: value + allowed)."""
    task = config_util.get(config, "task")
    _check(task in TASKS, f"config.task={task!r} is not a task; allowed: {', '.join(TASKS)}")
    _check(config_util.is_int(config_util.get(config, "seed", 0)), f"config.seed={config_util.get(config, 'seed')!r}: expected an integer")
    d = config.diffusion
    _check(d.schedule in schedules.SCHEDULES,
           f"config.diffusion.schedule={d.schedule!r}; allowed: {', '.join(schedules.SCHEDULES)}")
    _check(config_util.is_int(d.num_timesteps) and d.num_timesteps >= 1,
           f"config.diffusion.num_timesteps={d.num_timesteps!r}: expected a positive integer")
    if task in DIFFUSION_TASKS:
        _check(d.prediction in diffusion_lib.PREDICTIONS,
               f"config.diffusion.prediction={d.prediction!r} is not a prediction target; allowed: "
               f"{', '.join(diffusion_lib.PREDICTIONS)}")
        p = d.p_uncond
        _check(isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0,
               f"config.diffusion.p_uncond={p!r} is outside [0, 1): it is the probability of dropping "
               "a label to the null label (a caption to the empty one) (0 = no classifier-free guidance; the "
               "paper's range is 0.1-0.2)")
        _check(isinstance(d.learned_sigma, bool),
               f"config.diffusion.learned_sigma={d.learned_sigma!r}: expected True or False")
    t = config.train
    _check(config_util.is_int(t.batch_size) and t.batch_size >= 1,
           f"config.train.batch_size={t.batch_size!r}: expected a positive integer")
    _check(config_util.is_int(t.steps) and t.steps >= 1, f"config.train.steps={t.steps!r}: expected a positive integer")
    _check(isinstance(t.lr, (int, float)) and not isinstance(t.lr, bool) and math.isfinite(t.lr) and t.lr > 0,
           f"config.train.lr={t.lr!r}: expected a positive finite number")
    _check(config_util.get(t, "lr_schedule", "constant") in LR_SCHEDULES,
           f"config.train.lr_schedule={config_util.get(t, 'lr_schedule')!r}; allowed: {', '.join(LR_SCHEDULES)}")
    _check(config_util.is_int(t.warmup_steps) and t.warmup_steps >= 0,
           f"config.train.warmup_steps={t.warmup_steps!r}: expected an integer >= 0")
    _check(t.weight_decay >= 0, f"config.train.weight_decay={t.weight_decay!r}: expected >= 0")
    _check(t.grad_clip >= 0, f"config.train.grad_clip={t.grad_clip!r}: expected >= 0 (0 = no clipping)")
    _check(0.0 <= t.ema_decay < 1.0, f"config.train.ema_decay={t.ema_decay!r}: expected a number in [0, 1)")
    for key in ("log_every", "checkpoint_every", "keep"):
        v = t[key]
        _check(config_util.is_int(v) and v >= 1, f"config.train.{key}={v!r}: expected a positive integer")
    v = config_util.get(t, "sample_every", 0)
    _check(config_util.is_int(v) and v >= 0, f"config.train.sample_every={v!r}: expected an integer >= 0 (0 = never)")
    dtype = config_util.get(config.model, "dtype", "float32")
    _check(dtype in DTYPES, f"config.model.dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    derived = ("image_size", "in_channels", "out_channels", "num_classes", "null_label", "kind", "n_vocab",
               "n_timesteps") + (IF_DERIVED_MODEL_KEYS if task in IF_TASKS else ()) + (
               UNCLIP_PRIOR_DERIVED_KEYS if task == "unclip_prior" else ())
    for key in derived:
        _check(key not in config.model,
               f"config.model.{key} is derived (from the dataset / task / diffusion settings"
               f"{' / text encoder' if task in FROZEN_TEXT_TASKS else ''}); remove it from the config")
    if task in IF_TASKS:
        _validate_if(config)
    if task in UNCLIP_TASKS:
        _validate_unclip(config)
    n = jax.device_count()
    mesh = config_util.get(config, "mesh", {})
    try:
        parallel.mesh_shape(config_util.get(mesh, "data", -1), config_util.get(mesh, "fsdp", 1), n, "config.mesh.")
    except ValueError as e:
        raise ConfigError(f"{e} ({jax.process_count()} process(es))") from None
    v = config_util.get(mesh, "min_shard_size", parallel.DEFAULT_MIN_SHARD_SIZE)
    _check(config_util.is_int(v) and v >= 0, f"config.mesh.min_shard_size={v!r}: expected an integer >= 0 (elements)")
    _check(t.batch_size % n == 0,
           f"config.train.batch_size={t.batch_size} cannot be shared by the {n} devices "
           f"({jax.process_count()} process(es)): use a multiple of {n}")
    k = config_util.get(t, "grad_accum_steps", 1)
    _check(config_util.is_int(k) and k >= 1, f"config.train.grad_accum_steps={k!r}: expected a positive integer")
    _check(t.batch_size % (k * n) == 0,
           f"config.train.grad_accum_steps={k} does not divide config.train.batch_size={t.batch_size} into "
           f"micro-batches the {n} devices can share: batch_size must be a multiple of grad_accum_steps x "
           f"devices = {k * n}")
    w = config_util.get(config.data, "workers", 1)
    _check(config_util.is_int(w) and w >= 1, f"config.data.workers={w!r}: expected a positive integer")
    window = config_util.get(config, "profile_steps", ())
    _check(window == () or (isinstance(window, (tuple, list)) and len(window) == 2
                            and all(config_util.is_int(x) for x in window) and 0 <= window[0] < window[1]),
           f"config.profile_steps={window!r}: expected () (no trace) or (start, stop) with 0 <= start < stop")
    g = config_util.get(config_util.get(config, "sample", {}), "grid_classes", 16)
    _check(config_util.is_int(g) and g >= 1, f"config.sample.grid_classes={g!r}: expected a positive integer")
    ddir = config_util.get(config.data, "data_dir", "")
    if ddir and "://" not in str(ddir):
        _check(os.path.isdir(os.path.expanduser(ddir)),
               f"config.data.data_dir={ddir!r} does not exist (create it, or leave it empty for "
               f"the default {data_lib.default_data_dir()!r})")


def _validate_frozen_text(config) -> None:
    """config.text_encoder and the training settings the frozen-encoder tasks (IF, unCLIP) do not support."""
    te = config_util.get(config, "text_encoder")
    _check(te is not None, f"config.task={config.task!r} needs config.text_encoder (start from "
                           f"jaxdiff.train.config.default_config({config.task!r}))")
    kind = config_util.get(te, "kind")
    if config.task in UNCLIP_TASKS:
        _check(kind == "clip", f"config.text_encoder.kind={kind!r}; allowed: clip (unCLIP needs a CLIP pair: a "
                               "train.py workdir of the 'clip' task, e.g. configs/digits_clip.py:unclip)")
    _check(kind in TEXT_ENCODERS, f"config.text_encoder.kind={kind!r}; allowed: {', '.join(TEXT_ENCODERS)} (clip: a "
                                  "train.py workdir of the 'clip' task; t5: a transformers T5 encoder folder)")
    path = config_util.get(te, "path", "")
    _check(isinstance(path, str) and path != "",
           f"config.text_encoder.path={path!r}: set it to the {'clip workdir' if kind == 'clip' else 'T5 folder'} "
           "whose frozen text encoder gives the token states")
    n = config_util.get(te, "max_length")
    _check(n is None or (config_util.is_int(n) and n >= 2),
           f"config.text_encoder.max_length={n!r}: expected None or an integer >= 2 (tokens per caption)")
    b = config_util.get(te, "batch_size", 256)
    _check(config_util.is_int(b) and b >= 1, f"config.text_encoder.batch_size={b!r}: expected a positive integer")
    m = config_util.get(te, "attention_mask", False)
    _check(isinstance(m, bool), f"config.text_encoder.attention_mask={m!r}: expected True or False")
    _check(isinstance(config_util.get(te, "cache_dir", ""), str),
           f"config.text_encoder.cache_dir={config_util.get(te, 'cache_dir')!r}: expected a path ('' = W/text_states)")
    v = config_util.get(config.train, "sample_every", 0)
    _check(v == 0, f"config.train.sample_every={v!r}: training grids are not drawn for the {config.task!r} task; "
                   "set it to 0")
    _check(config_util.get(config.train, "noised", True) is True,
           f"config.train.noised={config.train.noised!r} is for the classifier and clip tasks; leave it True")


def _validate_unclip(config) -> None:
    """The unCLIP tasks' own rules: the prior predicts x_0 ("sample") with fixed variance; the decoder's
    model sections and image-embedding dropout; no augmentation (the embeddings are of the stored images)."""
    _validate_frozen_text(config)
    d = config.diffusion
    aug = config_util.get(config.data, "augment")
    _check(aug in (None, False), f"config.data.augment={aug!r}: the {config.task!r} task reads each training "
                                 "image's cached CLIP embedding, computed on the stored (unflipped) image; set it "
                                 "to None or False")
    if config.task == "unclip_prior":
        _check(d.prediction == "x0", f"config.diffusion.prediction={d.prediction!r}: unCLIP's prior predicts the "
                                     "clean image embedding; allowed: x0 (diffusers' prediction_type 'sample')")
        _check(d.learned_sigma is False, f"config.diffusion.learned_sigma={d.learned_sigma!r}: the prior has a "
                                         "fixed variance (diffusers' fixed_small_log); allowed: False")
        drop = config_util.get(config.model, "dropout", 0.0)
        _check(drop in (0, 0.0) and not isinstance(drop, bool),
               f"config.model.dropout={drop!r}: jaxdiff's PriorTransformer has no dropout (inference only); allowed: 0")
        return
    p = config_util.get(d, "p_uncond_image", P_UNCOND_IMAGE)
    _check(isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0,
           f"config.diffusion.p_uncond_image={p!r} is outside [0, 1): the probability of replacing the CLIP image "
           "embedding by text_proj's learned null embedding (DALL-E 2: 0.1)")
    for section, derived in (("decoder", IF_DERIVED_MODEL_KEYS), ("text_proj", UNCLIP_TEXT_PROJ_DERIVED_KEYS)):
        sub = config_util.get(config.model, section)
        _check(sub is not None and hasattr(sub, "keys"),
               f"config.model.{section}={sub!r}: expected the {section} config.json fields (start from "
               "jaxdiff.train.config.default_config('unclip_decoder'))")
        for key in derived:
            _check(key not in sub, f"config.model.{section}.{key} is derived (from the dataset / the CLIP / the "
                                   "decoder); remove it from the config")
    extra = sorted(set(config.model.keys()) - {"decoder", "text_proj", "dtype"})
    _check(not extra, f"config.model.{extra[0] if extra else ''} is not a setting of the 'unclip_decoder' task: "
                      "config.model holds decoder (UNet2DConditionModel fields), text_proj and dtype")


def _validate_if(config) -> None:
    """The IF tasks' own sections: text_encoder, superres (stage II), and what they do not support."""
    _validate_frozen_text(config)
    if config.task == "if_superres":
        sr = config_util.get(config, "superres")
        _check(sr is not None, "config.task='if_superres' needs config.superres (low_res, max_level)")
        low = config_util.get(sr, "low_res")
        _check(config_util.is_int(low) and low >= 1,
               f"config.superres.low_res={low!r}: expected the positive side of the low-resolution images (e.g. 8)")
        level = config_util.get(sr, "max_level")
        steps = config.diffusion.num_timesteps
        _check(level is None or (config_util.is_int(level) and 1 <= level <= steps),
               f"config.superres.max_level={level!r}: expected None (= num_timesteps) or an integer in "
               f"[1, config.diffusion.num_timesteps={steps}] (levels are q_sample steps of the schedule)")


@dataclasses.dataclass(frozen=True)
class EncoderInfo:
    """What the IF tasks need to know of their frozen text encoder before anything is loaded: its kind and
    path, the width E and the token count L of its states [L, E], its tokenizer (spiece.model for T5) and,
    for a CLIP of this repository, the word vocabulary and the CLIP's model config."""

    kind: str
    path: str
    width: int
    length: int
    tokenizer: str = ""
    vocab: tuple = ()
    model: dict = dataclasses.field(default_factory=dict, compare=False)


def _t5_tokenizer_path(te, path: str) -> str:
    """spiece.model: config.text_encoder.tokenizer (the file or its folder), else next to the T5 folder or in
    IF's layout (<repo>/text_encoder with <repo>/tokenizer/spiece.model)."""
    given = config_util.get(te, "tokenizer", "") or ""
    candidates = [given] if given else [path, os.path.join(os.path.dirname(os.path.normpath(path)), "tokenizer")]
    for c in candidates:
        c = os.path.expanduser(c)
        for f in (c, os.path.join(c, "spiece.model"), os.path.join(c, "tokenizer", "spiece.model")):
            if os.path.isfile(f):
                return f
    raise ConfigError(f"config.text_encoder.tokenizer={given!r}: no spiece.model found in "
                      f"{', '.join(repr(c) for c in candidates)}; pass T5's spiece.model (or its folder)")


def encoder_info(config) -> EncoderInfo:
    """The frozen text encoder of an IF task's config (only its config files are read; ConfigError when the
    path is not such an encoder or a setting does not fit it)."""
    te = config.text_encoder
    kind, path = te.kind, os.path.expanduser(str(te.path))
    n = config_util.get(te, "max_length")
    if kind == "clip":
        from jaxdiff import checkpoints

        try:
            cfg = checkpoints.read_config(path)
        except (FileNotFoundError, OSError, ValueError) as e:
            raise ConfigError(f"config.text_encoder.path={te.path!r} is not a workdir of the 'clip' task: {e}") from None
        model = dict(cfg.get("model", {}))
        vocab = (cfg.get("text") or {}).get("vocab")
        if model.get("kind") != "clip" or not vocab:
            raise ConfigError(f"config.text_encoder.path={te.path!r} is not a workdir of the 'clip' task (its "
                              f"config.json has model kind {model.get('kind')!r}{'' if vocab else ' and no vocabulary'}); "
                              "train one with configs/digits_clip.py, or use config.text_encoder.kind='t5'")
        length = int(model["max_text_len"])
        if n is not None and n != length:
            raise ConfigError(f"config.text_encoder.max_length={n} differs from the CLIP's max_text_len={length} "
                              "(derived for kind 'clip'; leave it None)")
        width = int(model["n_head_text"]) * int(model.get("n_head_state_text", 64))
        return EncoderInfo("clip", path, width, length, vocab=tuple(vocab), model=model)
    from jaxdiff.convert.transformers import read_t5_config

    try:
        t5 = read_t5_config(path)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"config.text_encoder.path={te.path!r} is not a transformers T5 encoder folder: {e}") from None
    return EncoderInfo("t5", path, int(t5.d_model), int(n or T5_MAX_LENGTH), tokenizer=_t5_tokenizer_path(te, path),
                       model=t5.to_dict())


def _if_model_flags(config, info, image_size: int, channels: int) -> dict:
    """create_model flags of an IF task: config.model's diffusers fields with the derived ones filled in."""
    enc = encoder_info(config)
    flags = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.model.items()}
    sr = config.task == "if_superres"
    flags["in_channels"] = 2 * channels if sr else channels
    flags["out_channels"] = channels * (2 if config.diffusion.learned_sigma else 1)
    flags["class_embed_type"] = "timestep" if sr else None
    flags["sample_size"] = image_size
    if flags.get("cross_attention_dim") is None:
        flags["cross_attention_dim"] = enc.width
    if flags.get("encoder_hid_dim_type") is not None:
        flags["encoder_hid_dim"] = enc.width
    elif flags["cross_attention_dim"] != enc.width:
        raise ConfigError(f"config.model.cross_attention_dim={flags['cross_attention_dim']} must equal the text "
                          f"encoder's width {enc.width} when config.model.encoder_hid_dim_type is None (no projection)")
    levels = len(flags.get("block_out_channels") or ())
    f = 2 ** max(levels - 1, 0)
    if image_size % f:
        raise ConfigError(f"config.model.block_out_channels has {levels} levels: the image size must be a multiple "
                          f"of {f}, and {info.name!r} gives {image_size} (set config.data.image_size)")
    if sr:
        low = int(config.superres.low_res)
        if low >= image_size or image_size % low:
            raise ConfigError(f"config.superres.low_res={low} must divide config.data.image_size={image_size} and be "
                              "smaller (the low-resolution input is the image averaged over blocks of "
                              "image_size / low_res pixels)")
    flags["kind"] = "unet2d_condition"
    return flags


def unclip_clip_dims(config) -> tuple:
    """(embedding width D, token count L) of an unCLIP task's frozen CLIP pair; ConfigError unless its token
    states are D wide too (the prior and text_proj read both in one width, as Karlo's ViT-L/14: 768)."""
    enc = encoder_info(config)
    if enc.kind != "clip":
        raise ConfigError(f"config.text_encoder.kind={enc.kind!r}; allowed: clip")
    d = int(enc.model["n_embd"])
    if d != enc.width:
        raise ConfigError(f"config.text_encoder.path={config.text_encoder.path!r}: the CLIP's embeddings are "
                          f"n_embd={d} wide but its token states {enc.width} (n_head_text x n_head_state_text); "
                          "unCLIP needs them equal: train the CLIP with configs/digits_clip.py:unclip")
    return d, enc.length


def _unclip_model_flags(config, info, image_size: int, channels: int) -> dict:
    """create_model flags of an unCLIP task, the derived fields filled in from the CLIP and the data."""
    from jaxdiff.models.unet2d_condition import unet2d_condition_config

    d, length = unclip_clip_dims(config)
    clip_size = int(encoder_info(config).model.get("image_size", image_size))
    if clip_size != image_size:
        raise ConfigError(f"config.text_encoder.path={config.text_encoder.path!r} is a CLIP of {clip_size}x{clip_size} "
                          f"images; config.data gives {image_size}x{image_size}")
    if config.task == "unclip_prior":
        flags = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.model.items()}
        prd = flags.get("added_emb_type", "prd") == "prd"
        flags.update(embedding_dim=d, num_embeddings=length, embedding_proj_dim=d, clip_embed_dim=d,
                     additional_embeddings=4 if prd else 3, kind="prior")
        return flags
    dec = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.model.decoder.items()}
    dec.update(in_channels=channels, out_channels=channels * (2 if config.diffusion.learned_sigma else 1),
               class_embed_type="identity", sample_size=image_size)
    try:
        dcfg = unet2d_condition_config(dec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model.decoder cannot build the decoder for {info.name!r} images of size "
                          f"{image_size}x{image_size}x{channels}: {e}") from None
    levels = len(dcfg.block_out_channels)
    if image_size % 2 ** (levels - 1):
        raise ConfigError(f"config.model.decoder.block_out_channels has {levels} levels: the image size must be a "
                          f"multiple of {2 ** (levels - 1)}, and {info.name!r} gives {image_size}")
    tp = dict(config.model.text_proj.items(), clip_embeddings_dim=d, time_embed_dim=int(dcfg.time_embed_dim),
              cross_attention_dim=int(dcfg.context_dim))
    return {"kind": "unclip_decoder", "decoder": dec, "text_proj": tp,
            "dtype": config_util.get(config.model, "dtype", "float32")}


def open_dataset(config, split: Optional[str] = None):
    """(source, info) of config.data (split defaults to config.data.split)."""
    dcfg = config.data
    name = dcfg.name
    ddir = config_util.get(dcfg, "data_dir", "") or None
    try:
        return data_lib.make_source(name, split or dcfg.split, ddir)
    except ValueError as e:
        raise ConfigError(f"config.data (name={name!r}, split={split or dcfg.split!r}): {e}") from None


def vocabulary(config, info) -> list:
    """The word vocabulary of a text task's captioned dataset (ConfigError for other datasets)."""
    if info.caption_key is None or not info.captions:
        from jaxdiff.data.sources import BUNDLED_DATASETS

        raise ConfigError(f"config.task={config.task!r} needs a captioned dataset, and config.data.name="
                          f"{info.name!r} has no captions; allowed: "
                          f"{', '.join(n for n in BUNDLED_DATASETS if n.endswith('_text'))}")
    return list(info.captions["vocabulary"])


def model_flags(config, info) -> dict:
    """create_model kwargs (plus "kind") with the derived values filled in."""
    flags = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.model.items()}
    if info.image_shape is None and not config_util.get(config.data, "image_size"):
        raise ConfigError(f"dataset {info.name!r} has images of varying size: set config.data.image_size")
    image_size = int(config_util.get(config.data, "image_size") or info.image_shape[0])
    channels = int(info.channels or 3)
    if config.task in IF_TASKS:
        vocabulary(config, info)  # a captioned dataset
        return _if_model_flags(config, info, image_size, channels)
    if config.task in UNCLIP_TASKS:
        vocabulary(config, info)
        return _unclip_model_flags(config, info, image_size, channels)
    if config.task == "clip":
        return dict(flags, kind="clip", image_size=image_size, n_vocab=len(vocabulary(config, info)) + 1,
                    n_timesteps=int(config.diffusion.num_timesteps))
    flags.setdefault("dtype", "float32")
    if info.num_classes < 1 and config.task != "text2im":
        raise ConfigError(f"dataset {info.name!r} has no class labels; jaxdiff trains class-conditional "
                         "models and classifiers")
    flags["image_size"] = image_size
    flags["in_channels"] = channels
    if config.task in DIFFUSION_TASKS:
        flags.pop("pool", None)
        flags["out_channels"] = channels * (2 if config.diffusion.learned_sigma else 1)
        if config.task == "text2im":
            flags["kind"] = "text2im"
            flags["n_vocab"] = len(vocabulary(config, info)) + 1  # the words and the end/padding id
        else:
            flags["kind"] = "unet"
            flags["num_classes"] = int(info.num_classes)
            flags["null_label"] = bool(config.diffusion.p_uncond > 0)
    else:
        flags["kind"] = "classifier"
        flags["out_channels"] = int(info.num_classes)
    return flags


def resolve_config(config, info=None) -> ml_collections.ConfigDict:
    """A copy of `config`, validated, with the derived values filled in (config.model becomes the
    full create_model flags with "kind"; config.data gets num_classes, image_size, channels)."""
    validate_config(config)
    if info is None:
        _, info = open_dataset(config)
    flags = model_flags(config, info)
    kind = flags.pop("kind")
    from jaxdiff import models

    try:
        flags = models.normalize_flags(kind, **flags)
    except (ValueError, TypeError) as e:
        s = flags.get("image_size", flags.get("sample_size"))
        raise ConfigError(f"config.model cannot build a {kind!r} for {info.name!r} images of size {s}x{s}x"
                          f"{int(info.channels or 3)}: {e}") from None
    out = ml_collections.ConfigDict(config.to_dict())
    out.model = ml_collections.ConfigDict({"kind": kind, **flags})
    if config.task in FROZEN_TEXT_TASKS:
        return _resolve_if(out, config, info, flags)
    out.data.image_size = flags["image_size"]
    out.data.channels = int(info.channels or 3)
    out.data.num_classes = int(info.num_classes)
    out.data.data_dir = info.data_dir
    out.data.num_examples = int(info.num_examples)
    if config.task in TEXT_TASKS:
        out.text = ml_collections.ConfigDict({"vocab": vocabulary(config, info)})
        _warn_truncation(out, info)
    return out


def _resolve_if(out, config, info, flags) -> ml_collections.ConfigDict:
    """The IF tasks' derived values: data size and channels, the text encoder's width and token count,
    stage II's max_level."""
    out.data.image_size = int(flags["decoder"]["sample_size"] if config.task == "unclip_decoder" else
                              flags.get("sample_size", out.data.image_size or info.image_shape[0]))
    out.data.channels = int(info.channels or 3)
    out.data.num_classes = int(info.num_classes)
    out.data.data_dir = info.data_dir
    out.data.num_examples = int(info.num_examples)
    enc = encoder_info(config)
    out.text_encoder.path = enc.path
    out.text_encoder.max_length = enc.length
    out.text_encoder.width = enc.width
    if enc.kind == "t5":
        out.text_encoder.tokenizer = enc.tokenizer
    if config.task in UNCLIP_TASKS:
        out.text_encoder.embed_dim = int(enc.model["n_embd"])
    if config.task == "if_superres" and config_util.get(config.superres, "max_level") is None:
        out.superres.max_level = int(config.diffusion.num_timesteps)
    return out


def _warn_truncation(resolved, info) -> None:
    """Log when the dataset's longest caption has more words than the model reads (it is truncated)."""
    from jaxdiff.data import captions

    longest = captions.scheme(info.captions["scheme"]).max_words
    room = int(resolved.model.text_ctx) if resolved.task == "text2im" else int(resolved.model.max_text_len) - 1
    if longest > room:
        log.warning("captions of %s have up to %d words; the model reads %d: longer ones are truncated to their "
                    "first %d words", info.name, longest, room, room)


def create_model(resolved):
    from jaxdiff import models

    flags = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in resolved.model.items()}
    return models.create_model(flags.pop("kind"), **flags)
