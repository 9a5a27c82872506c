"""Class-conditional diffusion model on the 8x8 digits (one model for classifier-free guidance).

    python train.py --config configs/digits.py --workdir W

Sized to train on 2 CPU cores in about 10 minutes; CFG samples (s = 3, DDIM 50) are then
classified as their requested class >= 90 % of the time by configs/digits_eval_classifier.py.
"""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("diffusion")
    c.data.name = "digits"
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                   num_head_channels=32, dropout=0.0, use_scale_shift_norm=True, resblock_updown=True)
    c.diffusion.update(schedule="cosine", num_timesteps=1000, prediction="eps", learned_sigma=True,
                       p_uncond=0.1)
    c.train.update(batch_size=64, steps=800, lr=2e-3, warmup_steps=100, lr_schedule="constant",
                   weight_decay=0.0, grad_clip=1.0, ema_decay=0.999, log_every=50, checkpoint_every=200,
                   keep=3, sample_every=400)
    c.sample.update(sampler="ddim", steps=50, guidance_scale=3.0, per_class=8)
    return c
