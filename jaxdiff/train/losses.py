"""Each task's loss: per-example keys, condition dropout, the diffusion, classifier and CLIP losses, the
IF tasks' diffusion losses on frozen text states (stage II with noise-conditioning augmentation), and unCLIP's
prior and decoder losses on the frozen CLIP's cached embeddings."""

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
        return model.apply({"params": params}, x1[None], t1[None], *(None if a is None else a[None] for a in a1),
                           train=True, rngs={"dropout": k1})[0]

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


def _diffusion_loss(sched, model_fn, images, t, noise, prediction, learned_sigma, vlb_weight) -> tuple:
    """(loss, batch-mean metrics) of the diffusion training losses of model_fn(x_t, t)."""
    losses = diffusion_lib.training_losses(sched, model_fn, images, t, noise, prediction=prediction,
                                           learned_sigma=learned_sigma, vlb_weight=vlb_weight)
    metrics = {k: jnp.mean(v) for k, v in losses.items()}
    return metrics["loss"], metrics


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

        return _diffusion_loss(sched, model_fn, images, t, noise, prediction, learned_sigma, vlb_weight)

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


def low_res_input(images: jax.Array, low_res: int) -> tuple:
    """Stage II's conditioning image: (the low-resolution image [B, low_res, low_res, C], averaged over blocks
    of image_size / low_res pixels, and it upscaled back to the images' size [B, H, W, C] bilinearly with
    align_corners=True, as IF's stage-II pipeline upscales stage I's samples)."""
    from jaxdiff.models.layers import area_downsample, resize_bilinear_align_corners

    b, h, w, c = images.shape
    low = area_downsample(images, h // int(low_res))
    return low, resize_bilinear_align_corners(low, h, w)


def if_diffusion_loss_fn(resolved, model, sched, *, null_text=None) -> Callable:
    """The IF tasks' loss(params, images, cond, key, ids=None): the hybrid loss of the "diffusion" task
    (`gaussian.training_losses`) of a UNet2DConditionModel on cond["states"] (the frozen encoder's token
    states of each row's caption, `cond_spec`).

    Example i draws from fold_in(key, ids[i]): its timestep, noise, caption drop (with probability
    diffusion.p_uncond its states and mask become `null_text`'s, the empty caption's), dropout and, for
    "if_superres", its augmentation level s uniform in [0, superres.max_level) and the noise of
    x_low,s = q_sample(upscaled low-res image, s) (the same schedule). Stage II's network sees
    concat(x_t, x_low,s) on the channels and s (the original timestep) as its class label.
    """
    dcfg = resolved.diffusion
    p_uncond = float(dcfg.p_uncond)
    prediction, learned_sigma = dcfg.prediction, bool(dcfg.learned_sigma)
    vlb_weight = config_util.get(dcfg, "vlb_weight")
    superres = resolved.task == "if_superres"
    use_mask = bool(config_util.get(resolved.text_encoder, "attention_mask", False))
    if p_uncond > 0:
        if null_text is None:
            raise ValueError("the IF tasks' loss needs null_text (the empty caption's states) when p_uncond > 0")
        null_states = jnp.asarray(null_text["states"], jnp.float32)
        null_mask = jnp.asarray(null_text["mask"], bool)
    low_res = int(resolved.superres.low_res) if superres else 0
    max_level = int(resolved.superres.max_level) if superres else 0

    def loss_fn(params, images, cond, key, ids=None):
        k_t, k_noise, k_drop, k_dropout, k_level, k_aug = example_keys(key, _ids(images, ids), 6)
        t, noise = _t_and_noise(sched, images, k_t, k_noise)
        states, mask = cond["states"], cond["mask"]
        if p_uncond > 0:
            dropped = jax.vmap(lambda k: jax.random.bernoulli(k, p_uncond))(k_drop)
            states = jnp.where(dropped[:, None, None], null_states[None], states)
            mask = jnp.where(dropped[:, None], null_mask[None], mask)
        cond = {"states": states, "mask": mask}
        labels, x_low = None, None
        if superres:
            _, up = low_res_input(images, low_res)
            level = jax.vmap(lambda k: jax.random.randint(k, (), 0, max_level))(k_level)
            aug = jax.vmap(lambda k: jax.random.normal(k, up.shape[1:], up.dtype))(k_aug)
            x_low = diffusion_lib.q_sample(sched, up, level, aug)
            labels = sched.timestep_map[level]
        args = model_args(resolved.task, cond, labels, use_mask)

        def model_fn(xt, tt):
            x = xt if x_low is None else jnp.concatenate([xt, x_low.astype(xt.dtype)], axis=-1)
            return _apply(resolved, model, params, x, sched.timestep_map[tt], args, k_dropout).astype(jnp.float32)

        return _diffusion_loss(sched, model_fn, images, t, noise, prediction, learned_sigma, vlb_weight)

    return loss_fn


def _null_text(null_text, keys=("states", "mask")) -> dict:
    """The empty caption's cached outputs as constants of the step (`text_states.TextStates.null`)."""
    if null_text is None or any(k not in null_text for k in keys):
        raise ValueError(f"caption dropout needs null_text with {', '.join(keys)} (the empty caption's outputs)")
    return {k: jnp.asarray(null_text[k], bool if k == "mask" else jnp.float32) for k in keys}


def _drop_rows(cond: dict, null: dict, dropped: jax.Array) -> dict:
    """cond with the `dropped` rows' entries of `null` ([...] per row) put in place of theirs."""
    out = dict(cond)
    for k, v in null.items():
        out[k] = jnp.where(dropped.reshape((-1,) + (1,) * v.ndim), v[None], cond[k])
    return out


def _bernoulli(keys, p: float) -> jax.Array:
    return jax.vmap(lambda k: jax.random.bernoulli(k, p))(keys)


def unclip_prior_loss_fn(resolved, model, sched, *, null_text=None) -> Callable:
    """unCLIP's prior: loss(params, images, cond, key, ids=None) = MSE between the PriorTransformer's prediction
    and x_0, the clean CLIP image embedding cond["image_emb"] normalised by the prior's own (frozen) clip_mean /
    clip_std ((e - mean) / std: `post_process_latents` inverts it), from x_t = q_sample(x_0, t) at uniform t,
    the caption's text embedding (proj_embedding), token states and mask. Example i draws its t, noise and
    caption drop (probability diffusion.p_uncond: text embedding, states and mask become `null_text`'s, the
    empty caption's) from fold_in(key, ids[i]). The images are not read."""
    p_uncond = float(resolved.diffusion.p_uncond)
    null = _null_text(null_text, ("text_emb", "states", "mask")) if p_uncond > 0 else None

    def loss_fn(params, images, cond, key, ids=None):
        k_t, k_noise, k_drop = example_keys(key, _ids(images, ids), 3)
        mean, std = (jax.lax.stop_gradient(params[k]) for k in ("clip_mean", "clip_std"))
        x0 = (cond["image_emb"].astype(jnp.float32) - mean) / std
        t, noise = _t_and_noise(sched, x0, k_t, k_noise)
        if null is not None:
            cond = _drop_rows(cond, null, _bernoulli(k_drop, p_uncond))
        xt = diffusion_lib.q_sample(sched, x0, t, noise)
        pred = model.apply({"params": params}, xt, sched.timestep_map[t], *model_args(resolved.task, cond))
        mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - x0))
        return mse, {"loss": mse, "mse": mse}

    return loss_fn


