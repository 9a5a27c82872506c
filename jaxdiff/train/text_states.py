"""Frozen text-encoder token states for the IF tasks, computed once per caption set and cached on disk.

    states = prepare(resolved, source, workdir)      # TextStates: one row per distinct caption, row 0 = ""
    cond = states.gather(captions)                   # {"states": float32 [B, L, E], "mask": bool [B, L]}
    states.null()                                    # the empty caption's row (caption dropout's target)

The encoder (`config.text_encoder`, see `config.encoder_info`) is either
  * "t5": a transformers T5 encoder folder (`convert.transformers.load_t5_folder`), tokenized as IF does
    (`data.t5_tokenizer.T5Tokenizer`, max_length tokens, end token, padding); the states are T5's
    last_hidden_state;
  * "clip": a workdir of this repository's "clip" task (`checkpoints.load_model(kind="clip-text")`, its EMA
    parameters), word-tokenized with the CLIP's own vocabulary; the states are every position's output of the
    text tower after its final LayerNorm (`models.clip.ClipTextEncoder(return_states=True)`), mask True up to
    and including the end token.

Every distinct caption of the training split, and the empty caption (row 0), is encoded in batches of
`text_encoder.batch_size` by one jitted program (the last batch padded), before the train step is compiled.
The result lives in `text_encoder.cache_dir` (default W/text_states) under a key: sha256 of the encoder's
`util.fingerprint.params_fingerprint` (its parameters and config), the tokenizer (the CLIP's vocabulary or
the bytes of spiece.model), the token count, and the sorted caption set. A rerun, a resumed run, or another
run with the same encoder and captions (stage I and stage II on one dataset) reads the cache and never loads
the encoder's weights for encoding (it still reads them to fingerprint them). An entry is a directory
<key[:32]>/ with captions.json, states.npy (float32 [N, L, E]), mask.npy (bool [N, L]) and meta.json, which
is written last: an entry without it is incomplete and is recomputed.

The unCLIP tasks also need each caption's CLIP text embedding (the text tower's projected output, the
prior's proj_embedding and text_proj's text embedding): `text_states(..., embeddings=True)` stores it as
embeds.npy (float32 [N, D]) in an entry whose key also says so (IF's entries, without it, keep their keys),
and `gather` / `null` then also give "text_emb". The unCLIP tasks' image embeddings are cached alike by
`image_embeddings.py`, through the same multi-process protocol (`computed_once`).

The train step never sees the encoder: the input pipeline gathers the rows of each batch's captions on the
host (so the table need not fit on a device: IF's T5-XXL states are 77 x 4096 floats per caption), and the
step replaces dropped rows with `null()`. With several processes, process 0 fingerprints, computes and
writes; the others wait for it and read the entry (the workdir or cache_dir must be shared storage).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checkpoints, parallel
from jaxdiff.train.config import ConfigError, EncoderInfo, encoder_info
from jaxdiff.util import config as config_util
from jaxdiff.util import cpu, files
from jaxdiff.util.fingerprint import params_fingerprint

log = logging.getLogger(__name__)

CACHE_DIR = "text_states"  # default location, under the workdir
CACHE_VERSION = 1
META_FILE = "meta.json"


@dataclasses.dataclass
class Encoder:
    """A loaded frozen text encoder: `encode(captions) -> (states float32 [N, L, E], mask bool [N, L])`, and
    for a CLIP the text embeddings float32 [N, D] as a third element."""

    info: EncoderInfo
    fingerprint: str
    tokenizer_id: str
    encode: Callable[[Sequence[str]], tuple]


@dataclasses.dataclass
class TextStates:
    """The token states of a caption set: row i is the encoding of captions[i]; captions[0] is ""."""

    captions: tuple
    states: np.ndarray  # float32 [N, L, E] (memory-mapped when read from a local cache)
    mask: np.ndarray    # bool [N, L]
    key: str
    directory: str
    computed: bool      # computed by this call (False: read from the cache, or written by process 0)
    embeds: Optional[np.ndarray] = None  # float32 [N, D]: the CLIP text embeddings (entries made for unCLIP)

    def __post_init__(self):
        self.index = {c: i for i, c in enumerate(self.captions)}

    @property
    def length(self) -> int:
        return int(self.states.shape[1])

    @property
    def width(self) -> int:
        return int(self.states.shape[2])

    def rows(self, captions) -> np.ndarray:
        """int32 row of each caption (ValueError naming a caption the cache does not hold)."""
        try:
            return np.asarray([self.index[str(c)] for c in captions], np.int32)
        except KeyError as e:
            raise ValueError(f"caption {e.args[0]!r} has no cached text states in {self.directory} (the cache holds "
                             f"the {len(self.captions) - 1} captions of the training split)") from None

    def gather(self, captions) -> dict:
        """{"states": float32 [B, L, E], "mask": bool [B, L]} of a batch's captions (`cond_spec`), and
        "text_emb" float32 [B, D] when the entry holds the text embeddings."""
        rows = self.rows(captions)
        order = np.argsort(rows, kind="stable")  # sorted reads from a memory map, then back in batch order
        tables = {"states": (self.states, np.float32), "mask": (self.mask, bool)}
        if self.embeds is not None:
            tables["text_emb"] = (self.embeds, np.float32)
        out = {}
        for name, (table, dtype) in tables.items():
            out[name] = np.empty((len(rows),) + table.shape[1:], dtype)
            out[name][order] = table[rows[order]]
        return out

    def null(self) -> dict:
        """The empty caption's {"states": [L, E], "mask": [L]} (and "text_emb" [D]): what caption dropout puts
        in a row."""
        out = {"states": np.asarray(self.states[0], np.float32), "mask": np.asarray(self.mask[0], bool)}
        if self.embeds is not None:
            out["text_emb"] = np.asarray(self.embeds[0], np.float32)
        return out


# --- the encoders ------------------------------------------------------------------------------------------

def content_key(*parts) -> str:
    """sha256 hex digest of `parts` (bytes as they are, anything else as its str): a cache entry's key."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _batched(fn: Callable, tokenize: Callable, batch_size: int) -> Callable:
    """captions -> (states, mask[, embeddings]): `fn`'s outputs, called on batches of exactly batch_size rows
    (padded with "") and joined."""

    def encode(captions):
        captions = list(captions)
        parts = []
        for i in range(0, len(captions), batch_size):
            chunk = captions[i:i + batch_size]
            n = len(chunk)
            tokens, aux = tokenize(chunk + [""] * (batch_size - n))
            parts.append([np.asarray(a)[:n] for a in jax.device_get(fn(tokens, aux))])
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(len(parts[0])))

    return encode


