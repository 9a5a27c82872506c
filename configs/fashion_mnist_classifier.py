"""Noisy classifier on Fashion-MNIST (ADM recipe) for classifier guidance, sized for 2 CPU cores."""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("classifier")
    c.data.name = "fashion_mnist"
    c.data.image_size = 32
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(4,), channel_mult=(1, 2, 2))
    c.train.update(steps=500, warmup_steps=50, lr_schedule="linear", weight_decay=0.05, ema_decay=0.99,
                   checkpoint_every=250, keep=2, sample_every=500)
    return c
