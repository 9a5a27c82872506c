"""Guidance sweep on the Fashion-MNIST models (the main job's last stage; see scripts/main.sh).

Scales: classifier guidance in guided-diffusion's convention (0 = none); CFG in the Imagen
convention (1 = plain conditional, 0 = unconditional). The "none" row is plain conditional
sampling, shared as the starting point of both curves.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "runs/fashion_mnist/model"
    c.classifier = "runs/fashion_mnist/classifier"
    c.eval_classifier = "runs/fashion_mnist/eval_classifier"
    c.out = "reports/fashion_mnist"
    c.cache_dir = ""            # reference statistics cache ("" = under the tfds data_dir)
    c.reference_split = "train"
    c.sampler = "ddpm"          # ancestral: the sampler Dhariwal & Nichol guide with a classifier
    c.steps = (50,)             # one curve per step count
    c.eta = 0.0
    c.classifier_scales = (0.25, 1.0, 4.0)
    c.cfg_scales = (0.0, 1.5, 3.0, 5.0)
    c.num_samples = 400
    c.batch_size = 200
    c.seed = 0
    c.k = 3
    c.progress = False
    c.grid_max = 50
    return c
