"""jaxdiff: guided diffusion in JAX/Flax, written as pure functions.

The public surface (see the README's quickstart):

    load_model(directory, dtype=None) -> (module, params, config)   a train.py workdir or a converted checkpoint
    make_schedule(name, num_timesteps, respacing)                    noise schedule, respaced ("50", "ddim25", ...)
    unet_fn(module, params), logits_fn(module, params)               networks as guidance functions
    build_guides(names, model_fn, ...) -> (model_fn, cond_fn)        guides from the registry ("cfg", "classifier", ...)
    register_guide(Guide(...)), register_log_density(name, fn)      add a guide
    SamplerSpec, make_sampler(build, spec, shape)                    a compiled sampling loop (DDPM, DDIM, DPM-Solver++)
    register_sampler(Sampler(...))                                   add a sampler
    generate(sampler, params, sched, num_samples=..., ...)           uint8 images, over every device of every host
    evaluate(images, labels, classifier=...)                         FID, IS, precision/recall, accuracy

Names are imported on first use, so `import jaxdiff` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "jaxdiff.checkpoints",
    "make_schedule": "jaxdiff.diffusion.schedules",
    "unet_fn": "jaxdiff.diffusion.guides",
    "logits_fn": "jaxdiff.diffusion.guides",
    "build_guides": "jaxdiff.diffusion.guidance",
    "Guide": "jaxdiff.diffusion.guidance",
    "register_guide": "jaxdiff.diffusion.guidance",
    "register_log_density": "jaxdiff.diffusion.guidance",
    "SamplerSpec": "jaxdiff.diffusion.samplers",
    "Sampler": "jaxdiff.diffusion.samplers",
    "make_sampler": "jaxdiff.diffusion.samplers",
    "register_sampler": "jaxdiff.diffusion.samplers",
    "generate": "jaxdiff.sample.generation",
    "evaluate": "jaxdiff.eval.evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
