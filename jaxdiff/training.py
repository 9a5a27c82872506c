"""Training: train state, EMA, optimiser, jitted train steps for the diffusion model and the classifier.

One entry point, `train(config, workdir)`, for every task (`config.task`):

* "diffusion": an ADM U-Net, class-conditional; labels are dropped to the null label
  (index num_classes) with probability `diffusion.p_uncond`, so one model serves classifier-free
  guidance. Targets eps / x0 / v; learned sigma trains with the hybrid loss
  (`diffusion.training_losses`); t is uniform over the schedule.
* "text2im": the same recipe for GLIDE's text-conditional U-Net (`models.Text2ImUNet`) on a
  captioned dataset; captions are word-tokenized (`tokenizers.WordTokenizer`, truncated to
  `model.text_ctx` words as GLIDE does) and dropped to the empty caption with probability
  `diffusion.p_uncond` (default 0.2).
* "classifier": the ADM noisy classifier on q_sample'd inputs at uniform t (`train.noised=True`)
  or on clean images at t = 0 (`train.noised=False`, the classifier of the evaluation metrics).
* "clip": a noised CLIP (`models.ClipModel`) on a captioned dataset, images q_sample'd at uniform t
  (the encoder sees the ORIGINAL timestep), with CLIP's symmetric contrastive loss
  (`contrastive_loss`). `model.learn_logit_scale` learns log(scale) (capped at 100) or keeps
  `model.logit_scale` fixed; `train.noised=False` trains the clean CLIP the text sweep scores with.
  The negatives are the rows of one micro-batch, so with `train.grad_accum_steps` > 1 the loss
  differs from one batch of B (the other tasks' updates do not depend on it).

The text tasks write the dataset's vocabulary into W/config.json ({"text": {"vocab": [...]}}).
All tasks use AdamW with linear warm-up (then constant, linear to 0 or cosine), global-norm
clipping and an EMA of the weights kept in the `TrainState`.

Parallelism (`config.mesh`, a ('data', 'fsdp') mesh), gradient accumulation, randomness (example j
of a step draws from fold_in(fold_in(key(seed), step), j), so resumed runs repeat uninterrupted
ones), preemption and the multi-host rules: docs/training.md.

Derived values are never configured twice: image size, channels and num_classes come from the
dataset; out_channels from in_channels and learned_sigma (or num_classes for the classifier);
null_label from p_uncond > 0. The resolved config is written to W/config.json.

Non-finite losses are folded into an on-device accumulator read at every log boundary and before
every save: training stops at most `log_every - 1` steps after the first bad step, no checkpoint
is written after it, and the error names that step and the last good checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdiff import checkpoints, config_util, cpu, files, monitor, parallel, preemption
from jaxdiff import data as data_lib
from jaxdiff import diffusion as diffusion_lib
from jaxdiff import schedules
from jaxdiff.monitor import MetricsWriter

log = logging.getLogger("jaxdiff.training")

TASKS = ("diffusion", "classifier", "text2im", "clip")
DIFFUSION_TASKS = ("diffusion", "text2im")
TEXT_TASKS = ("text2im", "clip")
P_UNCOND = {"diffusion": 0.1, "text2im": 0.2}  # default probability of dropping the label / caption
LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16")
SAMPLES_DIR = "samples"
MEMORY_FILE = "memory.json"  # the compiled step's and the train state's bytes per device
HOSTS_FILE = ".hosts_check"  # written by process 0, read by every process (is W shared?)


class ConfigError(ValueError):
    """A config value that cannot work (the message names the value and what is allowed)."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf loss (or gradient norm)."""


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs: data order and randomness derive from `step`."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any


# --- Default config (configs/*.py start from it and override) -------------------------------------

# The "clip" task's model: glide's clip/config.yaml names (image_size, n_vocab and n_timesteps are
# derived from the dataset and the diffusion schedule); logit scale as `models.ClipModel`.
CLIP_MODEL_DEFAULTS = dict(n_embd=64, patch_size=2, n_head_image=2, n_head_state_image=32, n_xf_blocks_image=2,
                           n_head_text=2, n_head_state_text=32, n_xf_blocks_text=2, max_text_len=8,
                           logit_scale=1 / 0.07, learn_logit_scale=True)


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
    return c


# --- Config: validation and derived values --------------------------------------------------------

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
    for key in ("image_size", "in_channels", "out_channels", "num_classes", "null_label", "kind", "n_vocab",
                "n_timesteps"):
        _check(key not in config.model,
               f"config.model.{key} is derived (from the dataset / task / diffusion settings); "
               "remove it from the config")
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
        from jaxdiff.data import BUNDLED_DATASETS

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
        s = flags["image_size"]
        raise ConfigError(f"config.model cannot build a {kind!r} for {info.name!r} images of size {s}x{s}x"
                          f"{int(info.channels or 3)}: {e}") from None
    out = ml_collections.ConfigDict(config.to_dict())
    out.model = ml_collections.ConfigDict({"kind": kind, **flags})
    out.data.image_size = flags["image_size"]
    out.data.channels = int(info.channels or 3)
    out.data.num_classes = int(info.num_classes)
    out.data.data_dir = info.data_dir
    out.data.num_examples = int(info.num_examples)
    if config.task in TEXT_TASKS:
        out.text = ml_collections.ConfigDict({"vocab": vocabulary(config, info)})
        _warn_truncation(out, info)
    return out


