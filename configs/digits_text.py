"""Text-conditional diffusion model (GLIDE's Text2ImUNet) on the captioned 8x8 digits.

    python train.py --config configs/digits_text.py --workdir W

Captions such as "a thick slanted seven" (jaxdiff.captions), word-tokenized with the dataset's
vocabulary and dropped to the empty caption with probability diffusion.p_uncond (0.2), so one model
serves classifier-free guidance over text. Sized for the 2-core main job (scripts/main.sh digits_text).
"""

from jaxdiff.training import default_config


def get_config():
    c = default_config("text2im")
    c.data.name = "digits_text"
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                   num_head_channels=32, dropout=0.0, use_scale_shift_norm=True, resblock_updown=True,
                   text_ctx=6, xf_width=32, xf_layers=1, xf_heads=1, xf_final_ln=True, xf_padding=True)
    c.diffusion.update(schedule="cosine", num_timesteps=1000, prediction="eps", learned_sigma=True)
    c.train.update(batch_size=64, steps=1500, lr=2e-3, warmup_steps=100, lr_schedule="constant",
                   weight_decay=0.0, grad_clip=1.0, ema_decay=0.999, log_every=50, checkpoint_every=200,
                   keep=2, sample_every=0)
    c.sample.update(sampler="ddim", steps=50, guidance_scale=3.0, per_class=8)
    return c
