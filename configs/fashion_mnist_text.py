"""Text-conditional diffusion model (GLIDE's Text2ImUNet) on captioned Fashion-MNIST (padded to 32).

    python train.py --config configs/fashion_mnist_text.py --workdir W

Captions such as "a large dark ankle boot" (jaxdiff.captions), word-tokenized, dropped to the empty
caption with probability diffusion.p_uncond (0.2). Sized like configs/fashion_mnist.py so the main job
finishes on 2 CPU cores: an under-trained model; raise model_channels and steps for a real one.
"""

from jaxdiff.training import default_config


def get_config():
    c = default_config("text2im")
    c.data.name = "fashion_mnist_text"
    c.data.image_size = 32
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(4,), channel_mult=(1, 2, 2),
                   num_head_channels=32, dropout=0.0, use_scale_shift_norm=True, resblock_updown=True,
                   text_ctx=8, xf_width=32, xf_layers=1, xf_heads=1, xf_final_ln=True, xf_padding=True)
    c.diffusion.update(schedule="cosine", num_timesteps=1000, prediction="eps", learned_sigma=True)
    c.train.update(batch_size=32, steps=400, lr=2e-3, warmup_steps=100, lr_schedule="constant",
                   weight_decay=0.0, grad_clip=1.0, ema_decay=0.995, log_every=50, checkpoint_every=200,
                   keep=2, sample_every=0)
    c.sample.update(sampler="ddim", steps=50, guidance_scale=3.0, per_class=8)
    return c
