"""CLIP on the captioned 8x8 digits: noised, to guide sampling by text (the "clip" guide), clean, to score
samples (the text sweep's evaluation-CLIP score), or clean as unCLIP's frozen encoder pair.

    python train.py --config configs/digits_clip.py --workdir W          # noised: guides
    python train.py --config configs/digits_clip.py:eval --workdir W     # clean: only scores
    python train.py --config configs/digits_clip.py:unclip --workdir W   # clean: unCLIP's encoders

The noised image encoder sees x_t = q_sample(x_0, t) at uniform t on the diffusion model's schedule
(the default cosine, 1000 steps, as configs/digits_text.py) and its timestep token; the text
encoder reads the word-tokenized captions. Symmetric contrastive loss, CLIP's learned logit scale.
The evaluation CLIP ("eval") is trained apart, from another seed, on clean images (t = 0).
The unCLIP CLIP ("unclip") is a third one, clean (t = 0) from a third seed (2), so that unCLIP's prior and
decoder (configs/digits_unclip_prior.py, configs/digits_unclip_decoder.py) never see the evaluation CLIP that
scores their samples; its embeddings (n_embd 64) are as wide as its token states (2 heads x 32), as unCLIP's
prior and text_proj need (docs/unclip_training.md).
"""

from jaxdiff.train.config import default_config

VARIANTS = ("noised", "eval", "unclip")


def get_config(variant: str = "noised"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/digits_clip.py:{variant}: allowed variants: {', '.join(VARIANTS)}")
    c = default_config("clip")
    c.data.name = "digits_text"
    c.model.update(n_xf_blocks_text=1, max_text_len=6)
    c.train.update(batch_size=128, steps=600, lr_schedule="linear", warmup_steps=50, ema_decay=0.99,
                   checkpoint_every=300, keep=2)
    if variant == "eval":
        c.seed = 1
        c.train.update(noised=False, steps=400, checkpoint_every=200)
    if variant == "unclip":
        c.seed = 2
        c.train.update(noised=False, steps=250, checkpoint_every=250)
    return c
