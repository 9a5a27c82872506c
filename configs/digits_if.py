"""DeepFloyd IF's stage I on the captioned 8x8 digits: a UNet2DConditionModel (IF's blocks, attention-pooled
text, learned-range variance, eps, cosine schedule) on the token states of a frozen text encoder, here the
text tower of the noised CLIP trained on digits_text. Run, in this order (each command resumes when rerun):

    python train.py --config configs/digits_clip.py --workdir runs/digits_text/clip        # the text encoder
    python train.py --config configs/digits_if.py --workdir runs/digits_if/stage1          # stage I, 8x8
    python train.py --config configs/digits_if_superres.py --workdir runs/digits_if/stage2 # stage II, 8 -> 16

The states of every caption of the training split are computed once, before the first step, and cached in
runs/digits_if/text_states (shared by both stages: same encoder, same captions); a rerun reads them.
Captions are dropped to the empty caption's states with probability diffusion.p_uncond (0.1), so the model
serves classifier-free guidance. With a converted T5 instead (IF's own encoder, e.g. a transformers
T5EncoderModel folder): --config.text_encoder.kind=t5 --config.text_encoder.path=IF-I-XL-v1.0/text_encoder
(tokenizer: IF's tokenizer/spiece.model, found next to it; 77 tokens).
"""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("if_text2im")
    c.data.name = "digits_text"
    c.text_encoder.update(kind="clip", path="runs/digits_text/clip", cache_dir="runs/digits_if/text_states")
    # IF-I's layout at digits size: 8x8 -> 4x4, 32 / 64 channels, cross-attention at 4x4 and in the middle,
    # 32-wide heads; cross_attention_dim = the encoder's width (64 for configs/digits_clip.py)
    c.model.update(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=32,
                   addition_embed_type_num_heads=2)
    c.train.update(steps=1500, lr=2e-3, checkpoint_every=200, keep=2)
    return c