def _warn_truncation(resolved, info) -> None:
    """Log when the dataset's longest caption has more words than the model reads (it is truncated)."""
    from jaxdiff import captions

    longest = captions.scheme(info.captions["scheme"]).max_words
    room = int(resolved.model.text_ctx) if resolved.task == "text2im" else int(resolved.model.max_text_len) - 1
    if longest > room:
        log.warning("captions of %s have up to %d words; the model reads %d: longer ones are truncated to their "
                    "first %d words", info.name, longest, room, room)


def create_model(resolved):
    from jaxdiff import models

    flags = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in resolved.model.items()}
    return models.create_model(flags.pop("kind"), **flags)


# --- Optimiser, EMA, state ------------------------------------------------------------------------

def learning_rate_fn(train_cfg) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up to `lr` over warmup_steps, then constant / linear to 0 / cosine to 0."""
    lr = float(train_cfg.lr)
    warmup = int(train_cfg.warmup_steps)
    total = int(train_cfg.steps)
    kind = config_util.get(train_cfg, "lr_schedule", "constant")

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1)) if warmup > 0 else 1.0
        if kind == "constant":  # (no dependence on `steps`: extending a run keeps the program)
            return lr * warm * jnp.ones_like(step)
        frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if kind == "linear":
            decay = 1.0 - frac
        else:
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return lr * warm * decay

    return fn


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW (on every parameter, as torch's AdamW in ADM) after optional global-norm clipping."""
    chain = []
    if float(train_cfg.grad_clip) > 0:
        chain.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    chain.append(optax.adamw(learning_rate_fn(train_cfg), b1=float(config_util.get(train_cfg, "b1", 0.9)),
                             b2=float(config_util.get(train_cfg, "b2", 0.999)), eps=float(config_util.get(train_cfg, "eps", 1e-8)),
                             weight_decay=float(train_cfg.weight_decay)))
    return optax.chain(*chain)


def ema_decay_at(train_cfg, step: jax.Array) -> jax.Array:
    """ema_decay, warmed up as min(decay, (1 + step) / (10 + step)) when train.ema_warmup."""
    decay = jnp.float32(train_cfg.ema_decay)
    if config_util.get(train_cfg, "ema_warmup", True):
        s = jnp.asarray(step, jnp.float32)
        decay = jnp.minimum(decay, (1.0 + s) / (10.0 + s))
    return decay


def ema_update(ema, params, decay):
    return jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p, ema, params)


def _keys(seed: int):
    root = jax.random.key(int(seed))
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)


def cond_spec(resolved, batch: int) -> Any:
    """Shapes and dtypes of a step's condition for `batch` rows: the labels (int32 [B]), or the
    caption tokens of a text task ({"tokens": int32 [B, L], "mask": bool [B, L]} for "text2im",
    {"tokens", "lengths": int32 [B]} for "clip"), as `train_batches` yields them."""
    if resolved.task == "text2im":
        ctx = int(resolved.model.text_ctx)
        return {"tokens": jax.ShapeDtypeStruct((batch, ctx), jnp.int32),
                "mask": jax.ShapeDtypeStruct((batch, ctx), jnp.bool_)}
    if resolved.task == "clip":
        return {"tokens": jax.ShapeDtypeStruct((batch, int(resolved.model.max_text_len)), jnp.int32),
                "lengths": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    return jax.ShapeDtypeStruct((batch,), jnp.int32)


def model_args(task: str, cond) -> tuple:
    """The network's arguments after (x, t) for a step's condition (see `cond_spec`)."""
    if task == "classifier":
        return ()
    if task == "text2im":
        return cond["tokens"], cond["mask"]
    if task == "clip":
        return cond["tokens"], cond["lengths"]
    return (cond,)


def init_state(resolved, model, tx, init_key) -> TrainState:
    """A fresh TrainState (traceable: jit it with replicated out_shardings)."""
    s = int(resolved.data.image_size)
    x = jnp.zeros((1, s, s, int(resolved.data.channels)), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    cond = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), cond_spec(resolved, 1))
    params = model.init(init_key, x, t, *model_args(resolved.task, cond))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=tx.init(params))


# --- Losses and the train step --------------------------------------------------------------------

def example_keys(key: jax.Array, ids: jax.Array, n: int) -> list:
    """n keys per example: split(fold_in(key, id), n) for each id, as n arrays of keys [b]."""
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), n))(ids)
    return [keys[:, j] for j in range(n)]


