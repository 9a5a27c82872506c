"""unCLIP's (DALL-E 2's) decoder on the captioned 8x8 digits: diffusers' UnCLIPTextProjModel and a small
UNet2DConditionModel (IF-like blocks, 32 / 64 channels, cross-attention at 4x4 and in the middle) trained
jointly, conditioned on the clean CLIP image embedding of the training image and on its caption (CLIP text
embedding, token states and mask), as diffusers' UnCLIPPipeline feeds them: text_proj makes 4 extra context
tokens from the image embedding and an additive time embedding (the U-Net's class label, class_embed_type
"identity") from the image and text embeddings; the projected token states follow the extra tokens. eps
prediction with learned-range variance (the hybrid loss), cosine schedule, 1000 steps (diffusers'
UnCLIPScheduler for the decoder). As DALL-E 2: the image embedding is replaced by text_proj's learned null
embedding with probability diffusion.p_uncond_image (0.1) and the caption by the empty caption with
probability diffusion.p_uncond (0.5), so the decoder serves classifier-free guidance. Commands in order:

    python train.py --config configs/digits_clip.py:unclip --workdir runs/digits_unclip/clip
    python train.py --config configs/digits_unclip_prior.py --workdir runs/digits_unclip/prior
    python train.py --config configs/digits_unclip_decoder.py --workdir runs/digits_unclip/decoder

Parameter tree {"text_proj": UnCLIPTextProjModel's, "decoder": UNet2DConditionModel's}; the workdir also holds
text_proj/config.json, decoder/config.json and decoder_scheduler/config.json (diffusers' layout);
`jaxdiff.checkpoints.load_unclip(W)` gives each network's (module, params, config). docs/unclip_training.md.
"""

from jaxdiff.train.config import default_config

CLIP_WORKDIR = "runs/digits_unclip/clip"
CACHE_DIR = "runs/digits_unclip/text_states"


def get_config():
    c = default_config("unclip_decoder")  # eps, learned range, cosine 1000, p_uncond 0.5, p_uncond_image 0.1
    c.data.name = "digits_text"
    c.text_encoder.update(kind="clip", path=CLIP_WORKDIR, cache_dir=CACHE_DIR)
    c.model.decoder.update(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=32,
                           cross_attention_dim=64)
    c.model.text_proj.update(clip_extra_context_tokens=4)
    c.train.update(steps=800, lr=2e-3, checkpoint_every=400, keep=2)
    return c