def unclip_decoder_loss_fn(resolved, model, sched, *, null_text=None) -> Callable:
    """unCLIP's decoder (text_proj + U-Net, `models.UnCLIPDecoder`): the hybrid loss of the "diffusion" task
    (eps, learned-range variance) conditioned on the clean CLIP image embedding of the image (cond["image_emb"])
    and its caption's text embedding, token states and mask. Example i draws from fold_in(key, ids[i]) its t,
    noise, dropout, and two independent drops as DALL-E 2: with probability diffusion.p_uncond_image (0.1) its
    image embedding becomes text_proj's learned null embedding (the one diffusers' pipeline uses for the
    unconditional rows), with probability diffusion.p_uncond (0.5) its caption's outputs the empty caption's."""
    dcfg = resolved.diffusion
    p_text, p_image = float(dcfg.p_uncond), float(config_util.get(dcfg, "p_uncond_image", 0.0))
    null = _null_text(null_text, ("text_emb", "states", "mask")) if p_text > 0 else None
    prediction, learned_sigma = dcfg.prediction, bool(dcfg.learned_sigma)
    vlb_weight = config_util.get(dcfg, "vlb_weight")

    def loss_fn(params, images, cond, key, ids=None):
        k_t, k_noise, k_text, k_image, k_dropout = example_keys(key, _ids(images, ids), 5)
        t, noise = _t_and_noise(sched, images, k_t, k_noise)
        if null is not None:
            cond = _drop_rows(cond, null, _bernoulli(k_text, p_text))
        if p_image > 0:
            learned = params["text_proj"]["learned_classifier_free_guidance_embeddings"]
            cond = dict(cond, image_emb=jnp.where(_bernoulli(k_image, p_image)[:, None], learned[None],
                                                  cond["image_emb"]))
        args = model_args(resolved.task, cond)

        def model_fn(xt, tt):
            return _apply(resolved, model, params, xt, sched.timestep_map[tt], args, k_dropout).astype(jnp.float32)

        return _diffusion_loss(sched, model_fn, images, t, noise, prediction, learned_sigma, vlb_weight)

    return loss_fn


LOSSES = {"diffusion": diffusion_loss_fn, "text2im": diffusion_loss_fn, "classifier": classifier_loss_fn,
          "clip": clip_loss_fn, "if_text2im": if_diffusion_loss_fn, "if_superres": if_diffusion_loss_fn,
          "unclip_prior": unclip_prior_loss_fn, "unclip_decoder": unclip_decoder_loss_fn}