def _apply(resolved, model, params, x, t, args: tuple, dropout_keys):
    """The network in training mode on (x, t, *args); with dropout, each example is its own call
    (vmap) with its own key, so its masks do not depend on its micro-batch."""
    if float(config_util.get(resolved.model, "dropout", 0.0) or 0.0) <= 0:
        return model.apply({"params": params}, x, t, *args, train=True)

    def one(x1, t1, a1, k1):
        return model.apply({"params": params}, x1[None], t1[None], *(a[None] for a in a1), train=True,
                           rngs={"dropout": k1})[0]

    return jax.vmap(one)(x, t, tuple(args), dropout_keys)


def _ids(images, ids):
    return jnp.arange(images.shape[0], dtype=jnp.int32) if ids is None else ids


def condition_dropout(resolved) -> Callable:
    """drop(cond, dropped bool [B]) -> cond: the dropped rows' labels become the null label
    (num_classes), or (text2im) their captions the empty caption (every id the end id, mask off)."""
    if resolved.task == "text2im":
        end = len(resolved.text.vocab)  # WordTokenizer.end_token

        def drop(cond, dropped):
            return {"tokens": jnp.where(dropped[:, None], end, cond["tokens"]),
                    "mask": cond["mask"] & ~dropped[:, None]}

        return drop
    num_classes = int(resolved.data.num_classes)
    return lambda labels, dropped: jnp.where(dropped, num_classes, labels)


def diffusion_loss_fn(resolved, model, sched) -> Callable:
    """loss(params, images, cond, key, ids=None) -> (scalar loss, per-batch metrics); cond: the
    labels, or the caption tokens of "text2im" (`cond_spec`). Example i draws its timestep, noise,
    condition drop and dropout from fold_in(key, ids[i]) (ids: rows in the global batch, 0..b-1)."""
    dcfg = resolved.diffusion
    p_uncond = float(dcfg.p_uncond)
    drop = condition_dropout(resolved)
    prediction, learned_sigma = dcfg.prediction, bool(dcfg.learned_sigma)
    vlb_weight = config_util.get(dcfg, "vlb_weight")

    def loss_fn(params, images, cond, key, ids=None):
        k_t, k_noise, k_drop, k_dropout = example_keys(key, _ids(images, ids), 4)
        t, noise = _t_and_noise(sched, images, k_t, k_noise)
        if p_uncond > 0:
            cond = drop(cond, jax.vmap(lambda k: jax.random.bernoulli(k, p_uncond))(k_drop))
        args = model_args(resolved.task, cond)

        def model_fn(xt, tt):
            return _apply(resolved, model, params, xt, sched.timestep_map[tt], args, k_dropout).astype(jnp.float32)

        losses = diffusion_lib.training_losses(sched, model_fn, images, t, noise, prediction=prediction,
                                               learned_sigma=learned_sigma, vlb_weight=vlb_weight)
        metrics = {k: jnp.mean(v) for k, v in losses.items()}
        return metrics["loss"], metrics

    return loss_fn


def _t_and_noise(sched, images, k_t, k_noise):
    """Each example's uniform timestep index and Gaussian noise, from its own keys [b]."""
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, sched.num_steps))(k_t)
    noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], images.dtype))(k_noise)
    return t, noise


def _noised(resolved, sched, images, k_t, k_noise):
    """(x_t, t): q_sample'd at uniform t (train.noised, the default), or the clean images at t = 0."""
    if not bool(config_util.get(resolved.train, "noised", True)):
        return images, jnp.zeros((images.shape[0],), jnp.int32)
    t, noise = _t_and_noise(sched, images, k_t, k_noise)
    return diffusion_lib.q_sample(sched, images, t, noise), t


def classifier_loss_fn(resolved, model, sched) -> Callable:
    """Cross-entropy of the classifier on x_t at uniform t (noised) or on x_0 at t = 0; per-example
    keys as `diffusion_loss_fn`."""

    def loss_fn(params, images, labels, key, ids=None):
        k_t, k_noise, k_dropout = example_keys(key, _ids(images, ids), 3)
        x, t = _noised(resolved, sched, images, k_t, k_noise)
        logits = _apply(resolved, model, params, x, sched.timestep_map[t], (), k_dropout).astype(jnp.float32)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"loss": loss, "accuracy": acc}

    return loss_fn


def contrastive_loss(z_img: jax.Array, z_txt: jax.Array, scale: jax.Array, tokens: jax.Array) -> tuple:
    """(loss, top-1 accuracy) of CLIP's symmetric loss on unnormalised embeddings [B, D]: logits =
    scale * cosine similarity; a row's target is split evenly over the rows with the same caption
    (CLIP's InfoNCE when captions are distinct); accurate when the best caption is one of its own."""
    from jaxdiff.clip_guidance import normalize

    logits = scale * normalize(z_img.astype(jnp.float32)) @ normalize(z_txt.astype(jnp.float32)).T
    same = jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)
    target = same / jnp.sum(same, axis=1, keepdims=True)
    loss = 0.5 * (jnp.mean(optax.softmax_cross_entropy(logits, target))
                  + jnp.mean(optax.softmax_cross_entropy(logits.T, target)))
    acc = jnp.mean(jnp.take_along_axis(same, jnp.argmax(logits, axis=1)[:, None], axis=1).astype(jnp.float32))
    return loss, acc


