"""Each task's loss: per-example keys, condition dropout, the diffusion, classifier and CLIP losses."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdiff.diffusion import gaussian as diffusion_lib
from jaxdiff.train.state import model_args
from jaxdiff.util import config as config_util


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
    from jaxdiff.diffusion.clip_guide import normalize

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
