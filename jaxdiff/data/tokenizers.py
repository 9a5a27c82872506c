r"""Caption tokenizers: GLIDE's GPT-2 BPE, CLIP's BPE, and a word-level tokenizer for our own datasets.

    GPT2Tokenizer.from_glide(path) / .from_files(encoder_json, vocab_bpe)
        .encode(text) -> ids;  .tokens_and_mask(captions, text_ctx=128) -> (int32 [B, ctx], bool [B, ctx])
    ClipTokenizer.from_glide(path) / .from_file(bpe_simple_vocab_16e6.txt[.gz])
        .encode(text) -> ids;  .tokens_and_lengths(prompts, max_text_len=77) -> (int32 [B, L], int32 [B])
    WordTokenizer(words) / .from_captions(captions) / .load(path);  .save(path)
        .encode(text) -> ids;  .tokens_and_mask(captions, text_ctx) -> (int32 [B, ctx], bool [B, ctx])

Nothing is downloaded: the BPE files are read from the user's openai/glide-text2im checkout
(glide_text2im/tokenizer/: encoder.json.gz, vocab.bpe.gz, bpe_simple_vocab_16e6.txt.gz; plain or
gzipped files both work).

Conventions (GLIDE's):
- GPT-2 (GLIDE's text model): the caption is lowercased, then byte-level BPE. No start or end token
  is added. Captions longer than text_ctx are TRUNCATED to their first text_ctx ids (as GLIDE
  does); shorter ones are padded with the end token (n_vocab - 1 = 50256) with mask False. The
  empty caption (the classifier-free unconditional input) is all padding with an all-False mask.
- CLIP (the noised CLIP text encoder): the text is cleaned (ftfy.fix_text when ftfy is installed,
  otherwise only Unicode NFC normalisation; then HTML entities unescaped twice, whitespace runs
  collapsed to one space, stripped) and lowercased. ids = [start] + the first max_text_len - 2 BPE
  ids + [end], padded with 0; text_len counts start and end. Without ftfy, text with mojibake or
  other things ftfy repairs may tokenize differently from CLIP's own tokenizer.
- Word-level (our captioned datasets): lowercased, split into words of letters and digits (an
  apostrophe between two such runs stays inside the word: "don't"); everything else separates
  words. Word i of the vocabulary has id i; the end/padding id is len(words) = n_vocab - 1, used
  like GLIDE's: padding only, mask False, never appended. A word outside the vocabulary raises
  ValueError naming it and the vocabulary's file.

The BPE itself (GPT-2's and CLIP's pre-tokenizing regular expressions, the byte-level mapping,
merging, CLIP's "</w>" suffix, decoding) is the `tokenizers` library's; its letter, number and space
classes follow the library's Unicode tables (16.0 in tokenizers 0.23), not the interpreter's. What
stays here is GLIDE's convention around it: str.lower, CLIP's cleaning, its special words, padding.
"""

from __future__ import annotations

import collections
import gzip
import html
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from jaxdiff.util import files
from jaxdiff.util.config import is_int

__all__ = ["CLIP_MAX_TEXT_LEN", "GLIDE_TEXT_CTX", "ClipTokenizer", "GPT2Tokenizer", "WordTokenizer", "bytes_to_unicode",
           "clean_clip_text", "split_words"]

GLIDE_TEXT_CTX = 128
CLIP_MAX_TEXT_LEN = 77
_CLIP_N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges: 512 byte symbols + merges + 2 = 49408 ids
_CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
# GPT-2's pre-tokenizer, and CLIP's (findall: whitespace between the matches is dropped)
_GPT2_SPLIT = pre_tokenizers.Split(
    Regex(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""), "isolated")
_CLIP_SPLIT = pre_tokenizers.Split(
    Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
    "removed", invert=True)


# --- Shared pieces -----------------------------------------------------------------------------------


def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes (in increasing order) to chr(256), chr(257), ... Insertion order: printable first.
    Kept here: the library gives only the alphabet as a set, and CLIP's ids 0-511 follow this order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


_BYTE_CHARS = bytes_to_unicode()
_SPACES = re.compile(r"[^\S\x1c-\x1f]+")  # str.isspace() but not \x1c-\x1f: the regexes' \s


def _gpt2_pieces(text: str) -> list:
    """GPT-2's pre-tokenization of text (the pieces BPE runs on, before the byte mapping)."""
    return [piece for piece, _ in _GPT2_SPLIT.pre_tokenize_str(text)]