def clip_loss_fn(resolved, model, sched) -> Callable:
    """CLIP's symmetric contrastive loss (`contrastive_loss`) of x_t at uniform t (noised) or of x_0
    at t = 0 against the captions; per-example keys as `diffusion_loss_fn`."""

    def loss_fn(params, images, cond, key, ids=None):
        k_t, k_noise = example_keys(key, _ids(images, ids), 2)
        x, t = _noised(resolved, sched, images, k_t, k_noise)
        z_img, z_txt, scale = model.apply({"params": params}, x, sched.timestep_map[t],
                                          *model_args("clip", cond))
        loss, acc = contrastive_loss(z_img, z_txt, scale, cond["tokens"])
        return loss, {"loss": loss, "accuracy": acc, "logit_scale": scale}

    return loss_fn


LOSSES = {"diffusion": diffusion_loss_fn, "text2im": diffusion_loss_fn, "classifier": classifier_loss_fn,
          "clip": clip_loss_fn}


def zero_accumulator(metric_names) -> dict:
    """On-device sums of the step metrics since the last log, and the first non-finite step."""
    return {"sums": {k: jnp.zeros((), jnp.float32) for k in metric_names},
            "count": jnp.zeros((), jnp.int32),
            "first_nonfinite": jnp.full((), -1, jnp.int32)}


def make_train_step(resolved, model, tx, sched, train_key, *, mesh=None, state_shardings=None) -> Callable:
    """step(state, images, cond, acc) -> (state, acc): one AdamW update + EMA, metrics accumulated;
    cond: the labels or caption tokens (`cond_spec`), split into micro-batches like the images.

    With `mesh` and `state_shardings` (`state_layout`) the parameters are gathered for the
    forward/backward pass when split over 'fsdp', and the gradients constrained to their layout.
    `train.grad_accum_steps = k` > 1 sums k micro-batches' gradients in a `lax.scan`; micro-batch m
    holds rows m*b'..(m+1)*b'-1 of every device's block of b = k*b' rows.
    """
    loss_fn = LOSSES[resolved.task](resolved, model, sched)
    lr_fn = learning_rate_fn(resolved.train)
    tcfg = resolved.train
    k = int(config_util.get(tcfg, "grad_accum_steps", 1))
    param_sh = None if state_shardings is None else state_shardings.params
    gather = mesh is not None and parallel.axis_size(mesh, parallel.FSDP_AXIS) > 1
    shards = 1 if mesh is None else int(mesh.size)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    loss_metrics = [n for n in metric_names(resolved) if n not in ("grad_norm", "lr")]

    def constrain(tree, sharding):
        return tree if sharding is None else jax.lax.with_sharding_constraint(tree, sharding)

    def micro_batches(a):
        b = a.shape[0]
        a = a.reshape((shards, k, b // (shards * k)) + a.shape[1:]).swapaxes(0, 1).reshape((k, b // k) + a.shape[1:])
        if mesh is None:
            return a
        return jax.lax.with_sharding_constraint(
            a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.batch_axes(mesh))))

    def gradients(params, images, cond, key):
        full = constrain(params, parallel.replicated_sharding(mesh)) if gather else params
        ids = jnp.arange(images.shape[0], dtype=jnp.int32)
        if k == 1:
            (_, metrics), grads = value_and_grad(full, images, cond, key, ids)
            return metrics, constrain(grads, param_sh)
        xs = (micro_batches(images), jax.tree_util.tree_map(micro_batches, cond), micro_batches(ids))

        def body(carry, mb):
            x, y, i = mb
            (_, metrics), grads = value_and_grad(full, x, y, key, i)
            metrics = {n: metrics[n].astype(jnp.float32) for n in loss_metrics}
            return jax.tree_util.tree_map(jnp.add, carry, (metrics, constrain(grads, param_sh))), None

        zeros = ({n: jnp.zeros((), jnp.float32) for n in loss_metrics},
                 constrain(jax.tree_util.tree_map(jnp.zeros_like, params), param_sh))
        (msum, gsum), _ = jax.lax.scan(body, zeros, xs)
        return jax.tree_util.tree_map(lambda v: v / k, (msum, gsum))

    def step_fn(state: TrainState, images, cond, acc):
        key = jax.random.fold_in(train_key, state.step)
        metrics, grads = gradients(state.params, images, cond, key)
        loss = metrics["loss"]
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay_at(tcfg, state.step))
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr_fn(state.step))
        bad = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        first = jnp.where((acc["first_nonfinite"] < 0) & bad, state.step + 1, acc["first_nonfinite"])
        acc = {"sums": {k: acc["sums"][k] + metrics[k].astype(jnp.float32) for k in acc["sums"]},
               "count": acc["count"] + 1, "first_nonfinite": first}
        return new_state, acc

    return step_fn


