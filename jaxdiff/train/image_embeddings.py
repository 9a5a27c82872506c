"""The frozen CLIP's image embedding of every training example, for the unCLIP tasks: computed once and cached
on disk beside the text states (`text_states.py`, whose cache root, helpers and multi-process protocol it uses).

    table = prepare(resolved, source, workdir)     # ImageEmbeddings: row i = example i of the training split
    table.gather(indices)                          # float32 [B, D], the rows of a batch's examples
    table.stats()                                  # (mean [D], std [D]) over the split: the prior's clip_mean / std

The encoder is the image tower of the "clip" workdir config.text_encoder.path (its EMA parameters,
`checkpoints.load_model(kind="clip-image")`) at t = 0, on every stored image of the split in the model range
[-1, 1] at config.data.image_size (as the input pipeline decodes them, never flipped: the unCLIP tasks refuse
augmentation), in batches of text_encoder.batch_size by one jitted program. An entry is the directory
<cache>/image_<key[:32]>/ with embeddings.npy (float32 [N, D]) and meta.json (written last); the key is sha256
of the image tower's `params_fingerprint`, the dataset, split, image size and the bytes of every image.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checkpoints
from jaxdiff.data.sources import check_resize
from jaxdiff.data.transforms import resize_images, to_model_range
from jaxdiff.train.config import ConfigError
from jaxdiff.train.text_states import (
    META_FILE,
    cache_path,
    cache_root,
    computed_once,
    content_key,
    load_npy,
    local_put,
    read_meta,
)
from jaxdiff.util import config as config_util
from jaxdiff.util import cpu, files
from jaxdiff.util.fingerprint import params_fingerprint

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclasses.dataclass
class ImageEmbeddings:
    """The CLIP image embeddings of a split: row i is example i."""

    table: np.ndarray  # float32 [N, D]
    key: str
    directory: str
    computed: bool     # computed by this call (False: read from the cache)

    def gather(self, indices) -> np.ndarray:
        """float32 [B, D]: the embeddings of these examples."""
        return np.asarray(self.table[np.asarray(indices, np.int64)], np.float32)

    def stats(self) -> tuple:
        """(mean [D], std [D]) float32 over the split (std floored at 1e-6): diffusers' clip_mean / clip_std."""
        t = np.asarray(self.table, np.float64)
        return t.mean(0).astype(np.float32), np.maximum(t.std(0), 1e-6).astype(np.float32)


def split_images(source, image_size: int) -> np.ndarray:
    """float32 [N, S, S, C] in [-1, 1]: every image of the split as the input pipeline gives it (unflipped)."""
    info = source.info
    images, _ = source.gather(np.arange(len(source)))
    return to_model_range(resize_images(images, image_size, check_resize(info, image_size, None), info.pad_value))


def read_entry(directory, key: Optional[str] = None) -> Optional[ImageEmbeddings]:
    """The cached embeddings in `directory` (None when absent, incomplete or under another key)."""
    meta = read_meta(directory, key)
    if meta is None:
        return None
    return ImageEmbeddings(load_npy(cache_path(directory, "embeddings.npy"), True), meta["key"], os.fspath(directory),
                           computed=False)


def _encoder(path: str, batch_size: int):
    """(fingerprint, encode(images [N, S, S, C]) -> float32 [N, D]) of the CLIP's image tower at t = 0."""
    module, params, cfg = checkpoints.load_model(path, kind="clip-image")
    dev = local_put(params)

    @cpu.jit
    def apply(p, x):
        return module.apply({"params": p}, x, jnp.zeros((x.shape[0],), jnp.int32)).astype(jnp.float32)

    def encode(images):
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            n = len(chunk)
            pad = np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)
            out.append(np.asarray(jax.device_get(apply(dev, np.concatenate([chunk, pad]))))[:n])
        return np.concatenate(out)

    return params_fingerprint(params, name="clip-image", config=cfg["model"]), encode


def encode_all(encode, images: np.ndarray) -> np.ndarray:
    """float32 [N, D]: the image tower's embeddings of every image (one jitted, batched pass)."""
    return encode(images)


def image_embeddings(resolved, source, cache: str) -> ImageEmbeddings:
    """The embeddings of every example of `source` from the cache under `cache`, or computed and written there
    (single-process; `prepare` runs it on process 0 only)."""
    te = resolved.text_encoder
    size = int(resolved.data.image_size)
    images = split_images(source, size)
    fingerprint, encode = _encoder(str(te.path), int(config_util.get(te, "batch_size", 256)))
    info = source.info
    key = content_key(f"jaxdiff-image-embeddings-v{CACHE_VERSION}", fingerprint, info.name, resolved.data.split,
                      size, len(images), content_key(np.ascontiguousarray(images).tobytes()))
    directory = os.path.join(cache, f"image_{key[:32]}")
    found = read_entry(directory, key)
    if found is not None:
        log.info("CLIP image embeddings of %d examples read from the cache %s", len(images), directory)
        return found
    t0 = time.time()
    table = encode_all(encode, images)
    files.atomic_write(os.path.join(directory, "embeddings.npy"), lambda f: np.save(f, np.ascontiguousarray(table)))
    files.write_json(os.path.join(directory, META_FILE), {
        "version": CACHE_VERSION, "key": key, "encoder": {"path": str(te.path), "fingerprint": fingerprint},
        "data": {"name": info.name, "split": resolved.data.split, "image_size": size}, "shape": list(table.shape),
        "seconds": round(time.time() - t0, 3)})
    log.info("CLIP image embeddings of %d examples computed in %.1f s and cached in %s", len(images),
             time.time() - t0, directory)
    return ImageEmbeddings(table, key, directory, computed=True)


def prepare(resolved, source, workdir) -> ImageEmbeddings:
    """The image embeddings of the training split for an unCLIP task's run, checked against the CLIP's width
    (every process calls it: a collective with several processes)."""
    cache = cache_root(resolved, workdir)
    out = computed_once(lambda: image_embeddings(resolved, source, cache),
                        lambda key: read_entry(os.path.join(cache, f"image_{key[:32]}"), key),
                        "CLIP image embeddings", cache)
    d = int(resolved.text_encoder.embed_dim)
    if out.table.shape != (len(source), d):
        raise ConfigError(f"the cached image embeddings in {out.directory} are {out.table.shape}, not "
                          f"({len(source)}, {d})")
    return out
