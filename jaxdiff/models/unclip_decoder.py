"""unCLIP's decoder as one trainable module: diffusers' `UnCLIPTextProjModel` feeding its
`UNet2DConditionModel`, as diffusers' UnCLIPPipeline wires them (what jaxdiff.train's "unclip_decoder" task
trains jointly).

    module = UnCLIPDecoder(text_proj_config(tp), unet2d_condition_config(dec), dtype="float32")
    module.apply({'params': {"text_proj": ..., "decoder": ...}}, x, t, image_embeddings, text_embeddings,
                 text_encoder_hidden_states, text_mask=None, train=False) -> [B, H, W, out_channels]

text_proj turns the CLIP image embedding, the caption's CLIP text embedding and its token states into the
decoder's encoder_hidden_states (clip_extra_context_tokens extra tokens, then the projected states) and an
additive time embedding (the decoder's class_labels, class_embed_type "identity"); the decoder's attention
mask is `decoder_attention_mask(text_mask)` (the extra tokens always kept). The parameter tree is
{"text_proj": UnCLIPTextProjModel's, "decoder": UNet2DConditionModel's}: each subtree is the standalone
network's own parameters (`text_proj()` / `decoder()` give the standalone modules a sampler applies).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxdiff.models.unclip_text_proj import TextProjConfig, UnCLIPTextProjModel, decoder_attention_mask
from jaxdiff.models.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel

__all__ = ["UnCLIPDecoder", "check_unclip_decoder"]


def check_unclip_decoder(text_proj: TextProjConfig, decoder: UNet2DConditionConfig) -> None:
    """ValueError unless text_proj's outputs fit the decoder: class_embed_type "identity" with time_embed_dim
    equal to text_proj's, cross_attention_dim equal to the decoder's context width (no encoder_hid_proj)."""
    if decoder.class_embed_type != "identity":
        raise ValueError(f"unCLIP's decoder needs class_embed_type='identity' (text_proj's time embedding is its "
                         f"class label), got {decoder.class_embed_type!r}")
    if decoder.time_embed_dim != text_proj.time_embed_dim:
        raise ValueError(f"text_proj time_embed_dim={text_proj.time_embed_dim} must equal the decoder's "
                         f"time_embed_dim={decoder.time_embed_dim} (4 x block_out_channels[0])")
    if decoder.context_dim != text_proj.cross_attention_dim:
        raise ValueError(f"text_proj cross_attention_dim={text_proj.cross_attention_dim} must equal the decoder's "
                         f"encoder_hidden_states width {decoder.context_dim}")


class UnCLIPDecoder(nn.Module):
    """text_proj + decoder (see the module doc); `dtype` is the decoder's compute dtype."""

    text_proj_config: TextProjConfig
    decoder_config: UNet2DConditionConfig
    dtype: str = "float32"

    def __post_init__(self):
        check_unclip_decoder(self.text_proj_config, self.decoder_config)
        super().__post_init__()

    def text_proj(self, **kwargs) -> UnCLIPTextProjModel:
        """The standalone text_proj for this module's "text_proj" parameters."""
        return UnCLIPTextProjModel(self.text_proj_config, **kwargs)

    def decoder(self, **kwargs) -> UNet2DConditionModel:
        """The standalone decoder U-Net for this module's "decoder" parameters."""
        return UNet2DConditionModel(self.decoder_config, dtype=self.dtype, **kwargs)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, image_embeddings: jax.Array, text_embeddings: jax.Array,
                 text_encoder_hidden_states: jax.Array, text_mask: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        hidden, time = self.text_proj(name="text_proj")(image_embeddings, text_embeddings, text_encoder_hidden_states)
        mask = None if text_mask is None else decoder_attention_mask(text_mask,
                                                                     self.text_proj_config.clip_extra_context_tokens)
        return self.decoder(name="decoder")(x, t, hidden, class_labels=time, attention_mask=mask, train=train)
