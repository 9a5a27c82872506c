"""What a train step eats: this process's batches of images and labels, caption tokens or (the IF tasks) the
cached token states of the captions."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from jaxdiff.data import batching
from jaxdiff.data.tokenizers import WordTokenizer
from jaxdiff.train.config import IF_TASKS, TEXT_TASKS
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


def train_batches(source, resolved, start: int, stop: int, position: Optional[int] = None, *,
                  text_states=None) -> Iterator:
    """This process's (images, cond) of steps [start, stop), prefetched (`jaxdiff.data.batching.batches`);
    cond is the labels, a text task's caption tokens (`caption_tokens`), or for the IF tasks the rows of
    `text_states` (`text_states.TextStates.gather`: each caption's frozen-encoder states and mask, gathered on
    the host); step `start`'s batch begins at stream `position` (default start * batch_size)."""
    if resolved.task in IF_TASKS and text_states is None:
        raise ValueError(f"the {resolved.task!r} task's batches need text_states (jaxdiff.train.text_states.prepare)")
    text = resolved.task in TEXT_TASKS or resolved.task in IF_TASKS
    it = batching.batches(source, global_batch_size=int(resolved.train.batch_size), seed=int(resolved.seed),
                          start_step=start, num_steps=stop - start, augment=config_util.get(resolved.data, "augment"),
                          image_size=int(resolved.data.image_size), start_position=position,
                          workers=int(config_util.get(resolved.data, "workers", 1)), text=text)
    if not text:
        return it
    if resolved.task in IF_TASKS:
        return ((images, text_states.gather(fields[source.info.caption_key])) for images, _, fields in it)
    tokens = caption_tokens(resolved)
    return ((images, tokens(fields[source.info.caption_key])) for images, _, fields in it)
