"""DeepFloyd IF's stage II on the captioned digits: 8x8 -> 16x16 (the digits resized to 16 by the data
pipeline; the low-resolution input is their 2x2 block average). The network sees the noisy 16x16 image
concatenated with the 8x8 image upscaled bilinearly (align_corners=True, as IF's pipeline) and noised by
q_sample at a random augmentation level per example (uniform in [0, superres.max_level), default all 1000
steps), the level entering as its class label (class_embed_type "timestep"). Text conditioning, caption
dropout and the loss as configs/digits_if.py, whose docstring gives the order of the commands:

    python train.py --config configs/digits_clip.py --workdir runs/digits_text/clip
    python train.py --config configs/digits_if_superres.py --workdir runs/digits_if/stage2

It reads the text states stage I cached in runs/digits_if/text_states (or computes them if stage I has not run).
"""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("if_superres")
    c.data.update(name="digits_text", image_size=16)
    c.superres.low_res = 8
    c.text_encoder.update(kind="clip", path="runs/digits_text/clip", cache_dir="runs/digits_if/text_states")
    # IF-II's layout at digits size: 16x16 -> 8x8, ResNet blocks first, cross-attention at 8x8
    c.model.update(block_out_channels=(32, 64), attention_head_dim=32, addition_embed_type_num_heads=2)
    with c.model.ignore_type():  # a per-block list where the default is one integer for every block
        c.model.layers_per_block = (1, 2)
    c.train.update(steps=1500, lr=2e-3, checkpoint_every=200, keep=2)
    return c
