"""Training: train state, EMA, optimiser, jitted train steps for the diffusion model and the classifier.

One entry point, `train(config, workdir)`, for both tasks (`config.task`):

* "diffusion": an ADM U-Net, class-conditional; labels are dropped to the null label
  (index num_classes) with probability `diffusion.p_uncond`, so one model serves classifier-free
  guidance. Targets eps / x0 / v; learned sigma trains with the hybrid loss
  (`diffusion.training_losses`); t is uniform over the schedule.
* "classifier": the ADM noisy classifier (EncoderUNetModel) on q_sample'd inputs at uniform t
  (`train.noised=True`, the ADM recipe), or on clean images with t = 0 (`train.noised=False`, the
  classifier used for evaluation metrics).

Both use AdamW with linear warm-up (then constant, linear anneal to 0 as ADM's `anneal_lr`, or
cosine), global-norm gradient clipping and an EMA of the weights kept in the `TrainState`.
Data parallelism: the global batch is sharded over a ('data',) mesh of every device of every
process (per-host batches joined with `jax.make_array_from_process_local_data`); the step is the
single-device program under `jax.jit` and XLA averages the gradients (the loss is the global-batch
mean). Randomness: the step's key is fold_in(key(seed), step) and the data of step s is a pure
function of (seed, s) (`jaxdiff.data`), so a resumed run repeats an uninterrupted one exactly.

Derived values are never configured twice: image size, channels and num_classes come from the
dataset; out_channels from in_channels and learned_sigma (or num_classes for the classifier);
null_label from p_uncond > 0. The resolved config is written to W/config.json.

Non-finite losses: each step folds "first step with a non-finite loss or gradient norm" into an
on-device accumulator. The host reads it at every log boundary and before every checkpoint save, so
training stops at most `log_every - 1` steps after the first bad step, no checkpoint is ever
written after it, and the error names that step and the last good checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdiff import checkpoints, config_util, cpu, files, parallel
from jaxdiff import data as data_lib
from jaxdiff import diffusion as diffusion_lib
from jaxdiff import schedules

log = logging.getLogger("jaxdiff.training")

TASKS = ("diffusion", "classifier")
LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16")
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


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


# --------------------------------------------------------------------------------------------
# Default config (configs/*.py start from it and override)
# --------------------------------------------------------------------------------------------

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
    ))
    c.model = ml_collections.ConfigDict(dict(
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
    ))
    if task == "classifier":
        c.model.pool = "attention"
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine",
        num_timesteps=1000,
        prediction="eps",
        learned_sigma=True,
        p_uncond=0.1,
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
        noised=True,              # classifier: q_sample at uniform t (False: clean images, t = 0)
        log_every=50,
        checkpoint_every=500,
        keep=3,
        sample_every=0,           # diffusion: sample grid; classifier: test accuracy vs t (0 = never)
        async_checkpointing=True,
    ))
    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddim",
        steps=50,
        guidance_scale=3.0,       # CFG, Imagen convention (1 = conditional)
        per_class=8,
        seed=0,
    ))
    return c


# --------------------------------------------------------------------------------------------
# Config: validation and derived values
# --------------------------------------------------------------------------------------------

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
    if task == "diffusion":
        _check(d.prediction in diffusion_lib.PREDICTIONS,
               f"config.diffusion.prediction={d.prediction!r} is not a prediction target; allowed: "
               f"{', '.join(diffusion_lib.PREDICTIONS)}")
        p = d.p_uncond
        _check(isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0,
               f"config.diffusion.p_uncond={p!r} is outside [0, 1): it is the probability of dropping "
               "a label to the null label (0 = no classifier-free guidance; the paper's range is 0.1-0.2)")
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
    for key in ("image_size", "in_channels", "out_channels", "num_classes", "null_label", "kind"):
        _check(key not in config.model,
               f"config.model.{key} is derived (from the dataset / task / diffusion settings); "
               "remove it from the config")
    n = jax.device_count()
    _check(t.batch_size % n == 0,
           f"config.train.batch_size={t.batch_size} cannot be shared by the {n} devices "
           f"({jax.process_count()} process(es)): use a multiple of {n}")
    ddir = config_util.get(config.data, "data_dir", "")
    if ddir:
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


def model_flags(config, info) -> dict:
    """create_model kwargs (plus "kind") with the derived values filled in."""
    flags = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.model.items()}
    flags.setdefault("dtype", "float32")
    if info.image_shape is None and not config_util.get(config.data, "image_size"):
        raise ConfigError(f"dataset {info.name!r} has images of varying size: set config.data.image_size")
    image_size = int(config_util.get(config.data, "image_size") or info.image_shape[0])
    channels = int(info.channels or 3)
    if info.num_classes < 1:
        raise ConfigError(f"dataset {info.name!r} has no class labels; jaxdiff trains class-conditional "
                         "models and classifiers")
    flags["image_size"] = image_size
    flags["in_channels"] = channels
    if config.task == "diffusion":
        flags.pop("pool", None)
        flags["kind"] = "unet"
        flags["out_channels"] = channels * (2 if config.diffusion.learned_sigma else 1)
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
    except ValueError as e:
        raise ConfigError(
            f"config.model cannot build a {kind!r} for {info.name!r} images of size "
            f"{flags['image_size']}x{flags['image_size']}x{flags['in_channels']}: {e}") from None
    out = ml_collections.ConfigDict(config.to_dict())
    out.model = ml_collections.ConfigDict({"kind": kind, **flags})
    out.data.image_size = flags["image_size"]
    out.data.channels = flags["in_channels"]
    out.data.num_classes = int(info.num_classes)
    out.data.data_dir = info.data_dir
    out.data.num_examples = int(info.num_examples)
    return out


def create_model(resolved):
    from jaxdiff import models

    flags = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in resolved.model.items()}
    return models.create_model(flags.pop("kind"), **flags)


# --------------------------------------------------------------------------------------------
# Optimiser, EMA, state
# --------------------------------------------------------------------------------------------

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


def init_state(resolved, model, tx, init_key) -> TrainState:
    """A fresh TrainState (traceable: jit it with replicated out_shardings)."""
    s = int(resolved.data.image_size)
    x = jnp.zeros((1, s, s, int(resolved.data.channels)), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    if resolved.task == "diffusion":
        params = model.init(init_key, x, t, jnp.zeros((1,), jnp.int32))["params"]
    else:
        params = model.init(init_key, x, t)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=tx.init(params))


# --------------------------------------------------------------------------------------------
# Losses and the train step
# --------------------------------------------------------------------------------------------

def diffusion_loss_fn(resolved, model, sched) -> Callable:
    """loss(params, images, labels, key) -> (scalar loss, per-batch metrics)."""
    dcfg = resolved.diffusion
    num_classes = int(resolved.data.num_classes)
    p_uncond = float(dcfg.p_uncond)
    prediction, learned_sigma = dcfg.prediction, bool(dcfg.learned_sigma)
    vlb_weight = config_util.get(dcfg, "vlb_weight")

    def loss_fn(params, images, labels, key):
        k_t, k_noise, k_drop, k_dropout = jax.random.split(key, 4)
        b = images.shape[0]
        t = jax.random.randint(k_t, (b,), 0, sched.num_steps)
        noise = jax.random.normal(k_noise, images.shape, images.dtype)
        y = labels
        if p_uncond > 0:
            y = jnp.where(jax.random.bernoulli(k_drop, p_uncond, (b,)), num_classes, y)

        def model_fn(xt, tt):
            out = model.apply({"params": params}, xt, sched.timestep_map[tt], y, train=True,
                              rngs={"dropout": k_dropout})
            return out.astype(jnp.float32)

        losses = diffusion_lib.training_losses(sched, model_fn, images, t, noise, prediction=prediction,
                                               learned_sigma=learned_sigma, vlb_weight=vlb_weight)
        metrics = {k: jnp.mean(v) for k, v in losses.items()}
        return metrics["loss"], metrics

    return loss_fn


def classifier_loss_fn(resolved, model, sched) -> Callable:
    """Cross-entropy of the classifier on x_t at uniform t (noised) or on x_0 at t = 0."""
    noised = bool(config_util.get(resolved.train, "noised", True))

    def loss_fn(params, images, labels, key):
        k_t, k_noise, k_dropout = jax.random.split(key, 3)
        b = images.shape[0]
        if noised:
            t = jax.random.randint(k_t, (b,), 0, sched.num_steps)
            x = diffusion_lib.q_sample(sched, images, t, jax.random.normal(k_noise, images.shape, images.dtype))
        else:
            t = jnp.zeros((b,), jnp.int32)
            x = images
        logits = model.apply({"params": params}, x, sched.timestep_map[t], train=True,
                             rngs={"dropout": k_dropout}).astype(jnp.float32)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"loss": loss, "accuracy": acc}

    return loss_fn


def zero_accumulator(metric_names) -> dict:
    """On-device sums of the step metrics since the last log, and the first non-finite step."""
    return {"sums": {k: jnp.zeros((), jnp.float32) for k in metric_names},
            "count": jnp.zeros((), jnp.int32),
            "first_nonfinite": jnp.full((), -1, jnp.int32)}


def make_train_step(resolved, model, tx, sched, train_key) -> Callable:
    """step(state, images, labels, acc) -> (state, acc): one AdamW update + EMA, metrics accumulated."""
    loss_fn = (diffusion_loss_fn if resolved.task == "diffusion" else classifier_loss_fn)(resolved, model, sched)
    lr_fn = learning_rate_fn(resolved.train)
    tcfg = resolved.train

    def step_fn(state: TrainState, images, labels, acc):
        key = jax.random.fold_in(train_key, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, images, labels, key)
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


def metric_names(resolved) -> tuple:
    if resolved.task == "classifier":
        return ("loss", "accuracy", "grad_norm", "lr")
    names = ("loss", "mse") + (("vb",) if resolved.diffusion.learned_sigma else ())
    return names + ("grad_norm", "lr")


# --------------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------------

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


def train_batches(source, resolved, start: int, stop: int) -> Iterator:
    """This process's (images, labels) of steps [start, stop), prefetched (`jaxdiff.data.batches`)."""
    return data_lib.batches(source, global_batch_size=int(resolved.train.batch_size), seed=int(resolved.seed),
                            start_step=start, num_steps=stop - start, augment=config_util.get(resolved.data, "augment"),
                            image_size=int(resolved.data.image_size))


