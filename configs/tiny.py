"""Tiny diffusion config for tests: a one-level 32-channel U-Net on the 8x8 digits."""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("diffusion")
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(), channel_mult=(1,),
                   num_head_channels=32, resblock_updown=False)
    c.diffusion.num_timesteps = 100
    c.train.update(batch_size=16, steps=20, lr=1e-3, warmup_steps=5, log_every=5, checkpoint_every=10,
                   keep=2, sample_every=0)
    c.sample.update(steps=5, per_class=2)
    return c