def train_mesh(resolved):
    """The (data, fsdp) mesh of config.mesh over every device of every process."""
    m = config_util.get(resolved, "mesh", {})
    return parallel.make_mesh(config_util.get(m, "data", -1), config_util.get(m, "fsdp", 1))


def state_layout(resolved, model, tx, mesh) -> tuple:
    """(abstract TrainState with shardings, TrainState of NamedShardings, jitted init_fn(key)) on
    `mesh` (`parallel.state_shardings` with config.mesh.min_shard_size)."""
    def init(key):
        return init_state(resolved, model, tx, key)

    shapes = jax.eval_shape(init, jax.random.key(0))
    min_size = int(config_util.get(config_util.get(resolved, "mesh", {}), "min_shard_size",
                                   parallel.DEFAULT_MIN_SHARD_SIZE))
    shardings = parallel.state_shardings(shapes, mesh, min_size)
    abstract = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                      shapes, shardings)
    return abstract, shardings, cpu.jit(init, out_shardings=shardings)


def jit_train_step(resolved, model, tx, sched, train_key, mesh, shardings) -> tuple:
    """(jitted step with explicit in/out shardings and donated state, accumulator sharding)."""
    repl = parallel.replicated_sharding(mesh)
    acc_sharding = jax.tree_util.tree_map(lambda _: repl, zero_accumulator(metric_names(resolved)))
    batch = parallel.batch_sharding(mesh)
    step = cpu.jit(make_train_step(resolved, model, tx, sched, train_key, mesh=mesh, state_shardings=shardings),
                   in_shardings=(shardings, batch, batch, acc_sharding),
                   out_shardings=(shardings, acc_sharding), donate_argnums=(0, 3))
    return step, acc_sharding


def _abstract_inputs(resolved, mesh, acc_sharding) -> tuple:
    """ShapeDtypeStructs (with shardings) of a step's images, condition and metric accumulator."""
    batch = parallel.batch_sharding(mesh)
    b, s, c = int(resolved.train.batch_size), int(resolved.data.image_size), int(resolved.data.channels)
    acc = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                 jax.eval_shape(lambda: zero_accumulator(metric_names(resolved))), acc_sharding)
    cond = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch),
                                  cond_spec(resolved, b))
    return jax.ShapeDtypeStruct((b, s, s, c), jnp.float32, sharding=batch), cond, acc


def lower_train_step(resolved, mesh=None):
    """The train step of `resolved` lowered for `mesh` (default config.mesh) on abstract inputs, for
    `.compile().memory_analysis()` / `.cost_analysis()` without data or a workdir."""
    model = create_model(resolved)
    tx = make_optimizer(resolved.train)
    sched = schedules.make_schedule(resolved.diffusion.schedule, int(resolved.diffusion.num_timesteps))
    mesh = train_mesh(resolved) if mesh is None else mesh
    abstract, shardings, _ = state_layout(resolved, model, tx, mesh)
    step, acc_sharding = jit_train_step(resolved, model, tx, sched, _keys(resolved.seed)[1], mesh, shardings)
    return step.lower(abstract, *_abstract_inputs(resolved, mesh, acc_sharding))


def memory_report(compiled, state, mesh) -> dict:
    """What W/memory.json holds: the compiled step's buffer sizes per device (XLA's memory
    analysis) and the train state's bytes (all, and the most any device of this process holds)."""
    out = {"mesh": {k: int(v) for k, v in dict(mesh.shape).items()}, "devices": jax.device_count()}
    mem = compiled.memory_analysis()
    if mem is not None:
        out["train_step"] = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                             ("temp", "argument", "output", "alias", "generated_code")
                             if hasattr(mem, f"{k}_size_in_bytes")}
    leaves = jax.tree_util.tree_leaves(state)
    out["state_bytes"] = int(sum(x.size * x.dtype.itemsize for x in leaves))
    out["state_bytes_per_device"] = int(max(parallel.addressable_bytes(state).values()))
    return out


def metric_names(resolved) -> tuple:
    if resolved.task == "classifier":
        return ("loss", "accuracy", "grad_norm", "lr")
    if resolved.task == "clip":
        return ("loss", "accuracy", "logit_scale", "grad_norm", "lr")
    names = ("loss", "mse") + (("vb",) if resolved.diffusion.learned_sigma else ())
    return names + ("grad_norm", "lr")


# --- Host-side helpers ----------------------------------------------------------------------------