class MetricsWriter:
    """JSON lines in W/metrics.jsonl (process 0), and TensorBoard when tensorboardX is installed."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb = None
        if not self.enabled:
            return
        # Drop lines a killed run wrote after its last checkpoint: they are recomputed.
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip()]
            keep = []
            for ln in lines:
                try:
                    if json.loads(ln).get("step", 0) <= resume_step:
                        keep.append(ln)
                except json.JSONDecodeError:
                    pass  # a torn last line of a killed run
            files.atomic_write(self.path, "".join(keep))
        try:
            from tensorboardX import SummaryWriter  # optional
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except Exception:
                SummaryWriter = None
        if SummaryWriter is not None:
            try:
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except Exception:  # never let an optional writer stop training
                self.tb = None

    def write(self, step: int, metrics: Mapping[str, float]):
        if not self.enabled:
            return
        rec = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), int(step))

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0, smoothing=0.0)


# --------------------------------------------------------------------------------------------
# Periodic samples / evaluation
# --------------------------------------------------------------------------------------------

def make_sample_fn(resolved, model) -> Callable:
    """fn(params) -> uint8 [num_classes * per_class, H, W, C]: CFG (or unguided) samples, one row per class."""
    from jaxdiff import guidance, samplers, sampling

    scfg = resolved.sample
    dcfg = resolved.diffusion
    num_classes = int(resolved.data.num_classes)
    per_class = int(config_util.get(scfg, "per_class", 8))
    steps = int(config_util.get(scfg, "steps", 50))
    kind = config_util.get(scfg, "sampler", "ddim")
    sched = schedules.make_schedule(dcfg.schedule, int(dcfg.num_timesteps),
                                    f"ddim{steps}" if kind == "ddim" else samplers.SAMPLERS[kind].respacing(steps))
    null = bool(resolved.model.null_label)
    learned_sigma = bool(dcfg.learned_sigma)
    guides = ("cfg",) if null else ()

    def build(params):
        return guidance.build_guides(guides, guidance.unet_fn(model, params),
                                     null_label=num_classes if null else None, learned_sigma=learned_sigma)

    s = int(resolved.data.image_size)
    run = samplers.make_sampler(build, samplers.SamplerSpec(sampler=kind, prediction=dcfg.prediction,
                                                            learned_sigma=learned_sigma),
                                (s, s, int(resolved.data.channels)))
    scales = {guidance.CFG_SCALE: float(config_util.get(scfg, "guidance_scale", 3.0))} if null else {}

    def fn(params):
        return sampling.generate(run, params, sched, num_samples=num_classes * per_class,
                                 labels=np.repeat(np.arange(num_classes), per_class), scales=scales,
                                 seed=int(config_util.get(scfg, "seed", 0)), batch_size=num_classes * per_class)

    return fn


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def _write_config(workdir: str, resolved) -> None:
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, checkpoints.CONFIG_FILE)
    text = config_util.to_json(resolved) + "\n"
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != text:
                log.warning("config differs from the one in %s; the new one replaces it", path)
    files.atomic_write(path, text)


def train(config, workdir: str, *, step_hook: Optional[Callable[[int], None]] = None) -> TrainState:
    """Train per `config` in `workdir`, resuming from its latest complete checkpoint.

    Returns the final TrainState. `step_hook(step)` (optional) is called on the host after each
    step is dispatched (tests use it to slow a run down). Raises NonFiniteLossError when a loss or
    gradient norm is NaN/inf (after waiting for pending checkpoint writes).
    """
    config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
    validate_config(config)
    source, info = open_dataset(config)
    resolved = resolve_config(config, info)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    _write_config(workdir, resolved)

    model = create_model(resolved)
    tx = make_optimizer(resolved.train)
    sched = schedules.make_schedule(resolved.diffusion.schedule, int(resolved.diffusion.num_timesteps))
    init_key, train_key, _ = _keys(resolved.seed)

    mesh = parallel.data_mesh()
    repl = parallel.replicated_sharding(mesh)
    init_fn = cpu.jit(lambda k: init_state(resolved, model, tx, k), out_shardings=repl)
    abstract = jax.eval_shape(init_fn, init_key)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract)

    tcfg = resolved.train
    manager = checkpoints.make_manager(os.path.join(workdir, checkpoints.CHECKPOINT_DIR), keep=int(tcfg.keep),
                                       async_save=bool(config_util.get(tcfg, "async_checkpointing", True)))
    try:
        state, start = checkpoints.restore_latest(manager, abstract)
    except (ValueError, KeyError, TypeError) as e:
        manager.close()
        raise ConfigError(
            f"the latest checkpoint in {manager.directory} does not fit this config's model/optimiser "
            f"(was the workdir trained with another config?): {' '.join(str(e).split())[:600]}") from None
    if state is None:
        state, start = init_fn(init_key), 0
        log.info("initialised a new %s model", resolved.task)
    else:
        log.info("resumed from the checkpoint of step %d", start)
    last_good = start if start else None
    total = int(tcfg.steps)
    names = metric_names(resolved)
    acc_sharding = jax.tree_util.tree_map(lambda _: repl, zero_accumulator(names))
    new_acc = jax.jit(lambda: zero_accumulator(names), out_shardings=acc_sharding)
    step_fn = cpu.jit(make_train_step(resolved, model, tx, sched, train_key),
                      out_shardings=(jax.tree_util.tree_map(lambda a: a.sharding, abstract), acc_sharding),
                      donate_argnums=(0, 3))
    batch_sh = parallel.batch_sharding(mesh)

    writer = MetricsWriter(workdir, start)
    sample_every = int(config_util.get(tcfg, "sample_every", 0))
    sample_fn = None
    eval_fn = None
    samples_dir = os.path.join(workdir, SAMPLES_DIR)
    log_every, ckpt_every = int(tcfg.log_every), int(tcfg.checkpoint_every)

    acc = new_acc()
    pbar = _progress(total, start)
    t_last, s_last = time.time(), start
    step = start
    try:
        for images, labels in train_batches(source, resolved, start, total):
            x = jax.make_array_from_process_local_data(batch_sh, images)
            y = jax.make_array_from_process_local_data(batch_sh, labels)
            state, acc = step_fn(state, x, y, acc)
            step += 1
            if step_hook is not None:
                step_hook(step)
            at_log = step % log_every == 0 or step == total
            at_ckpt = step % ckpt_every == 0 or step == total
            at_sample = sample_every > 0 and step % sample_every == 0
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
            sps = (step - s_last) / max(now - t_last, 1e-9)
            t_last, s_last = now, step
            means["steps_per_sec"] = sps
            writer.write(step, means)
            pbar.update(step - pbar.n)
            pbar.set_postfix(loss=f"{means['loss']:.4g}", steps_s=f"{sps:.2f}", refresh=False)
            pbar.refresh()
            if at_ckpt:
                if not _all_finite(state.params):
                    manager.wait_until_finished()
                    raise NonFiniteLossError(
                        f"parameters became non-finite by training step {step}; training stopped; "
                        f"the last good checkpoint is step {last_good}")
                checkpoints.save(manager, step, state, {"loss": means["loss"]})
                last_good = step
            if at_sample:
                if resolved.task == "diffusion":
                    if sample_fn is None:
                        sample_fn = make_sample_fn(resolved, model)
                    grid = sample_fn(state.ema_params)
                    if jax.process_index() == 0:
                        files.save_grid(os.path.join(samples_dir, f"step_{step:07d}.png"), grid,
                                        ncol=int(config_util.get(resolved.sample, "per_class", 8)))
                else:
                    if eval_fn is None:
                        from jaxdiff import evaluation

                        eval_fn = evaluation.make_eval_fn(resolved, model)
                    ev = eval_fn(state.ema_params)
                    writer.write(step, ev)
                    log.info("step %d eval %s", step, ev)
                t_last = time.time()  # sampling time does not count against steps/s
        manager.wait_until_finished()
    finally:
        pbar.close()
        writer.close()
        manager.close()
    return state
