"""The train state, the optimiser and learning-rate schedule, the EMA, and each task's network inputs."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from jaxdiff.train.config import IF_TASKS, UNCLIP_TASKS
from jaxdiff.util import config as config_util


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs: data order and randomness derive from `step`."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any


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


def make_optimizer(train_cfg, frozen=()) -> optax.GradientTransformation:
    """AdamW (on every parameter, as torch's AdamW in ADM) after optional global-norm clipping; the top-level
    parameters named in `frozen` (the prior's normalisation statistics) are never updated."""
    chain = []
    if float(train_cfg.grad_clip) > 0:
        chain.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    chain.append(optax.adamw(learning_rate_fn(train_cfg), b1=float(config_util.get(train_cfg, "b1", 0.9)),
                             b2=float(config_util.get(train_cfg, "b2", 0.999)), eps=float(config_util.get(train_cfg, "eps", 1e-8)),
                             weight_decay=float(train_cfg.weight_decay)))
    if frozen:
        names = frozenset(frozen)
        chain.append(optax.masked(optax.set_to_zero(), lambda p: {k: k in names for k in p}))
    return optax.chain(*chain)


def frozen_params(resolved) -> tuple:
    """Top-level parameters a task keeps fixed: the prior's clip_mean / clip_std (set from the data)."""
    return ("clip_mean", "clip_std") if resolved.task == "unclip_prior" else ()


def ema_decay_at(train_cfg, step: jax.Array) -> jax.Array:
    """ema_decay, warmed up as min(decay, (1 + step) / (10 + step)) when train.ema_warmup."""
    decay = jnp.float32(train_cfg.ema_decay)
    if config_util.get(train_cfg, "ema_warmup", True):
        s = jnp.asarray(step, jnp.float32)
        decay = jnp.minimum(decay, (1.0 + s) / (10.0 + s))
    return decay


def ema_update(ema, params, decay):
    return jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p, ema, params)


def root_keys(seed: int):
    root = jax.random.key(int(seed))
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)


def cond_spec(resolved, batch: int) -> Any:
    """Shapes and dtypes of a step's condition for `batch` rows: the labels (int32 [B]), or the
    caption tokens of a text task ({"tokens": int32 [B, L], "mask": bool [B, L]} for "text2im",
    {"tokens", "lengths": int32 [B]} for "clip"), or the frozen text encoder's token states of the IF tasks
    ({"states": float32 [B, L, E], "mask": bool [B, L]}), for the unCLIP tasks also the frozen CLIP's image
    embedding of each row's image and text embedding of its caption ({"image_emb", "text_emb": float32 [B, D]}),
    as `train_batches` yields them."""
    if resolved.task in UNCLIP_TASKS:
        n, e = int(resolved.text_encoder.max_length), int(resolved.text_encoder.width)
        d = int(resolved.text_encoder.embed_dim)
        return {"image_emb": jax.ShapeDtypeStruct((batch, d), jnp.float32),
                "text_emb": jax.ShapeDtypeStruct((batch, d), jnp.float32),
                "states": jax.ShapeDtypeStruct((batch, n, e), jnp.float32),
                "mask": jax.ShapeDtypeStruct((batch, n), jnp.bool_)}
    if resolved.task in IF_TASKS:
        n, e = int(resolved.text_encoder.max_length), int(resolved.text_encoder.width)
        return {"states": jax.ShapeDtypeStruct((batch, n, e), jnp.float32),
                "mask": jax.ShapeDtypeStruct((batch, n), jnp.bool_)}
    if resolved.task == "text2im":
        ctx = int(resolved.model.text_ctx)
        return {"tokens": jax.ShapeDtypeStruct((batch, ctx), jnp.int32),
                "mask": jax.ShapeDtypeStruct((batch, ctx), jnp.bool_)}
    if resolved.task == "clip":
        return {"tokens": jax.ShapeDtypeStruct((batch, int(resolved.model.max_text_len)), jnp.int32),
                "lengths": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    return jax.ShapeDtypeStruct((batch,), jnp.int32)


def model_args(task: str, cond, class_labels=None, attention_mask: bool = False) -> tuple:
    """The network's arguments after (x, t) for a step's condition (see `cond_spec`); the IF tasks'
    UNet2DConditionModel takes (encoder_hidden_states, class_labels (stage II's augmentation levels),
    attention_mask (with config.text_encoder.attention_mask)); the unCLIP decoder takes (image embeddings, text
    embeddings, token states, text mask) (`models.UnCLIPDecoder`), the prior (text embeddings, token states, mask)
    after its noisy image embedding and t."""
    if task == "unclip_decoder":
        return cond["image_emb"], cond["text_emb"], cond["states"], cond["mask"]
    if task == "unclip_prior":
        return cond["text_emb"], cond["states"], cond["mask"]
    if task in IF_TASKS:
        return cond["states"], class_labels, cond["mask"] if attention_mask else None
    if task == "classifier":
        return ()
    if task == "text2im":
        return cond["tokens"], cond["mask"]
    if task == "clip":
        return cond["tokens"], cond["lengths"]
    return (cond,)


def init_state(resolved, model, tx, init_key, param_overrides=None) -> TrainState:
    """A fresh TrainState (traceable: jit it with replicated out_shardings). `param_overrides`: top-level
    parameters set to given values instead of their initialisation (the prior's clip_mean / clip_std)."""
    s = int(resolved.data.image_size)
    channels = int(resolved.model.in_channels) if resolved.task in IF_TASKS else int(resolved.data.channels)
    x = jnp.zeros((1, s, s, channels), jnp.float32)
    if resolved.task == "unclip_prior":  # the prior's "image" is the (noisy) CLIP image embedding
        x = jnp.zeros((1, int(resolved.text_encoder.embed_dim)), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    cond = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), cond_spec(resolved, 1))
    labels = t if resolved.task == "if_superres" else None
    args = model_args(resolved.task, cond, labels, bool(config_util.get(config_util.get(resolved, "text_encoder", {}),
                                                                        "attention_mask", False)))
    params = model.init(init_key, x, t, *args)["params"]
    for name, value in (param_overrides or {}).items():
        params[name] = jnp.asarray(value, params[name].dtype).reshape(params[name].shape)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=tx.init(params))
