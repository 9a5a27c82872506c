"""What a train step eats: this process's batches of images and labels or caption tokens."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from jaxdiff.data import batching
from jaxdiff.data.tokenizers import WordTokenizer
from jaxdiff.train.config import TEXT_TASKS
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


def train_batches(source, resolved, start: int, stop: int, position: Optional[int] = None) -> Iterator:
    """This process's (images, cond) of steps [start, stop), prefetched (`jaxdiff.data.batching.batches`);
    cond is the labels, or a text task's caption tokens (`caption_tokens`); step `start`'s batch
    begins at stream `position` (default start * batch_size)."""
    text = resolved.task in TEXT_TASKS
    it = batching.batches(source, global_batch_size=int(resolved.train.batch_size), seed=int(resolved.seed),
                          start_step=start, num_steps=stop - start, augment=config_util.get(resolved.data, "augment"),
                          image_size=int(resolved.data.image_size), start_position=position,
                          workers=int(config_util.get(resolved.data, "workers", 1)), text=text)
    if not text:
        return it
    tokens = caption_tokens(resolved)
    return ((images, tokens(fields[source.info.caption_key])) for images, _, fields in it)
