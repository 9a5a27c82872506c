"""Guidance sweep on the Fashion-MNIST models (the main job's last stage; see scripts/main.sh).

Scales: classifier guidance in guided-diffusion's convention (0 = none); CFG in the Imagen
convention (1 = plain conditional, 0 = unconditional). The "none" row is plain conditional
sampling, shared as the starting point of both curves.
"""

from jaxdiff.eval.sweep import default_config


def get_config():
    c = default_config("fashion_mnist")
    # sized for 2 CPU cores (32x32 samples cost ~10x the digits' 8x8): fewer settings and samples
    c.steps = (25,)
    c.classifier_scales = (1.0, 4.0)
    c.cfg_scales = (0.0, 1.5, 3.0)
    c.num_samples = 200
    c.batch_size = 100
    return c
