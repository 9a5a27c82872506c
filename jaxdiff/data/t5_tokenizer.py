"""T5's tokenizer as DeepFloyd IF uses it: the `sentencepiece` library on the user's spiece.model.

    tok = T5Tokenizer("IF-I-XL-v1.0/tokenizer/spiece.model")     # or the folder holding spiece.model
    tokens, mask = tok.tokens_and_mask(["a red cube", ""])        # int32 [2, 77], bool [2, 77]

IF's conventions (diffusers' IFPipeline.encode_prompt with transformers' T5Tokenizer, max_length=77,
padding="max_length", truncation=True, add_special_tokens=True):
- the caption is lowercased and stripped (IF's `_text_preprocessing`; its optional `clean_caption`
  clean-up of URLs, HTML and punctuation, which needs bs4 and ftfy, is not reproduced: lower=False
  leaves the text as given);
- ids = the sentencepiece ids of the text, truncated to max_length - 1, then the end id (`</s>`, 1 in T5's
  model); padded with the pad id (`<pad>`, 0) to max_length; mask True on the ids and the end token;
- the empty caption, IF's negative prompt, is just the end token: [1, 0, 0, ...], mask [True, False, ...].

transformers' own T5Tokenizer also maps the literal text of its special tokens ("</s>", "<extra_id_0>", ...)
inside a caption to their ids; here such text is tokenized as ordinary characters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdiff.util.config import is_int

__all__ = ["IF_MAX_LENGTH", "T5Tokenizer"]

IF_MAX_LENGTH = 77


def _spiece_path(path) -> Path:
    p = Path(os.fspath(path))
    if p.is_dir():
        for q in (p / "spiece.model", p / "tokenizer" / "spiece.model"):
            if q.is_file():
                return q
        raise FileNotFoundError(f"no spiece.model in {p} or {p / 'tokenizer'} (T5's sentencepiece model)")
    if not p.is_file():
        raise FileNotFoundError(f"T5 tokenizer file {p} does not exist (pass spiece.model or its folder)")
    return p


class T5Tokenizer:
    """A sentencepiece model (T5's spiece.model) with IF's padding, truncation and end token."""

    def __init__(self, path):
        import sentencepiece as spm

        self.path = _spiece_path(path)
        data = self.path.read_bytes()
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
            ok = sp.GetPieceSize() > 0
        except (RuntimeError, OSError, TypeError):
            ok = False
        if not ok:
            what = " (it looks like JSON, e.g. a tokenizers tokenizer.json)" if data.lstrip()[:1] in (b"{", b"[") else ""
            raise ValueError(f"T5 tokenizer: {self.path} is not a sentencepiece model{what}; pass T5's spiece.model")
        if sp.eos_id() < 0 or sp.pad_id() < 0:
            raise ValueError(f"T5 tokenizer: {self.path} defines no {'end' if sp.eos_id() < 0 else 'padding'} "
                             f"token (eos_id={sp.eos_id()}, pad_id={sp.pad_id()}); T5's spiece.model has pad 0 and "
                             "end 1")
        self.sp = sp

    @property
    def vocab_size(self) -> int:
        """The sentencepiece model's pieces (32000 for T5's; the encoder's table is larger: 32128)."""
        return self.sp.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def end_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list:
        """The text's ids (as given: no lowercasing, no end token)."""
        return list(self.sp.EncodeAsIds(text))

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids if int(i) not in (self.pad_id, self.end_id)])

    def tokens_and_mask(self, captions: Sequence[str], max_length: int = IF_MAX_LENGTH, *, lower: bool = True) -> tuple:
        """(tokens int32 [N, max_length], mask bool [N, max_length]) as IF tokenizes: each caption lowercased
        and stripped (lower=True), its ids truncated to max_length - 1, the end id, then padding."""
        if isinstance(captions, str):
            raise TypeError("T5Tokenizer.tokens_and_mask: expected a sequence of strings, got one string (wrap it in "
                            "a list)")
        captions = list(captions)
        bad = [c for c in captions if not isinstance(c, str)]
        if bad:
            raise TypeError(f"T5Tokenizer.tokens_and_mask: every caption must be a str, got {type(bad[0]).__name__} "
                            f"{bad[0]!r}")
        if not is_int(max_length) or max_length < 1:
            raise ValueError(f"max_length={max_length!r} is not allowed; it must be an integer >= 1 (IF: 77)")
        tokens = np.full((len(captions), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(captions), max_length), bool)
        for i, c in enumerate(captions):
            ids = self.encode(c.lower().strip() if lower else c)[:max_length - 1] + [self.end_id]
            tokens[i, :len(ids)] = ids
            mask[i, :len(ids)] = True
        return tokens, mask
