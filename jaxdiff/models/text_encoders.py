"""What transformers' text encoders (T5 in `t5.py`, CLIP's in `clip_text.py`) share: the config.json fields
every transformers model may carry without effect on an encoder's inference output, the token and mask
checks, and the jitted forward pass of `t5.encode` and `clip_text.encode_clip_text`."""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PRETRAINED_CONFIG_FIELDS", "apply_text_encoder", "check_tokens"]

# transformers' PretrainedConfig attributes (metadata, run-time switches, the decoder's and generation's
# settings) that an encoder's config.json may hold: accepted with any value and ignored. Each encoder adds
# its own training settings (dropout, init) to these.
PRETRAINED_CONFIG_FIELDS = frozenset((
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "model_type", "torch_dtype", "dtype",
    "use_bfloat16", "_attn_implementation_autoset", "attn_implementation", "_attn_implementation",
    "initializer_factor", "gradient_checkpointing", "use_cache", "is_encoder_decoder", "tie_word_embeddings",
    "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size", "decoder_start_token_id",
    "sep_token_id", "output_hidden_states", "output_attentions", "return_dict", "torchscript",
    "chunk_size_feed_forward", "tf_legacy_loss", "finetuning_task", "id2label", "label2id", "num_labels",
    "problem_type", "tokenizer_class", "prefix", "task_specific_params", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
))


def check_tokens(tokens, mask, vocab_size: int, what: str, max_positions: Optional[int] = None) -> None:
    """ValueError for token ids that are not integers [batch, length], rows longer than `max_positions`
    (when given), ids outside [0, vocab_size), or a mask [batch, length] (True / 1 on real tokens) that does
    not match; `what` names the encoder in the message ("T5", "CLIP"). Traced arrays are not checked."""
    if isinstance(tokens, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
        return
    t = np.asarray(tokens)
    if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{what} tokens: expected integer ids [batch, length], got {t.dtype} of shape {t.shape}")
    if max_positions is not None and t.shape[1] > max_positions:
        raise ValueError(f"{what} tokens: {t.shape[1]} per row, but max_position_embeddings is {max_positions}")
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = int(t.min()) if t.min() < 0 else int(t.max())
        raise ValueError(f"{what} tokens: id {bad} is outside the vocabulary [0, {vocab_size})")
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != t.shape:
            raise ValueError(f"{what} mask: shape {m.shape} differs from the tokens' {t.shape}")
        if m.dtype != bool and not np.isin(m, (0, 1)).all():
            raise ValueError(f"{what} mask: expected booleans (True on real tokens) or 0/1, got values {np.unique(m)[:5]}")


@functools.lru_cache(maxsize=16)
def _jitted_apply(module: nn.Module):
    return jax.jit(module.apply)


def apply_text_encoder(module: nn.Module, params, tokens, mask=None):
    """module.apply on tokens [B, L] (int32) and mask [B, L] (bool, True on real tokens; None: all real), jitted
    once per module (and input shape); `params` is the params tree or {"params": tree}."""
    variables = params if "params" in params else {"params": params}
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    return _jitted_apply(module)(variables, tokens, mask)
