"""Class-conditional diffusion model on Fashion-MNIST (28x28x1, padded to 32), sized for 2 CPU cores.

    python train.py --config configs/fashion_mnist.py --workdir W

A small ADM U-Net (32/64/64 channels, one res block per level, attention at 8x8 only) trained for
400 steps of 32 images: 10-13 minutes here. An under-trained model, sized so the whole main job
completes on 2 CPU cores; for a real model raise model_channels, num_res_blocks and steps, e.g.
`--config.model.model_channels=128 --config.train.steps=50000`.
"""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("diffusion")
    c.data.name = "fashion_mnist"
    c.data.image_size = 32  # padded 28 -> 32 (jaxdiff.data's default for MNIST-like sets)
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(4,), channel_mult=(1, 2, 2))
    c.train.update(batch_size=32, steps=400, lr=2e-3, ema_decay=0.995, checkpoint_every=200, sample_every=400)
    return c
