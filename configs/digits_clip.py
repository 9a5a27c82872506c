"""Noised CLIP on the captioned 8x8 digits: guides sampling by text (the "clip" guide).

    python train.py --config configs/digits_clip.py --workdir W

The image encoder sees x_t = q_sample(x_0, t) at uniform t on the diffusion model's schedule (cosine,
1000 steps: pass the same diffusion settings as configs/digits_text.py) and its timestep token; the
text encoder reads the word-tokenized captions. Symmetric contrastive loss, CLIP's learned logit scale.
"""

from jaxdiff.training import default_config


def get_config():
    c = default_config("clip")
    c.data.name = "digits_text"
    c.model.update(n_embd=64, patch_size=2, n_head_image=2, n_head_state_image=32, n_xf_blocks_image=2,
                   n_head_text=2, n_head_state_text=32, n_xf_blocks_text=1, max_text_len=6,
                   logit_scale=1 / 0.07, learn_logit_scale=True)
    c.diffusion.update(schedule="cosine", num_timesteps=1000)
    c.train.update(batch_size=128, steps=600, lr=1e-3, warmup_steps=50, lr_schedule="linear",
                   weight_decay=0.0, grad_clip=1.0, ema_decay=0.99, noised=True, log_every=50,
                   checkpoint_every=300, keep=2, sample_every=0)
    return c
