"""Classifier on clean Fashion-MNIST (t = 0, no noise), used to score generated samples."""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("classifier")
    c.data.name = "fashion_mnist"
    c.data.image_size = 32
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(), channel_mult=(1, 2, 2),
                   num_head_channels=32, dropout=0.1, use_scale_shift_norm=True, resblock_updown=True,
                   pool="adaptive")
    c.diffusion.update(schedule="cosine", num_timesteps=1000)
    c.train.update(batch_size=64, steps=400, lr=2e-3, warmup_steps=50, lr_schedule="linear",
                   weight_decay=0.05, grad_clip=1.0, ema_decay=0.99, noised=False, log_every=50,
                   checkpoint_every=200, keep=2, sample_every=400)
    return c
