"""The text outputs of a CLIP workdir of this repository (`models.clip`, the "clip" task) as the unCLIP tasks read
them: captions word-tokenized with the CLIP's own vocabulary (its config.json "text.vocab"), every position's
state after the text tower's final LayerNorm, the mask True up to and including the end token, and the
projected embedding. `train.text_states` encodes the training captions with `clip_text_fn`; the unCLIP sweep
(`unclip_toy`) encodes its captions with the same function through `text_table`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from jaxdiff.sample import unclip


class ClipText(NamedTuple):
    """A CLIP workdir's text tower: module, EMA params, config (`checkpoints.load_model(kind="clip-text")`),
    its word tokenizer and its token count."""

    module: Any
    params: Any
    config: dict
    tokenizer: Any
    length: int


def clip_vocab(workdir_config: dict) -> tuple:
    """The word vocabulary stored in a "clip" workdir's config.json (ValueError when it is not such a workdir)."""
    model = dict(workdir_config.get("model", {}))
    vocab = (workdir_config.get("text") or {}).get("vocab")
    if model.get("kind") != "clip" or not vocab:
        raise ValueError(f"not a workdir of the 'clip' task (model kind {model.get('kind')!r}"
                         f"{'' if vocab else ', no vocabulary'})")
    return tuple(vocab)


def word_tokenizer(vocab: Sequence[str], path: str):
    """The CLIP's word tokenizer (`data.tokenizers.WordTokenizer`) of its vocabulary."""
    from jaxdiff.data.tokenizers import WordTokenizer

    return WordTokenizer(list(vocab), source=f"the vocabulary of the CLIP {path}")


def clip_text_fn(module, length: int):
    """jitted fn(params, tokens [B, L], lengths [B]) -> (states float32 [B, L, E], mask bool [B, L],
    embedding float32 [B, D]) of a CLIP text tower (`ClipTextEncoder`, return_states=True)."""
    import jax.numpy as jnp

    from jaxdiff.util import cpu

    @cpu.jit
    def apply(p, tokens, lengths):
        emb, states = module.apply({"params": p}, tokens, lengths, return_states=True)
        return (states.astype(jnp.float32), jnp.arange(length)[None, :] < lengths[:, None],
                emb.astype(jnp.float32))

    return apply


def load_clip_text(path: str) -> ClipText:
    """The text tower of the "clip" workdir `path` (its EMA parameters) with its tokenizer."""
    from jaxdiff import checkpoints

    vocab = clip_vocab(checkpoints.read_config(path))
    module, params, cfg = checkpoints.load_model(path, kind="clip-text")
    return ClipText(module, params, cfg, word_tokenizer(vocab, path), int(cfg["model"]["max_text_len"]))


def text_table(clip: ClipText, prompts: Sequence[str]) -> unclip.TextTable:
    """unCLIP's text table of the prompts, the empty caption as the last row (`unclip.TextTable`): the CLIP
    embedding, the token states and the mask, in one jitted pass."""
    import jax

    tokens, lengths = clip.tokenizer.tokens_and_lengths(list(prompts) + [""], clip.length)
    states, mask, emb = jax.device_get(clip_text_fn(clip.module, clip.length)(clip.params, tokens, lengths))
    return unclip.TextTable(np.asarray(emb, np.float32), np.asarray(states, np.float32), np.asarray(mask, bool))


__all__ = ["ClipText", "clip_text_fn", "clip_vocab", "load_clip_text", "text_table", "word_tokenizer"]
