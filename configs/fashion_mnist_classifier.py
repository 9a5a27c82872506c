"""Noisy classifier on Fashion-MNIST (ADM recipe) for classifier guidance, sized for 2 CPU cores."""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("classifier")
    c.data.name = "fashion_mnist"
    c.data.image_size = 32
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(4,), channel_mult=(1, 2, 2),
                   num_head_channels=32, dropout=0.0, use_scale_shift_norm=True, resblock_updown=True,
                   pool="attention")
    c.diffusion.update(schedule="cosine", num_timesteps=1000)  # must match the diffusion model's
    c.train.update(batch_size=64, steps=500, lr=1e-3, warmup_steps=50, lr_schedule="linear",
                   weight_decay=0.05, grad_clip=1.0, ema_decay=0.99, noised=True, log_every=50,
                   checkpoint_every=250, keep=2, sample_every=500)
    return c