def local_put(params):
    """The encoder's parameters on this process's first device (only this process encodes)."""
    return jax.device_put(params, jax.local_devices()[0])


def load_encoder(info: EncoderInfo, batch_size: int = 256) -> Encoder:
    """The frozen encoder of `info`, its fingerprint and a batched, jitted `encode`."""
    if info.kind == "clip":
        from jaxdiff.sample import toy_clip  # the same encoding as the unCLIP sweep's

        module, params, cfg = checkpoints.load_model(info.path, kind="clip-text")
        tok = toy_clip.word_tokenizer(info.vocab, info.path)
        n = info.length
        dev_params = local_put(params)
        apply = toy_clip.clip_text_fn(module, n)

        def tokenize(captions):
            try:
                return tok.tokens_and_lengths(captions, n)
            except ValueError as e:
                raise ConfigError(f"config.text_encoder (the CLIP {info.path}) cannot tokenize the captions: {e}") from None

        fingerprint = params_fingerprint(params, name="clip-text", config=cfg["model"])
        tokenizer_id = content_key("word", json.dumps(list(info.vocab)), n)
        return Encoder(info, fingerprint, tokenizer_id,
                       _batched(lambda t, a: apply(dev_params, t, a), tokenize, batch_size))
    from jaxdiff.convert.transformers import load_t5_folder
    from jaxdiff.data.t5_tokenizer import T5Tokenizer

    module, params, config = load_t5_folder(info.path)
    try:
        tok = T5Tokenizer(info.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.text_encoder.tokenizer={info.tokenizer!r}: {e}") from None
    if tok.vocab_size > config.vocab_size:
        raise ConfigError(f"config.text_encoder.tokenizer={info.tokenizer!r} has {tok.vocab_size} pieces, more than "
                          f"the T5 encoder's {config.vocab_size} token embeddings ({info.path}): not its tokenizer")
    n = info.length
    dev_params = local_put(params)

    @cpu.jit
    def apply(p, tokens, mask):
        return module.apply({"params": p}, tokens, mask).astype(jnp.float32), mask

    fingerprint = params_fingerprint(params, name="t5", config=config.to_dict())
    with open(info.tokenizer, "rb") as f:
        tokenizer_id = content_key("t5", hashlib.sha256(f.read()).hexdigest(), n)
    return Encoder(info, fingerprint, tokenizer_id,
                   _batched(lambda t, m: apply(dev_params, t, m), lambda c: tok.tokens_and_mask(c, n), batch_size))


# --- the caption set and the cache -------------------------------------------------------------------------

def caption_set(source) -> list:
    """"" then every distinct caption of the split, sorted."""
    captions = source.gather_text(np.arange(len(source)))[source.info.caption_key]
    return [""] + sorted({str(c) for c in captions} - {""})


def cache_key(encoder: Encoder, captions: Sequence[str], embeddings: bool = False) -> str:
    """The entry's key (sha256 hex); `embeddings` (entries that also hold the text embeddings) changes it."""
    return content_key(f"jaxdiff-text-states-v{CACHE_VERSION}", encoder.info.kind, encoder.fingerprint,
                       encoder.tokenizer_id, encoder.info.length, content_key(*captions),
                       *(("text-embeddings",) if embeddings else ()))


def cache_root(resolved, workdir) -> str:
    d = config_util.get(resolved.text_encoder, "cache_dir", "") or ""
    return os.path.expanduser(d) if d else os.path.join(os.fspath(workdir), CACHE_DIR)


def cache_path(*parts):
    """The joined path as a local or remote (gs://...) path object (`checkpoints.as_path`)."""
    return checkpoints.as_path(os.path.join(*[os.fspath(p) for p in parts]))


def load_npy(path, mmap: bool) -> np.ndarray:
    """A cached .npy array: memory-mapped when local and `mmap`, read whole from remote storage."""
    p = os.fspath(path)
    if "://" not in p:
        return np.load(p, mmap_mode="r" if mmap else None)
    return np.load(io.BytesIO(checkpoints.as_path(p).read_bytes()))


def read_meta(directory, key: Optional[str] = None) -> Optional[dict]:
    """A cache entry's meta.json (written last: its absence means an incomplete entry), or None when absent or
    written under another key than `key` (when given)."""
    meta_path = cache_path(directory, META_FILE)
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    return None if key is not None and meta.get("key") != key else meta


def read_entry(directory, key: Optional[str] = None) -> Optional[TextStates]:
    """The cached states in `directory` (None when absent or incomplete, or written under another key)."""
    meta = read_meta(directory, key)
    if meta is None:
        return None
    captions = tuple(json.loads(cache_path(directory, "captions.json").read_text()))
    states = load_npy(cache_path(directory, "states.npy"), True)
    mask = load_npy(cache_path(directory, "mask.npy"), True)
    embeds = load_npy(cache_path(directory, "embeds.npy"), True) if meta.get("embeddings") else None
    if (states.shape[0] != len(captions) or mask.shape != states.shape[:2]
            or (embeds is not None and embeds.shape[0] != len(captions))):
        raise ValueError(f"the text-state cache in {directory} is inconsistent ({len(captions)} captions, states "
                         f"{states.shape}, mask {mask.shape}); delete it to recompute")
    return TextStates(captions, states, mask, meta["key"], os.fspath(directory), computed=False, embeds=embeds)


def write_entry(directory, key: str, captions: Sequence[str], states: np.ndarray, mask: np.ndarray, meta: dict,
                embeds: Optional[np.ndarray] = None) -> None:
    """The entry's files, each written atomically, meta.json last (the entry is complete once it exists)."""
    d = os.fspath(directory)
    files.atomic_write(os.path.join(d, "captions.json"), json.dumps(list(captions)))
    files.atomic_write(os.path.join(d, "states.npy"), lambda f: np.save(f, np.ascontiguousarray(states, np.float32)))
    files.atomic_write(os.path.join(d, "mask.npy"), lambda f: np.save(f, np.ascontiguousarray(mask, bool)))
    if embeds is not None:
        files.atomic_write(os.path.join(d, "embeds.npy"), lambda f: np.save(f, np.ascontiguousarray(embeds, np.float32)))
    files.write_json(os.path.join(d, META_FILE), dict(meta, key=key, embeddings=embeds is not None))


def encode_all(encoder: Encoder, captions: Sequence[str]) -> tuple:
    """(states, mask[, text embeddings]) of every caption (one jitted, batched pass)."""
    return encoder.encode(captions)


def text_states(resolved, captions: Sequence[str], cache: str, *, encoder: Optional[Encoder] = None,
                embeddings: bool = False) -> TextStates:
    """The states of `captions` (captions[0] must be "") from the cache under `cache`, or computed now and
    written there; `embeddings`: also the CLIP text embeddings (a CLIP encoder only). Single-process: see
    `prepare` for the multi-process protocol."""
    if not captions or captions[0] != "":
        raise ValueError("captions[0] must be the empty caption")
    te = resolved.text_encoder
    info = encoder_info(resolved)
    if encoder is None:
        encoder = load_encoder(info, int(config_util.get(te, "batch_size", 256)))
    if embeddings and info.kind != "clip":
        raise ConfigError(f"config.text_encoder.kind={info.kind!r} has no text embeddings; allowed: clip")
    key = cache_key(encoder, captions, embeddings)
    directory = os.path.join(cache, key[:32])
    found = read_entry(directory, key)
    if found is not None:
        log.info("text states of %d captions read from the cache %s", len(captions), directory)
        return found
    t0 = time.time()
    outs = encode_all(encoder, captions)
    states, mask = outs[0], outs[1]
    embeds = outs[2] if embeddings else None
    longest = int(mask.sum(axis=1).max())
    if longest >= info.length:
        log.warning("some captions fill all %d tokens of the text encoder: longer ones were truncated", info.length)
    meta = {"version": CACHE_VERSION, "encoder": {"kind": info.kind, "path": info.path, "fingerprint": encoder.fingerprint,
                                                  "width": info.width, "length": info.length},
            "tokenizer": encoder.tokenizer_id, "captions": len(captions), "shape": list(states.shape),
            "seconds": round(time.time() - t0, 3)}
    write_entry(directory, key, captions, states, mask, meta, embeds)
    log.info("text states of %d captions computed in %.1f s and cached in %s", len(captions), time.time() - t0, directory)
    return TextStates(tuple(captions), states, mask, key, directory, computed=True, embeds=embeds)


def computed_once(compute: Callable[[], object], read: Callable[[str], object], what: str, cache: str):
    """`compute()` (-> an entry with `.key`) on one process, every other process then `read(key)`ing the entry
    it wrote (a collective with several processes; ConfigError on every process when process 0 failed or the
    others cannot read its entry)."""
    if jax.process_count() == 1:
        return compute()
    key, error = "", None
    if jax.process_index() == 0:
        try:
            key = compute().key
        except Exception as e:  # every process must reach the collective below, or the others hang
            error, key = e, "!"
    key = parallel.process_strings(key, max_len=80)[0]  # also a barrier: process 0 has written
    if error is not None:
        raise error
    if key == "!":
        raise ConfigError(f"process 0 failed to compute the {what} (its error says why)")
    out = read(key)
    if out is None:
        raise ConfigError(f"process {jax.process_index()} cannot read the {what} process 0 wrote in {cache}: "
                          "config.text_encoder.cache_dir (default W/text_states) must be on storage every host reads")
    return out


def prepare(resolved, source, workdir, *, embeddings: bool = False) -> TextStates:
    """The token states of every caption of the training split (`source`), for an IF task's run (`embeddings`:
    and the CLIP text embeddings, for the unCLIP tasks); checked against the model (width, token count). Every
    process calls it (a collective with several processes)."""
    captions = caption_set(source)
    cache = cache_root(resolved, workdir)
    out = computed_once(lambda: text_states(resolved, captions, cache, embeddings=embeddings),
                        lambda key: read_entry(os.path.join(cache, key[:32]), key), "text states", cache)
    L, E = int(resolved.text_encoder.max_length), int(resolved.text_encoder.width)
    if out.states.shape[1:] != (L, E):
        raise ConfigError(f"the cached text states in {out.directory} are {out.states.shape[1:]}, not ({L}, {E}) "
                          "as config.text_encoder gives")
    return out
