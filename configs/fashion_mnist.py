"""Class-conditional diffusion model on Fashion-MNIST (28x28x1, padded to 32; random flips)."""

from jaxdiff.training import default_config


def get_config():
    c = default_config("diffusion")
    c.data.name = "fashion_mnist"
    c.data.image_size = 32  # padded 28 -> 32 (jaxdiff.data's default for MNIST-like sets)
    c.model.update(model_channels=64, num_res_blocks=2, attention_resolutions=(4,), channel_mult=(1, 2, 2),
                   num_head_channels=32, dropout=0.1, use_scale_shift_norm=True, resblock_updown=True)
    c.diffusion.update(schedule="cosine", num_timesteps=1000, prediction="eps", learned_sigma=True,
                       p_uncond=0.1)
    c.train.update(batch_size=128, steps=50000, lr=2e-4, warmup_steps=500, weight_decay=0.0,
                   grad_clip=1.0, ema_decay=0.9999, log_every=100, checkpoint_every=2500, keep=3,
                   sample_every=5000)
    return c
