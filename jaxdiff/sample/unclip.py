"""unCLIP's (Karlo's, DALL-E 2's) sampling as pure, jitted pieces, each stage one `lax.scan`
(`samplers.make_sampler`, sampler "unclip": diffusers' UnCLIPScheduler). `sample.py --config.pipeline=unclip`
runs them (`jaxdiff.sample.unclip_run`, docs/unclip.md).

    text = TextTable(embeds, states, mask)     # CLIP text outputs of P prompts, then the empty caption (row P)
    prior_fn, sched = prior_sampler(prior, cfg, P, steps)             # -> image embeddings (before post-processing)
    post_process(prior_params, x)                                      # x * clip_std + clip_mean
    decoder_fn, sched = decoder_sampler(text_proj, decoder, cfg, P, steps)
    super_res_fn, sched = super_res_sampler(first, last, cfg, steps)

Every sampler is called as make_sampler's: fn(params, sched, cond, key, sample_ids[, eta, x_T, noises]) with
  prior:      params {"model": prior, "text": text};       cond {PROMPT_KEY rows, CFG_SCALE}
  decoder:    params {"model": decoder, "text_proj": text_proj, "text": text};
              cond {PROMPT_KEY rows, IMAGE_EMBED_KEY [B, D], CFG_SCALE}
  super-res:  params {"first": unet, "last": unet};     cond {LOW_RES_KEY: decoder images, uint8 or [-1, 1]}
Without x_T / noises the noise comes from fold_in(key, sample id) (batch- and device-independent); recorded
noises replay a trajectory (the tests replay diffusers').

What each stage does (diffusers' UnCLIPPipeline):
  - prior: classifier-free guidance on the CLIP text embedding + token states + mask, the empty caption's as the
    unconditional input; predicts x0 ("sample"), clipped to [-5, 5], fixed small variance; then
    post_process_latents;
  - decoder: UnCLIPTextProjModel turns (image embedding, text embedding, token states) into extra context tokens
    and an additive time embedding; CFG with the learned null image embedding and the empty caption as the
    unconditional branch (eps guided, the variance channels the conditional branch's); attention mask
    [True x clip_extra_context_tokens, text mask]; eps, learned-range variance, x0 clipped to [-1, 1];
  - super-resolution: the decoder's image upsampled bicubically with antialiasing (torch's
    F.interpolate(mode="bicubic", align_corners=False, antialias=True), as the pipeline does on CPU/GPU),
    concatenated to x_t; super_res_first at every step but the last, super_res_last at the last (t = 0); eps,
    fixed small variance, no guidance.
Image variations (UnCLIPImageVariationPipeline): no prior; the decoder conditions on given image embeddings with
the empty caption on both branches (rows = P).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import guidance, guides, samplers
from jaxdiff.diffusion.conditioning import LOW_RES_INPUT, PROMPT_KEY, to_signed
from jaxdiff.diffusion.schedules import make_schedule

NUM_TIMESTEPS = 1000        # Karlo's schedulers: cosine ("squaredcos_cap_v2") over 1000 steps
SCHEDULE = "cosine"
SAMPLER = "unclip"
PRIOR_CLIP_RANGE = 5.0      # Karlo's prior scheduler: clip_sample_range 5
IMAGE_EMBED_KEY = "image_embed"


class TextTable(NamedTuple):
    """CLIP text outputs of P prompts then the empty caption (row P): embeds [P+1, D] (projected pooled),
    states [P+1, L, D] (last_hidden_state), mask [P+1, L] (True on real tokens)."""

    embeds: Any
    states: Any
    mask: Any


def _rows(table, cond):
    r = jnp.asarray(cond[PROMPT_KEY], jnp.int32)
    return (jnp.take(jnp.asarray(table[0]), r, axis=0), jnp.take(jnp.asarray(table[1]), r, axis=0),
            jnp.take(jnp.asarray(table[2]), r, axis=0))


def prior_model_fn(module, params, text) -> guides.ModelFn:
    """model_fn of the PriorTransformer on rows cond[PROMPT_KEY] of the text table."""
    def model_fn(x, t, cond):
        embeds, states, mask = _rows(text, cond)
        return module.apply({"params": params}, x, t, embeds, states, mask)

    return model_fn


TEXT_PROJ_KEYS = ("decoder_text", "decoder_temb", "decoder_mask")          # the projected conditioning
NULL_KEYS = tuple(f"{k}_null" for k in TEXT_PROJ_KEYS)                      # ... of CFG's unconditional branch


def decoder_prepare(text_proj, tp_params, decoder, params, text, num_prompts: int):
    """prepare(cond) of the decoder, run once per sampling call (the text projection depends on no step, as
    diffusers' UnCLIPPipeline computes it before its loop): UnCLIPTextProjModel on cond[IMAGE_EMBED_KEY] and the
    text rows cond[PROMPT_KEY] -> cond[TEXT_PROJ_KEYS]: the decoder U-Net's text conditioning of the hidden states
    (the extra tokens, then the projected states; `unet2d_condition.text_conditioning`, also hoisted out of the
    loop), the additive time embedding and the attention mask (the extra tokens, then the text mask); and the same
    for the unconditional branch (the learned null image embedding, the empty caption: row `num_prompts` of the
    table) -> cond[NULL_KEYS]. `params`: the decoder U-Net's."""
    from jaxdiff.models.unclip_text_proj import decoder_attention_mask, null_image_embedding
    from jaxdiff.models.unet2d_condition import text_conditioning

    n_extra = text_proj.config.clip_extra_context_tokens

    def project(image, rows):
        embeds, states, mask = _rows(text, {PROMPT_KEY: rows})
        hidden, temb = text_proj.apply({"params": tp_params}, image, embeds, states)
        return text_conditioning(decoder, params, hidden), temb, decoder_attention_mask(mask, n_extra)

    def prepare(cond):
        img, rows = cond[IMAGE_EMBED_KEY], jnp.asarray(cond[PROMPT_KEY], jnp.int32)
        null = jnp.broadcast_to(jnp.asarray(null_image_embedding(tp_params), img.dtype), img.shape)
        out = dict(cond)
        out.update(zip(TEXT_PROJ_KEYS, project(img, rows)))
        out.update(zip(NULL_KEYS, project(null, jnp.full_like(rows, num_prompts))))
        return out

    return prepare


def decoder_model_fn(decoder, params) -> guides.ModelFn:
    """model_fn of the decoder U-Net on the projected conditioning cond[TEXT_PROJ_KEYS] (`decoder_prepare`), with
    CFG's shared-input form (`guides.with_shared_input`)."""
    def apply(x, t, cond, shared_rows=1):
        text, temb, mask = (cond[k] for k in TEXT_PROJ_KEYS)
        return decoder.apply({"params": params}, x, t, text, class_labels=temb, attention_mask=mask,
                             shared_rows=shared_rows)

    return guides.with_shared_input(apply, lambda x, t, cond: apply(x, t, cond, 2))


def decoder_uncond(cond):
    """CFG's unconditional cond of the decoder: the projection of the null image embedding and the empty
    caption (`decoder_prepare`'s NULL_KEYS)."""
    return {**cond, **{k: cond[n] for k, n in zip(TEXT_PROJ_KEYS, NULL_KEYS)}}


def upsample_bicubic(x: jax.Array, size) -> jax.Array:
    """NHWC images resized to `size` (H, W) bicubically (a = -0.5) with antialiasing, half-pixel centres: torch's
    F.interpolate(mode="bicubic", align_corners=False, antialias=True) to float32 rounding."""
    x = jnp.asarray(x, jnp.float32)
    return jax.image.resize(x, (x.shape[0], int(size[0]), int(size[1]), x.shape[3]), "cubic", antialias=True,
                            precision=jax.lax.Precision.HIGHEST)


def super_res_model_fn(first, last, p_first, p_last) -> guides.ModelFn:
    """model_fn of the two upsamplers on [x_t, cond[LOW_RES_INPUT]]: `last` at t = 0 (the final step), else
    `first` (one network runs per step: lax.cond)."""
    def model_fn(x, t, cond):
        h = jnp.concatenate([x, cond[LOW_RES_INPUT].astype(x.dtype)], axis=-1)
        return jax.lax.cond(t[0] == 0, lambda h: last.apply({"params": p_last}, h, t).astype(jnp.float32),
                            lambda h: first.apply({"params": p_first}, h, t).astype(jnp.float32), h)

    return model_fn


def super_res_prepare(size):
    """prepare(cond): cond[LOW_RES_KEY] (uint8 samples or [-1, 1] floats) upsampled into cond[LOW_RES_INPUT]."""
    def prepare(cond):
        out = {k: v for k, v in cond.items() if k != guides.LOW_RES_KEY}
        out[LOW_RES_INPUT] = upsample_bicubic(to_signed(cond[guides.LOW_RES_KEY]), size)
        return out

    return prepare


def unclip_schedule(steps: int):
    """The respaced schedule of diffusers' UnCLIPScheduler for `steps` steps (timesteps 999 .. 0)."""
    return make_schedule(SCHEDULE, NUM_TIMESTEPS, samplers.SAMPLERS[SAMPLER].respacing(int(steps)))


def prior_compiler_options() -> dict:
    """The prior's XLA options: on the CPU, YNNPACK for its products and reductions only (a small program
    without convolutions, `util.cpu.compiler_options(elementwise=False)`)."""
    from jaxdiff.util import cpu

    return cpu.compiler_options(elementwise=False)


def prior_sampler(module, num_prompts: int, steps: int, compiler_options: Optional[dict] = None):
    """(sampler_fn, sched) of the prior (module doc); returns image embeddings before `post_process`.
    `compiler_options` default: `prior_compiler_options()`."""
    def build(p):
        return guidance.build_guides("cfg", prior_model_fn(module, p["model"], p["text"]),
                                     uncond=guides.label_dropout(num_prompts, PROMPT_KEY))

    spec = samplers.SamplerSpec(sampler=SAMPLER, prediction="x0", fixed_variance="small", clip_denoised=True,
                                clip_range=PRIOR_CLIP_RANGE)
    if compiler_options is None:
        compiler_options = prior_compiler_options()
    fn = samplers.make_sampler(build, spec, (module.config.embedding_dim,), compiler_options)
    return fn, unclip_schedule(steps)


def post_process(prior_params, x) -> np.ndarray:
    """The prior's post_process_latents on the host: x * clip_std + clip_mean, float32."""
    p = prior_params.get("params", prior_params)
    return (np.asarray(x, np.float32) * np.asarray(p["clip_std"], np.float32)
            + np.asarray(p["clip_mean"], np.float32)).astype(np.float32)


def decoder_sampler(text_proj, decoder, num_prompts: int, steps: int, compiler_options: Optional[dict] = None):
    """(sampler_fn, sched) of the decoder (module doc); returns images in [-1, 1], NHWC."""
    cfg = decoder.config
    channels = cfg.in_channels
    learned = cfg.out_channels == 2 * channels

    def build(p):
        return guidance.build_guides("cfg", decoder_model_fn(decoder, p["model"]), uncond=decoder_uncond,
                                     learned_sigma=learned,
                                     prepare=decoder_prepare(text_proj, p["text_proj"], decoder, p["model"], p["text"],
                                                             num_prompts))

    spec = samplers.SamplerSpec(sampler=SAMPLER, prediction="eps", learned_sigma=learned, fixed_variance="small",
                                clip_denoised=True)
    fn = samplers.make_sampler(build, spec, (cfg.sample_size, cfg.sample_size, channels), compiler_options)
    return fn, unclip_schedule(steps)


def super_res_sampler(first, last, steps: int, compiler_options: Optional[dict] = None):
    """(sampler_fn, sched) of the two upsamplers (module doc); returns images in [-1, 1], NHWC."""
    cfg = first.config
    size = (cfg.sample_size, cfg.sample_size)

    def build(p):
        return guidance.Guided(super_res_model_fn(first, last, p["first"], p["last"]), None,
                               super_res_prepare(size))

    spec = samplers.SamplerSpec(sampler=SAMPLER, prediction="eps", fixed_variance="small", clip_denoised=True)
    fn = samplers.make_sampler(build, spec, (cfg.sample_size, cfg.sample_size, cfg.in_channels // 2),
                               compiler_options)
    return fn, unclip_schedule(steps)


__all__ = ["IMAGE_EMBED_KEY", "NULL_KEYS", "TEXT_PROJ_KEYS", "TextTable", "decoder_model_fn", "decoder_prepare",
           "decoder_sampler", "decoder_uncond", "post_process",
           "prior_compiler_options", "prior_model_fn", "prior_sampler", "super_res_model_fn", "super_res_prepare", "super_res_sampler",
           "unclip_schedule", "upsample_bicubic"]