def _bpe_tokenizer(encoder: dict, merges: Sequence[tuple], split, suffix: str = "") -> tuple:
    """(tokenizers.Tokenizer, {extra id: symbol}): byte-level BPE over `encoder` and `merges`, after `split`.

    GLIDE looks a symbol up only once merging is done, so a made-up vocabulary may lack a byte symbol
    or a merge's result, which the library refuses: those get extra ids past the vocabulary (the
    caller refuses them when they come out), and merges of a symbol nothing produces are dropped."""
    vocab = dict(encoder)
    first = max(vocab.values(), default=-1) + 1
    for sym in [*_BYTE_CHARS.values(), *(c + suffix for c in _BYTE_CHARS.values() if suffix),
                *("".join(m) for m in merges)]:
        vocab.setdefault(sym, first + len(vocab) - len(encoder))
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab]
    tok = Tokenizer(models.BPE(vocab, merges, **({"end_of_word_suffix": suffix} if suffix else {})))
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, {i: s for s, i in vocab.items() if s not in encoder}


def _read_text(path) -> str:
    """A UTF-8 text file, gzipped or not (decided by its first bytes)."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8")


def _parse_merges(text: str, path, skip_first: bool) -> list:
    """Merge pairs, one "a b" per line; the first line is skipped when skip_first or a #version header."""
    lines = text.split("\n")
    first = 1 if skip_first or lines[0].startswith("#version") else 0
    merges = []
    for n, line in enumerate(lines[first:], start=first + 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}: line {n} is not a merge of two symbols: {line!r}")
        merges.append(tuple(parts))
    return merges


def _find(root, names: Sequence[str], what: str) -> Path:
    """The first of `names` found in root, root/tokenizer or root/glide_text2im/tokenizer."""
    root = Path(os.fspath(root))
    dirs = [root, root / "tokenizer", root / "glide_text2im" / "tokenizer"]
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(
        f"{what}: none of {list(names)} found in {', '.join(str(d) for d in dirs)} "
        f"(pass the openai/glide-text2im checkout or its glide_text2im/tokenizer folder)")


def _pad_batch(rows: list, ctx: int, pad: int) -> tuple:
    """(tokens int32 [B, ctx] padded with `pad`, mask bool [B, ctx] True on the rows' ids)."""
    tokens = np.full((len(rows), ctx), pad, np.int32)
    mask = np.zeros((len(rows), ctx), bool)
    for b, ids in enumerate(rows):
        tokens[b, :len(ids)] = ids
        mask[b, :len(ids)] = True
    return tokens, mask


def _check_ctx(name: str, value, minimum: int) -> int:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _as_list(captions, what: str) -> list:
    if isinstance(captions, str):
        raise TypeError(f"{what}: expected a sequence of strings, got one string (wrap it in a list)")
    captions = list(captions)
    bad = [c for c in captions if not isinstance(c, str)]
    if bad:
        raise TypeError(f"{what}: every caption must be a str, got {type(bad[0]).__name__} {bad[0]!r}")
    return captions


def _known_ids(ids: Iterable[int], decoder: dict) -> list:
    ids = [int(i) for i in ids]
    bad = next((i for i in ids if i not in decoder), None)
    if bad is not None:
        raise KeyError(f"token id {bad} is not in the vocabulary ({len(decoder)} ids)")
    return ids


def _tokens_and_mask(tok, captions: Sequence[str], text_ctx: int, truncate: bool) -> tuple:
    """GLIDE's caption batch: ids truncated to text_ctx (ValueError with truncate=False), end-padded."""
    ctx = _check_ctx("text_ctx", text_ctx, 1)
    rows = []
    for c in _as_list(captions, "tokens_and_mask"):
        ids = tok.encode(c)
        if len(ids) > ctx and not truncate:
            raise ValueError(f"caption {c!r} has {len(ids)} tokens, more than text_ctx={ctx} (truncate=False)")
        rows.append(ids[:ctx])
    return _pad_batch(rows, ctx, tok.end_token)


# --- GPT-2 (GLIDE's text model) ----------------------------------------------------------------------


