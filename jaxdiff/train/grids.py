"""Training grids: CFG samples of a few classes, drawn every `train.sample_every` steps."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jaxdiff.data import captions
from jaxdiff.diffusion import guidance, guides, samplers, schedules
from jaxdiff.sample import generation, runner
from jaxdiff.util import config as config_util


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
    names = ("cfg",) if null else ()

    def build(params):
        if text:
            return guidance.build_guides(names, guides.unet_fn(model, params), uncond=guides.caption_dropout,
                                         learned_sigma=learned_sigma, prepare=guides.text_encoder(model, params))
        return guidance.build_guides(names, guides.unet_fn(model, params),
                                     null_label=num_classes if null else None, learned_sigma=learned_sigma)

    s = int(resolved.data.image_size)
    run = samplers.make_sampler(build, samplers.SamplerSpec(sampler=kind, prediction=dcfg.prediction,
                                                            learned_sigma=learned_sigma),
                                (s, s, int(resolved.data.channels)))
    scales = {guides.CFG_SCALE: float(config_util.get(scfg, "guidance_scale", 3.0))} if null else {}
    labels = np.repeat(grid_classes(num_classes, int(config_util.get(scfg, "grid_classes", 16))), per_class)
    n = len(labels)
    total = -(-n // jax.device_count()) * jax.device_count()
    padded = np.concatenate([labels, np.full(total - n, labels[-1])])
    kwargs = dict(labels=padded)
    if text:
        scheme = captions.scheme(resolved.data.name)
        words = [captions.class_caption(scheme, int(y)) for y in padded]
        kwargs = dict(per_sample=runner.caption_inputs({}, resolved, {}, (), words, total))

    def fn(params):
        images = generation.generate(run, params, sched, num_samples=total, scales=scales,
                                   seed=int(config_util.get(scfg, "seed", 0)), batch_size=total, **kwargs)
        return images[:n], labels

    return fn
