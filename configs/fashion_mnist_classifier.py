"""Noisy classifier on Fashion-MNIST (ADM recipe) for classifier guidance."""

from jaxdiff.training import default_config


def get_config():
    c = default_config("classifier")
    c.data.name = "fashion_mnist"
    c.data.image_size = 32
    c.model.update(model_channels=64, num_res_blocks=2, attention_resolutions=(2, 4), channel_mult=(1, 2, 2),
                   num_head_channels=32, dropout=0.0, use_scale_shift_norm=True, resblock_updown=True,
                   pool="attention")
    c.diffusion.update(schedule="cosine", num_timesteps=1000)
    c.train.update(batch_size=128, steps=20000, lr=3e-4, warmup_steps=500, lr_schedule="linear",
                   weight_decay=0.05, grad_clip=1.0, ema_decay=0.999, noised=True, log_every=100,
                   checkpoint_every=2500, keep=3, sample_every=2500)
    return c
