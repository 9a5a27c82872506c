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
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(4,), channel_mult=(1, 2, 2),
                   num_head_channels=32, dropout=0.0, use_scale_shift_norm=True, resblock_updown=True)
    c.diffusion.update(schedule="cosine", num_timesteps=1000, prediction="eps", learned_sigma=True,
                       p_uncond=0.1)
    c.train.update(batch_size=32, steps=400, lr=2e-3, warmup_steps=100, lr_schedule="constant",
                   weight_decay=0.0, grad_clip=1.0, ema_decay=0.995, log_every=50, checkpoint_every=200,
                   keep=3, sample_every=400)
    c.sample.update(sampler="ddim", steps=50, guidance_scale=3.0, per_class=8)
    return c