class GPT2Tokenizer:
    """GPT-2 byte-level BPE as GLIDE uses it (lowercased text, no start/end token; see module doc)."""

    def __init__(self, encoder: dict, merges: Sequence[tuple], source: str = "<given vocabulary>"):
        self.encoder = dict(encoder)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.source = source
        self._tok, self._extra = _bpe_tokenizer(self.encoder, [tuple(m) for m in merges], _GPT2_SPLIT)

    @classmethod
    def from_files(cls, encoder_json, vocab_bpe) -> GPT2Tokenizer:
        """From encoder.json and vocab.bpe (each plain or gzipped)."""
        encoder = json.loads(_read_text(encoder_json))
        return cls(encoder, _parse_merges(_read_text(vocab_bpe), vocab_bpe, skip_first=False), source=str(encoder_json))

    @classmethod
    def from_glide(cls, path) -> GPT2Tokenizer:
        """From an openai/glide-text2im checkout (or its glide_text2im/tokenizer folder)."""
        return cls.from_files(_find(path, ("encoder.json.gz", "encoder.json"), "GPT-2 encoder"),
                              _find(path, ("vocab.bpe.gz", "vocab.bpe"), "GPT-2 merges"))

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    @property
    def end_token(self) -> int:
        """The padding id: the last id (50256, "<|endoftext|>", for GPT-2)."""
        return self.n_vocab - 1

    def encode(self, text: str) -> list:
        """BPE ids of the lowercased text (no start or end token)."""
        text = text.lower()  # Python's, as GLIDE's: the library's Lowercase follows Rust's Unicode tables
        enc = self._tok.encode(text)
        for n, i in enumerate(enc.ids if self._extra else ()):
            if i in self._extra:  # a symbol a made-up vocabulary lacks (see _bpe_tokenizer)
                raise ValueError(f"BPE symbol {self._extra[i]!r} (from {_gpt2_pieces(text)[enc.word_ids[n]]!r}) "
                                 f"is not in the vocabulary {self.source}")
        return enc.ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_known_ids(ids, self.decoder), skip_special_tokens=False)

    def tokens_and_mask(self, captions: Sequence[str], text_ctx: int = GLIDE_TEXT_CTX, *,
                        truncate: bool = True) -> tuple:
        """(tokens int32 [B, text_ctx], mask bool [B, text_ctx]): ids truncated to text_ctx (or
        ValueError with truncate=False), padded with end_token where mask is False."""
        return _tokens_and_mask(self, captions, text_ctx, truncate)


# --- CLIP (GLIDE's noised CLIP text encoder) ---------------------------------------------------------


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


def clean_clip_text(text: str) -> str:
    """CLIP's text cleaning: fix (ftfy or NFC), unescape HTML twice, collapse whitespace, lowercase.
    Kept here: the library's normalizers have neither ftfy's repairs nor HTML unescaping."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _SPACES.sub(" ", text).strip().lower()


class ClipTokenizer:
    """CLIP's BPE (bpe_simple_vocab_16e6): 256 byte symbols, the same with "</w>", up to 48894
    merges, then <|startoftext|> and <|endoftext|> (49406 and 49407 for the real file)."""

    def __init__(self, merges: Sequence[tuple], source: str = "<given merges>"):
        merges = [tuple(m) for m in merges][:_CLIP_N_MERGES]
        chars = list(_BYTE_CHARS.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(_CLIP_SPECIAL)
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.source = source
        self._tok, _ = _bpe_tokenizer(self.encoder, merges, _CLIP_SPLIT, suffix="</w>")

    @classmethod
    def from_file(cls, bpe_path) -> ClipTokenizer:
        """From bpe_simple_vocab_16e6.txt (plain or gzipped; its first line is a header)."""
        return cls(_parse_merges(_read_text(bpe_path), bpe_path, skip_first=True), source=str(bpe_path))

    @classmethod
    def from_glide(cls, path) -> ClipTokenizer:
        """From an openai/glide-text2im checkout (or its glide_text2im/tokenizer folder)."""
        names = ("bpe_simple_vocab_16e6.txt.gz", "bpe_simple_vocab_16e6.txt")
        return cls.from_file(_find(path, names, "CLIP merges"))

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    @property
    def start_token(self) -> int:
        return self.encoder[_CLIP_SPECIAL[0]]

    @property
    def end_token(self) -> int:
        return self.encoder[_CLIP_SPECIAL[1]]

    def _ids(self, text: str, enc) -> list:
        if "<|" not in text:
            return enc.ids
        # CLIP's regex makes <|startoftext|> and <|endoftext|> a word of their own only where no run of
        # punctuation swallows them ("!<|endoftext|>" is BPE); such a word is one special id. The library's
        # special tokens would match them anywhere, so the words are found here.
        words = [w for w, _ in _CLIP_SPLIT.pre_tokenize_str(text)]
        ids = []
        for n, (i, w) in enumerate(zip(enc.ids, enc.word_ids)):
            if words[w] not in _CLIP_SPECIAL:
                ids.append(i)
            elif n == 0 or enc.word_ids[n - 1] != w:
                ids.append(self.encoder[words[w]])
        return ids

    def encode(self, text: str) -> list:
        """BPE ids of the cleaned, lowercased text (without start and end tokens)."""
        text = clean_clip_text(text)
        return self._ids(text, self._tok.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the ids, each word followed by a space (CLIP's decode)."""
        return self._tok.decode(_known_ids(ids, self.decoder), skip_special_tokens=False).replace("</w>", " ")

    def tokens_and_lengths(self, prompts: Sequence[str], max_text_len: int = CLIP_MAX_TEXT_LEN) -> tuple:
        """(tokens int32 [B, max_text_len], text_len int32 [B]): [start] + the first max_text_len - 2
        ids + [end], padded with 0; text_len counts start and end."""
        n = _check_ctx("max_text_len", max_text_len, 2)
        rows = [[self.start_token] + self.encode(p)[:n - 2] + [self.end_token]
                for p in _as_list(prompts, "tokens_and_lengths")]
        tokens, mask = _pad_batch(rows, n, 0)
        return tokens, mask.sum(axis=1, dtype=np.int32)