def _host(x) -> np.ndarray:
    """Value of a replicated (possibly multi-process) array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def _all_finite(tree) -> bool:
    return bool(_host(_all_finite_jit(tree)))


@jax.jit
def _all_finite_jit(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def caption_tokens(resolved) -> Callable[[Any], dict]:
    """captions -> a text task's token arrays (`cond_spec`), with the dataset's word vocabulary:
    `WordTokenizer.tokens_and_mask` (text_ctx) for "text2im", `.tokens_and_lengths` (max_text_len)
    for "clip"; longer captions are truncated, unknown words raise ValueError naming them."""
    from jaxdiff.tokenizers import WordTokenizer

    tok = WordTokenizer(list(resolved.text.vocab), source=f"the vocabulary of {resolved.data.name}")
    if resolved.task == "text2im":
        ctx = int(resolved.model.text_ctx)
        return lambda captions: dict(zip(("tokens", "mask"), tok.tokens_and_mask(list(captions), ctx)))
    n = int(resolved.model.max_text_len)
    return lambda captions: dict(zip(("tokens", "lengths"), tok.tokens_and_lengths(list(captions), n)))


def train_batches(source, resolved, start: int, stop: int, position: Optional[int] = None) -> Iterator:
    """This process's (images, cond) of steps [start, stop), prefetched (`jaxdiff.data.batches`);
    cond is the labels, or a text task's caption tokens (`caption_tokens`); step `start`'s batch
    begins at stream `position` (default start * batch_size)."""
    text = resolved.task in TEXT_TASKS
    it = data_lib.batches(source, global_batch_size=int(resolved.train.batch_size), seed=int(resolved.seed),
                          start_step=start, num_steps=stop - start, augment=config_util.get(resolved.data, "augment"),
                          image_size=int(resolved.data.image_size), start_position=position,
                          workers=int(config_util.get(resolved.data, "workers", 1)), text=text)
    if not text:
        return it
    tokens = caption_tokens(resolved)
    return ((images, tokens(fields[source.info.caption_key])) for images, _, fields in it)


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0, smoothing=0.0)


# --- Periodic samples / evaluation ----------------------------------------------------------------

def grid_classes(num_classes: int, at_most: int) -> np.ndarray:
    """The classes a training grid shows: all of them, or `at_most` evenly spaced ones."""
    if num_classes <= at_most:
        return np.arange(num_classes)
    return np.unique(np.linspace(0, num_classes - 1, at_most).round().astype(np.int64))


def make_sample_fn(resolved, model) -> Callable:
    """fn(params) -> (uint8 [rows * per_class, H, W, C], labels): CFG (or unguided) samples, one row
    per class of `grid_classes` (at most sample.grid_classes rows); a text model's rows are
    captioned with the class alone ("a seven"), guided over the empty caption.

    The sample count is padded to a multiple of the global device count (padding rows dropped);
    every process gets the whole grid. `params` must be replicated.
    """
    from jaxdiff import guidance, samplers, sampling

    scfg = resolved.sample
    dcfg = resolved.diffusion
    num_classes = int(resolved.data.num_classes)
    per_class = int(config_util.get(scfg, "per_class", 8))
    steps = int(config_util.get(scfg, "steps", 50))
    kind = config_util.get(scfg, "sampler", "ddim")
    sched = schedules.make_schedule(dcfg.schedule, int(dcfg.num_timesteps),
                                    f"ddim{steps}" if kind == "ddim" else samplers.SAMPLERS[kind].respacing(steps))
    text = resolved.task == "text2im"
    null = text or bool(resolved.model.null_label)
    learned_sigma = bool(dcfg.learned_sigma)
    guides = ("cfg",) if null else ()

    def build(params):
        if text:
            return guidance.build_guides(guides, guidance.unet_fn(model, params), uncond=guidance.caption_dropout,
                                         learned_sigma=learned_sigma, prepare=guidance.text_encoder(model, params))
        return guidance.build_guides(guides, guidance.unet_fn(model, params),
                                     null_label=num_classes if null else None, learned_sigma=learned_sigma)

    s = int(resolved.data.image_size)
    run = samplers.make_sampler(build, samplers.SamplerSpec(sampler=kind, prediction=dcfg.prediction,
                                                            learned_sigma=learned_sigma),
                                (s, s, int(resolved.data.channels)))
    scales = {guidance.CFG_SCALE: float(config_util.get(scfg, "guidance_scale", 3.0))} if null else {}
    labels = np.repeat(grid_classes(num_classes, int(config_util.get(scfg, "grid_classes", 16))), per_class)
    n = len(labels)
    total = -(-n // jax.device_count()) * jax.device_count()
    padded = np.concatenate([labels, np.full(total - n, labels[-1])])
    kwargs = dict(labels=padded)
    if text:
        from jaxdiff import captions

        scheme = captions.scheme(resolved.data.name)
        words = [captions.class_caption(scheme, int(y)) for y in padded]
        kwargs = dict(per_sample=sampling.caption_inputs({}, resolved, {}, (), words, total))

    def fn(params):
        images = sampling.generate(run, params, sched, num_samples=total, scales=scales,
                                   seed=int(config_util.get(scfg, "seed", 0)), batch_size=total, **kwargs)
        return images[:n], labels

    return fn


# --- The loop -------------------------------------------------------------------------------------

def _read_text(path) -> Optional[str]:
    try:
        return path.read_text()
    except (OSError, ValueError):  # missing, or not readable from this host
        return None


def prepare_workdir(workdir, config_text: str) -> None:
    """Create W and write W/config.json (process 0); then check, collectively, that every process
    was given the same workdir on storage they all read, and the same config (else ConfigError on
    every process: none hangs).
    """
    pid, count = jax.process_index(), jax.process_count()
    path = workdir / checkpoints.CONFIG_FILE
    token = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF if pid == 0 else 0
    if pid == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        old = _read_text(path)
        if old is not None and old != config_text:
            log.warning("config differs from the one in %s; the new one replaces it", path)
        files.atomic_write(str(path), config_text)
        if count > 1:
            files.atomic_write(str(workdir / HOSTS_FILE), f"{token}\n")
    if count == 1:
        return
    token = int(parallel.process_values(np.array(token))[0])  # also a barrier: process 0 has written
    seen = _read_text(workdir / HOSTS_FILE)
    if seen is None or seen.strip() != str(token):
        code = 1
    else:
        code = 0 if _read_text(path) == config_text else 2
    codes = parallel.process_values(np.array(code))
    dirs = parallel.process_strings(str(workdir))
    if not codes.any():
        return
    where = "; ".join(f"process {i}: {d!r}" for i, d in enumerate(dirs))
    if (codes == 1).any():
        bad = ", ".join(str(i) for i in np.flatnonzero(codes == 1))
        raise ConfigError(
            f"process(es) {bad} cannot read the run files process 0 wrote ({checkpoints.CONFIG_FILE}, {HOSTS_FILE}) "
            f"in their workdir ({where}). Every process must be given the same workdir, on storage every host "
            "reads and writes (a shared file system, or gs://bucket/path); per-host local disks do not work")
    bad = ", ".join(str(i) for i in np.flatnonzero(codes == 2))
    raise ConfigError(f"process(es) {bad} resolved a different config than process 0 (compare their command "
                      f"lines with {path}): every process must run the same config")


def agree_on_start(manager) -> Optional[int]:
    """The latest complete checkpoint step, checked to be the same on every process (collective).

    Raises ConfigError on every process when they see different latest steps."""
    latest = manager.latest_step()
    steps = parallel.process_values(np.array(-1 if latest is None else int(latest))).reshape(-1)
    if (steps != steps[0]).any():
        seen = "; ".join(f"process {i}: {'none' if v < 0 else f'step {v}'}" for i, v in enumerate(steps))
        raise ConfigError(f"the processes see different latest checkpoints in {manager.directory} ({seen}): "
                          "they would start from different steps. Give every process the same workdir on "
                          "storage every host reads")
    return latest


def train(config, workdir: str, *, step_hook: Optional[Callable[[int], None]] = None) -> TrainState:
    """Train per `config` in `workdir`, resuming from its latest complete checkpoint.

    Returns the final TrainState (or the one saved when SIGTERM / SIGINT stopped the run early).
    `step_hook(step)` is called on the host after each step is dispatched. Raises NonFiniteLossError
    when a loss or gradient norm is NaN/inf (after waiting for pending checkpoint writes).
    """
    config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
    validate_config(config)
    source, info = open_dataset(config)
    resolved = resolve_config(config, info)
    workdir = checkpoints.as_path(workdir)
    prepare_workdir(workdir, config_util.to_json(resolved) + "\n")

    model = create_model(resolved)
    tx = make_optimizer(resolved.train)
    sched = schedules.make_schedule(resolved.diffusion.schedule, int(resolved.diffusion.num_timesteps))
    init_key, train_key, _ = _keys(resolved.seed)

    mesh = train_mesh(resolved)
    abstract, shardings, init_fn = state_layout(resolved, model, tx, mesh)
    repl = parallel.replicated_sharding(mesh)
    tcfg = resolved.train
    batch_size = int(tcfg.batch_size)
    manager = checkpoints.make_manager(workdir / checkpoints.CHECKPOINT_DIR, keep=int(tcfg.keep),
                                       async_save=bool(config_util.get(tcfg, "async_checkpointing", True)))
    try:
        start = agree_on_start(manager)
        state = None if start is None else checkpoints.restore(manager, start, abstract)
    except ConfigError:
        manager.close()
        raise
    except (ValueError, KeyError, TypeError) as e:
        manager.close()
        raise ConfigError(
            f"the latest checkpoint in {manager.directory} does not fit this config's model/optimiser "
            f"(was the workdir trained with another config?): {' '.join(str(e).split())[:600]}") from None
    if state is None:
        state, start, position = init_fn(init_key), 0, 0
        log.info("initialised a new %s model", resolved.task)
    else:
        # checkpoints written before positions were saved: the old order, step * batch_size
        position = int(checkpoints.step_metadata(manager, start).get("data_position", start * batch_size))
        log.info("resumed from the checkpoint of step %d (data stream position %d)", start, position)
    last_good = start if start else None
    total = int(tcfg.steps)
    names = metric_names(resolved)
    step_fn, acc_sharding = jit_train_step(resolved, model, tx, sched, train_key, mesh, shardings)
    step_fn = step_fn.lower(abstract, *_abstract_inputs(resolved, mesh, acc_sharding)).compile()
    if jax.process_index() == 0:
        files.write_json(str(workdir / MEMORY_FILE), memory_report(step_fn, state, mesh))
    new_acc = jax.jit(lambda: zero_accumulator(names), out_shardings=acc_sharding)
    gather = jax.jit(lambda p: p, out_shardings=repl)  # the EMA parameters for sampling / evaluation
    batch_sh = parallel.batch_sharding(mesh)

    writer = MetricsWriter(workdir, start)
    profile = monitor.ProfileWindow(config_util.get(resolved, "profile_steps", ()), workdir / monitor.PROFILE_DIR)
    sample_every = int(config_util.get(tcfg, "sample_every", 0))
    sample_fn = None
    eval_fn = None
    samples_dir = workdir / SAMPLES_DIR
    log_every, ckpt_every = int(tcfg.log_every), int(tcfg.checkpoint_every)

    acc = new_acc()
    pbar = _progress(total, start)
    t_last, s_last = time.time(), start
    step = start
    try:
        with preemption.StopRequest() as stop:
            for images, cond in train_batches(source, resolved, start, total, position):
                profile.before_step(step)
                x = jax.make_array_from_process_local_data(batch_sh, images)
                c = jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(batch_sh, a), cond)
                state, acc = step_fn(state, x, c, acc)
                step += 1
                position += batch_size
                if step_hook is not None:
                    step_hook(step)
                profile.after_step(step, state)
                stopping = stop.reached(step) and step < total
                at_log = step % log_every == 0 or step == total or stopping
                at_ckpt = step % ckpt_every == 0 or step == total or stopping
                at_sample = sample_every > 0 and step % sample_every == 0 and not stopping
                if not (at_log or at_ckpt or at_sample):
                    continue
                # --- host sync: metrics since the last boundary, non-finite check ---
                acc_host = jax.tree_util.tree_map(_host, acc)
                acc = new_acc()
                count = int(acc_host["count"])
                first_bad = int(acc_host["first_nonfinite"])
                means = {k: float(v) / max(count, 1) for k, v in acc_host["sums"].items()}
                if first_bad >= 0:
                    manager.wait_until_finished()
                    pbar.close()
                    where = (f"the last good checkpoint is step {last_good} in {manager.directory}"
                             if last_good is not None else "no checkpoint had been written yet")
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at training step {first_bad} (detected at step {step}, "
                        f"mean loss of steps {step - count + 1}..{step} = {means.get('loss')}); training "
                        f"stopped; {where}. Lower config.train.lr, raise warmup_steps or set grad_clip.")
                now = time.time()
                speed = monitor.throughput(step - s_last, now - t_last, batch_size)
                t_last, s_last = now, step
                means.update(speed)
                means.update(monitor.device_memory())
                writer.write(step, means)
                pbar.update(step - pbar.n)
                pbar.set_postfix(loss=f"{means['loss']:.4g}", steps_s=f"{speed['steps_per_sec']:.2f}", refresh=False)
                pbar.refresh()
                if at_ckpt:
                    if not _all_finite(state.params):
                        manager.wait_until_finished()
                        raise NonFiniteLossError(
                            f"parameters became non-finite by training step {step}; training stopped; "
                            f"the last good checkpoint is step {last_good}")
                    checkpoints.save(manager, step, state, {"loss": means["loss"]},
                                     custom_metadata={"data_position": position, "batch_size": batch_size})
                    last_good = step
                if stopping:
                    log.warning("stopped at step %d on request; its checkpoint is saved in %s: run the same "
                                "command to resume", step, manager.directory)
                    break
                if at_sample:
                    if resolved.task in DIFFUSION_TASKS:
                        if sample_fn is None:
                            sample_fn = make_sample_fn(resolved, model)
                        grid, grid_labels = sample_fn(gather(state.ema_params))
                        if jax.process_index() == 0:
                            per_class = int(config_util.get(resolved.sample, "per_class", 8))
                            files.save_grid(str(samples_dir / f"step_{step:07d}.png"), grid, ncol=per_class)
                    else:
                        if eval_fn is None:
                            from jaxdiff import evaluation

                            eval_fn = evaluation.make_eval_fn(resolved, model)
                        ev = eval_fn(gather(state.ema_params))
                        writer.write(step, ev)
                        log.info("step %d eval %s", step, ev)
                    t_last = time.time()  # sampling time does not count against steps/s
        manager.wait_until_finished()
    finally:
        profile.close()
        pbar.close()
        writer.close()
        manager.close()
    return state
