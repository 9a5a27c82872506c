"""Classifier on clean 8x8 digits (t = 0, no noise), used to score generated samples."""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("classifier")
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(), dropout=0.1, pool="adaptive")
    c.train.update(steps=600, lr=2e-3, warmup_steps=50, lr_schedule="linear", weight_decay=0.05, ema_decay=0.99,
                   noised=False, checkpoint_every=300, keep=2, sample_every=300)
    return c