# --- Word level (our own captioned datasets) ---------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_VOCAB_FORMAT = "jaxdiff-word-vocabulary"


def split_words(text: str) -> list:
    """Lowercased words of letters/digits ("don't" stays one word); everything else separates."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary (see the module doc for the id conventions)."""

    def __init__(self, words: Sequence[str], source: str = "the vocabulary given to WordTokenizer"):
        words = list(words)
        for w in words:
            if not isinstance(w, str) or split_words(w) != [w]:
                raise ValueError(f"vocabulary entry {w!r} is not a single lowercase word (as split_words splits)")
        dup = [w for w, n in collections.Counter(words).items() if n > 1]
        if dup:
            raise ValueError(f"vocabulary has duplicate words: {dup[:10]}")
        self.words = tuple(words)
        self.ids = {w: i for i, w in enumerate(words)}
        self.source = source

    @classmethod
    def from_captions(cls, captions: Iterable[str], min_count: int = 1) -> WordTokenizer:
        """The vocabulary of every word seen at least min_count times, sorted."""
        counts = collections.Counter(w for c in _as_list(captions, "from_captions") for w in split_words(c))
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    @property
    def n_vocab(self) -> int:
        """len(words) + 1: the model's embedding rows (the last one is the end/padding id)."""
        return len(self.words) + 1

    @property
    def end_token(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list:
        ids = []
        for w in split_words(text):
            if w not in self.ids:
                raise ValueError(f"word {w!r} (in caption {text!r}) is not in the vocabulary ({self.source}, "
                                 f"{len(self.words)} words): use only its words (a trained model's are listed "
                                 f"in its config.json under \"text\": {{\"vocab\": [...]}})")
            ids.append(self.ids[w])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids if int(i) != self.end_token)

    def tokens_and_mask(self, captions: Sequence[str], text_ctx: int, *, truncate: bool = True) -> tuple:
        """(tokens int32 [B, text_ctx], mask bool [B, text_ctx]), like GPT2Tokenizer.tokens_and_mask."""
        return _tokens_and_mask(self, captions, text_ctx, truncate)

    def tokens_and_lengths(self, prompts: Sequence[str], max_text_len: int) -> tuple:
        """For a CLIP text encoder over this vocabulary: (tokens int32 [B, max_text_len], text_len int32
        [B]): the words' ids then the end id (no start id), padded with the end id; text_len counts
        the end id (the encoder reads position text_len - 1), like ClipTokenizer.tokens_and_lengths."""
        n = _check_ctx("max_text_len", max_text_len, 2)
        rows = [self.encode(p)[:n - 1] + [self.end_token] for p in _as_list(prompts, "tokens_and_lengths")]
        tokens, mask = _pad_batch(rows, n, self.end_token)
        return tokens, mask.sum(axis=1, dtype=np.int32)

    def save(self, path) -> Path:
        """Write the vocabulary as JSON ({"format", "words"}), atomically (temporary file + rename)."""
        path = Path(os.fspath(path)).absolute()
        files.atomic_write(path, json.dumps({"format": _VOCAB_FORMAT, "words": list(self.words)}, indent=0))
        return path

    @classmethod
    def load(cls, path) -> WordTokenizer:
        path = Path(os.fspath(path)).absolute()
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != _VOCAB_FORMAT or not isinstance(data.get("words"), list):
            raise ValueError(f"{path} is not a word vocabulary written by WordTokenizer.save")
        return cls(data["words"], source=str(path))
