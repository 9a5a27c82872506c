"""A tiny class-conditional ADM U-Net (8x8, CFG-capable) for sampler/parallel/CLI tests.

Parameters come from a seeded numpy RNG over `jax.eval_shape(init)` shapes: identical in every
process, and nothing is compiled to make them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 3
UNET_FLAGS = dict(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                  attention_resolutions=(), channel_mult=(1,), num_classes=NUM_CLASSES, num_head_channels=32,
                  use_scale_shift_norm=True, null_label=True)
CLASSIFIER_FLAGS = dict(image_size=8, in_channels=3, model_channels=32, out_channels=NUM_CLASSES,
                        num_res_blocks=1, attention_resolutions=(), channel_mult=(1,), pool="adaptive")


def random_params(module, *args, seed=0, scale=0.05):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * scale + (1.0 if s.shape == () else 0.0), s.dtype), shapes)


def unet(seed=0, **overrides):
    from jaxdiff.models import create_model

    flags = dict(UNET_FLAGS, **overrides)
    m = create_model("unet", **flags)
    s = flags["image_size"]
    x = jnp.zeros((1, s, s, flags["in_channels"]))
    y = jnp.zeros((1,), jnp.int32) if flags.get("num_classes") is not None else None
    return m, random_params(m, x, jnp.zeros((1,), jnp.int32), y, seed=seed)


def classifier(seed=1, **overrides):
    from jaxdiff.models import create_model

    flags = dict(CLASSIFIER_FLAGS, **overrides)
    m = create_model("classifier", **flags)
    s = flags["image_size"]
    return m, random_params(m, jnp.zeros((1, s, s, flags["in_channels"])), jnp.zeros((1,), jnp.int32), seed=seed)


def unet_config(**overrides):
    """A load_model-style config for `unet()` (diffusion: cosine 100 steps, eps, learned sigma)."""
    return {"model": dict(UNET_FLAGS, kind="unet", **overrides),
            "diffusion": dict(schedule="cosine", num_timesteps=100, prediction="eps", learned_sigma=True)}


def classifier_config(**overrides):
    return {"model": dict(CLASSIFIER_FLAGS, kind="classifier", **overrides),
            "diffusion": dict(schedule="cosine", num_timesteps=100)}


def sample_sharded(ids_batches, devices=None, seed=0):
    """Samples of ids (any batching) with CFG + DDPM over a ('data',) mesh of `devices`."""
    from jaxdiff import parallel
    from jaxdiff.diffusion import guidance, guides
    from jaxdiff.diffusion import samplers as S
    from jaxdiff.diffusion.schedules import make_schedule

    m, p = unet()
    sched = make_schedule("cosine", 100, "4")

    def build(params):
        return guidance.build_guides("cfg", guides.unet_fn(m, params), null_label=NUM_CLASSES, learned_sigma=True)

    run = S.make_sampler(build, S.SamplerSpec("ddpm", learned_sigma=True), (8, 8, 3))
    mesh = parallel.data_mesh(devices)
    outs = []
    for ids in ids_batches:
        ids = np.asarray(ids)
        cond = guides.make_cond(len(ids), ids % NUM_CLASSES, cfg_scale=2.0 + 0.1 * (ids % 4))
        outs.append(parallel.sample_batch_sharded(run, p, sched, cond, jax.random.key(seed), ids, mesh=mesh))
    return np.concatenate(outs, axis=0)
