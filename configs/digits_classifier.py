"""Noisy classifier on the 8x8 digits for classifier guidance (ADM recipe: q_sample'd inputs at
uniform t, AdamW with weight decay, linear lr anneal). Report: accuracy against t with
`python -m jaxdiff.eval accuracy --workdir W`."""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("classifier")
    c.data.name = "digits"
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                   num_head_channels=32, dropout=0.0, use_scale_shift_norm=True, resblock_updown=True,
                   pool="attention")
    c.diffusion.update(schedule="cosine", num_timesteps=1000)  # must match the diffusion model's
    c.train.update(batch_size=64, steps=1000, lr=1e-3, warmup_steps=100, lr_schedule="linear",
                   weight_decay=0.05, grad_clip=1.0, ema_decay=0.999, noised=True, log_every=50,
                   checkpoint_every=500, keep=3, sample_every=500)
    return c
