"""Conditioning diffusers' UNet2DConditionModel inside the sampler, as DeepFloyd IF's pipelines do: text
states looked up in a table of prompts, and the super-resolution input (the low-resolution image upsampled
bilinearly with aligned corners, then noised to a chosen level of a noising schedule).

    prepare = text_prepare(module, params, states)       # states [P + 1, L, D]: P prompts, then the empty caption
    model_fn = text_unet_fn(module, params)              # the U-Net on cond[TEXT_KEY], made by text_prepare
    uncond = text_uncond                                 # CFG's unconditional input: the empty caption's
    prepare = noise_augment(noising_alphas_cumprod, (H, W))  # super-resolution: cond["low_res"] -> LOW_RES_INPUT

The table travels with the parameters (an argument of the compiled sampler); `cond` carries per sample:
  PROMPT_KEY ("prompt", int [B]): the row of `states`; `text_prepare` turns the rows and the empty caption into
  what the U-Net computes from text alone (its text conditioning: the keys and values of the text tokens in
  every attention layer), once per sampling call instead of once per step;
  for a super-resolution stage LOW_RES_KEY ("low_res": [B, h, w, C] uint8 samples or [-1, 1] floats),
  NOISE_LEVEL_KEY ("noise_level", int [B]: the augmentation timestep, also the model's class label) and
  LOW_RES_NOISE_KEY (the augmentation noise [B, H, W, C], drawn per sample outside the compiled loop:
  `jaxdiff.sample.cascade` draws it sample by sample, so its bits never depend on the batch or devices).
The model sees [x_t, noised upsampled image] along channels and class_labels = the noise level, and its
encoder_hidden_states without an attention mask (IF passes none).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.guides import LOW_RES_KEY, Cond, ModelFn, with_shared_input
from jaxdiff.models.unet2d_condition import text_conditioning

PROMPT_KEY = "prompt"


NOISE_LEVEL_KEY = "noise_level"


LOW_RES_NOISE_KEY = "low_res_noise"


LOW_RES_INPUT = "low_res_input"


TEXT_KEY = "text_conditioning"


NULL_TEXT_KEY = "text_conditioning_null"


def _taps(n_in: int, n_out: int) -> tuple:
    """(i0, i1, w0, w1) of 1-D linear interpolation with aligned corners (PyTorch's align_corners=True: output
    i samples input position i * (n_in - 1) / (n_out - 1)), the weights as torch computes them in float32."""
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0.0)
    src = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def upsample_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of NHWC images to `size` = (H, W) with aligned corners (torch's
    F.interpolate(mode="bilinear", align_corners=True)): along W, then along H, each output a weighted sum
    of its two neighbours with torch's float32 weights."""
    x = jnp.asarray(x, jnp.float32)
    h0, h1, hw0, hw1 = _taps(x.shape[1], int(size[0]))
    w0, w1, ww0, ww1 = _taps(x.shape[2], int(size[1]))
    col = lambda a: a.reshape((1, 1, -1, 1))
    x = x[:, :, w0] * col(ww0) + x[:, :, w1] * col(ww1)
    row = lambda a: a.reshape((1, -1, 1, 1))
    return x[:, h0] * row(hw0) + x[:, h1] * row(hw1)


def to_signed(images: jax.Array) -> jax.Array:
    """uint8 samples -> [-1, 1] (x / 127.5 - 1, as guided-diffusion's super-resolution does); floats as given."""
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


