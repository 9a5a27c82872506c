"""Class-conditional diffusion model on the 8x8 digits (one model for classifier-free guidance).

    python train.py --config configs/digits.py --workdir W

Sized to train on 2 CPU cores in about 10 minutes; CFG samples (s = 3, DDIM 50) are then
classified as their requested class >= 90 % of the time by configs/digits_eval_classifier.py.
"""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("diffusion")
    # the digits, ADM's U-Net at 32 channels, cosine schedule, learned sigma, labels dropped 10 %, DDIM-50
    # grids at CFG s = 3: the task defaults (jaxdiff.train.config.default_config) except these
    c.model.update(model_channels=32, num_res_blocks=1)
    c.train.update(steps=800, lr=2e-3, checkpoint_every=200, sample_every=400)
    return c
