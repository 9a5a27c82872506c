"""What a train step eats: this process's batches of images and labels, caption tokens or (the IF tasks) the
cached token states of the captions, (the unCLIP tasks) with the cached CLIP embeddings of the images and
captions."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import jax

from jaxdiff.data import batching
from jaxdiff.data.order import global_batch_indices
from jaxdiff.data.tokenizers import WordTokenizer
from jaxdiff.train.config import FROZEN_TEXT_TASKS, IF_TASKS, TEXT_TASKS, UNCLIP_TASKS
from jaxdiff.util import config as config_util


def caption_tokens(resolved) -> Callable[[Any], dict]:
    """captions -> a text task's token arrays (`cond_spec`), with the dataset's word vocabulary:
    `WordTokenizer.tokens_and_mask` (text_ctx) for "text2im", `.tokens_and_lengths` (max_text_len)
    for "clip"; longer captions are truncated, unknown words raise ValueError naming them."""
    tok = WordTokenizer(list(resolved.text.vocab), source=f"the vocabulary of {resolved.data.name}")
    if resolved.task == "text2im":
        ctx = int(resolved.model.text_ctx)
        return lambda captions: dict(zip(("tokens", "mask"), tok.tokens_and_mask(list(captions), ctx)))
    n = int(resolved.model.max_text_len)
    return lambda captions: dict(zip(("tokens", "lengths"), tok.tokens_and_lengths(list(captions), n)))


def example_indices(resolved, num_examples: int, start: int, position: Optional[int] = None) -> Iterator:
    """This process's dataset indices of the rows of steps start, start + 1, ... (the order `train_batches`
    reads them in: `data.order.global_batch_indices`, this process's contiguous part)."""
    b, seed = int(resolved.train.batch_size), int(resolved.seed)
    q0 = start * b if position is None else int(position)
    local = b // jax.process_count()
    p = jax.process_index()
    k = 0
    while True:
        idx = global_batch_indices(start + k, global_batch_size=b, num_examples=num_examples, seed=seed,
                                   position=q0 + k * b)
        yield idx[p * local:(p + 1) * local]
        k += 1


def train_batches(source, resolved, start: int, stop: int, position: Optional[int] = None, *,
                  text_states=None, image_embeddings=None) -> Iterator:
    """This process's (images, cond) of steps [start, stop), prefetched (`jaxdiff.data.batching.batches`);
    cond is the labels, a text task's caption tokens (`caption_tokens`), or for the IF tasks the rows of
    `text_states` (`text_states.TextStates.gather`: each caption's frozen-encoder states and mask, gathered on
    the host), for the unCLIP tasks also each caption's CLIP text embedding ("text_emb") and each image's
    ("image_emb": the row of `image_embeddings`, an `image_embeddings.ImageEmbeddings`, of its example);
    step `start`'s batch begins at stream `position` (default start * batch_size)."""
    if resolved.task in FROZEN_TEXT_TASKS and text_states is None:
        raise ValueError(f"the {resolved.task!r} task's batches need text_states (jaxdiff.train.text_states.prepare)")
    if resolved.task in UNCLIP_TASKS and image_embeddings is None:
        raise ValueError(f"the {resolved.task!r} task's batches need image_embeddings "
                         "(jaxdiff.train.image_embeddings.prepare)")
    text = resolved.task in TEXT_TASKS or resolved.task in FROZEN_TEXT_TASKS
    it = batching.batches(source, global_batch_size=int(resolved.train.batch_size), seed=int(resolved.seed),
                          start_step=start, num_steps=stop - start, augment=config_util.get(resolved.data, "augment"),
                          image_size=int(resolved.data.image_size), start_position=position,
                          workers=int(config_util.get(resolved.data, "workers", 1)), text=text)
    if not text:
        return it
    if resolved.task in IF_TASKS:
        return ((images, text_states.gather(fields[source.info.caption_key])) for images, _, fields in it)
    if resolved.task in UNCLIP_TASKS:
        indices = example_indices(resolved, len(source), start, position)
        return ((images, dict(text_states.gather(fields[source.info.caption_key]),
                              image_emb=image_embeddings.gather(next(indices))))
                for images, _, fields in it)
    tokens = caption_tokens(resolved)
    return ((images, tokens(fields[source.info.caption_key])) for images, _, fields in it)
