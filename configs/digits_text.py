"""Text-conditional diffusion model (GLIDE's Text2ImUNet) on the captioned 8x8 digits.

    python train.py --config configs/digits_text.py --workdir W

Captions such as "a thick slanted seven" (jaxdiff.data.captions), word-tokenized with the dataset's
vocabulary and dropped to the empty caption with probability diffusion.p_uncond (0.2), so one model
serves classifier-free guidance over text. Sized for the 2-core main job (scripts/main.sh digits_text).
"""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("text2im")  # ADM's recipe with GLIDE's caption transformer, p_uncond 0.2
    c.data.name = "digits_text"
    c.model.update(model_channels=32, num_res_blocks=1, text_ctx=6, xf_width=32, xf_layers=1, xf_heads=1)
    c.train.update(steps=1500, lr=2e-3, checkpoint_every=200, keep=2)
    return c