def noise_augment(alphas_cumprod, size: Sequence[int]) -> Callable[[Cond], Cond]:
    """prepare(cond) of a super-resolution stage: cond[LOW_RES_KEY] upsampled to `size`, then noised to
    cond[NOISE_LEVEL_KEY] of the noising schedule `alphas_cumprod` (the forward process q(x_t | x_0), as
    diffusers' `add_noise`) with the noise cond[LOW_RES_NOISE_KEY], into cond[LOW_RES_INPUT]. The inputs
    it used are removed from the cond."""
    abar = np.asarray(alphas_cumprod, np.float64)
    sqrt_abar = jnp.asarray(np.sqrt(abar), jnp.float32)
    sqrt_one_minus = jnp.asarray(np.sqrt(1.0 - abar), jnp.float32)
    size = (int(size[0]), int(size[1]))

    def prepare(cond):
        up = upsample_bilinear(to_signed(cond[LOW_RES_KEY]), size)
        if LOW_RES_NOISE_KEY not in cond:
            raise KeyError(f"noise augmentation needs its noise in cond[{LOW_RES_NOISE_KEY!r}] [B, H, W, C]")
        noise = jnp.asarray(cond[LOW_RES_NOISE_KEY], jnp.float32)
        level = jnp.asarray(cond[NOISE_LEVEL_KEY], jnp.int32)
        a = sqrt_abar[level].reshape((-1, 1, 1, 1))
        b = sqrt_one_minus[level].reshape((-1, 1, 1, 1))
        out = {k: v for k, v in cond.items() if k not in (LOW_RES_KEY, LOW_RES_NOISE_KEY)}
        out[LOW_RES_INPUT] = a * up + b * noise
        return out

    return prepare


def text_prepare(module, params, states: jax.Array, null_row: int = -1) -> Callable[[Cond], Cond]:
    """prepare(cond) of a diffusers UNet2DConditionModel (`jaxdiff.models.unet2d_condition`) on text states,
    run once per sampling call: the network's text conditioning (`unet2d_condition.text_conditioning`: what it
    computes from the states alone, every attention layer's keys and values of the text tokens) of the rows
    cond[PROMPT_KEY] of `states` into cond[TEXT_KEY], and of row `null_row` (the empty caption; default the
    table's last) into cond[NULL_TEXT_KEY], for classifier-free guidance's unconditional branch (`text_uncond`).
    """
    def prepare(cond):
        rows = jnp.asarray(cond[PROMPT_KEY], jnp.int32)
        table = jnp.asarray(states)
        out = dict(cond)
        out[TEXT_KEY] = text_conditioning(module, params, jnp.take(table, rows, axis=0))
        null = text_conditioning(module, params, table[int(null_row)][None])
        out[NULL_TEXT_KEY] = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, rows.shape + a.shape[1:]), null)
        return out

    return prepare


def text_uncond(cond: Cond) -> Cond:
    """Classifier-free guidance's unconditional cond of `text_unet_fn`: the empty caption's text conditioning."""
    return {**cond, TEXT_KEY: cond[NULL_TEXT_KEY]}


def text_unet_fn(module, params) -> ModelFn:
    """model_fn of a diffusers UNet2DConditionModel on its text conditioning cond[TEXT_KEY] (`text_prepare`); with
    cond[LOW_RES_INPUT] (a super-resolution stage) the model sees [x, that image] along channels and, when it
    has a class embedding, class_labels = cond[NOISE_LEVEL_KEY]. Offers CFG's shared-input form."""
    labelled = getattr(getattr(module, "config", None), "class_embed_type", None) is not None

    def apply(x, t, cond, shared_rows=1):
        labels = None
        if LOW_RES_INPUT in cond:  # part of the input: CFG's branches share it (their first rows are x's)
            x = jnp.concatenate([x, cond[LOW_RES_INPUT][:x.shape[0]].astype(x.dtype)], axis=-1)
            if labelled:
                labels = cond[NOISE_LEVEL_KEY]
        return module.apply({"params": params}, x, t, cond[TEXT_KEY], class_labels=labels, shared_rows=shared_rows)

    return with_shared_input(apply, lambda x, t, cond: apply(x, t, cond, 2))


__all__ = ["LOW_RES_INPUT", "LOW_RES_NOISE_KEY", "NOISE_LEVEL_KEY", "NULL_TEXT_KEY", "PROMPT_KEY", "TEXT_KEY",
           "noise_augment", "text_prepare", "text_uncond", "text_unet_fn", "to_signed", "upsample_bilinear"]
