"""unCLIP from this repository's trained workdirs (docs/unclip_training.md): the "unclip_prior" and
"unclip_decoder" tasks' networks and their clean CLIP pair, sampled caption -> prior (CFG s_p) -> decoder
(CFG s_d) by `unclip`'s jitted stage samplers over every device (`generation.generate`).

    nets = load_workdirs(prior_dir, decoder_dir, clip_dir)        # checked from config.json files first
    res = sample(nets, captions, prior_scale=4.0, decoder_scale=3.0, steps=(25, 50), num_samples=300,
                 batch_size=300, seed=0, out="OUT")                # OUT/samples.npz, OUT/grid.png

The captions are encoded by the CLIP's text tower exactly as the training runs encoded theirs (`toy_clip`).
Sample i takes caption i % P and draws the prior's noise from fold_in(fold_in(seed, 0), i) and the decoder's from
fold_in(fold_in(seed, 1), i), as `unclip_run` does: the same images in any batch size and on any device count.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from jaxdiff.diffusion import guides
from jaxdiff.diffusion.conditioning import PROMPT_KEY
from jaxdiff.sample import toy_clip, unclip
from jaxdiff.sample.generation import check_process_split, generate

STEPS = (25, 50)  # (prior, decoder) sampling steps by default: Karlo's prior count, the text sweep's count


class ToyUnclip(NamedTuple):
    """The loaded networks: prior, text_proj and decoder as (module, params, config) triples, and the CLIP's
    text tower (`toy_clip.ClipText`)."""

    prior: Any
    text_proj: Any
    decoder: Any
    clip: toy_clip.ClipText


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_configs(prior: dict, decoder: dict, clip: dict, *, names=("prior", "decoder", "clip"),
                  image_size: Optional[int] = None, data_name: Optional[str] = None) -> None:
    """Refuse workdir configs (config.json dicts) that do not make one unCLIP: the wrong kinds, CLIP widths or
    token counts that differ from the prior's and text_proj's, a schedule other than unCLIP's (cosine, 1000
    steps), a decoder of another image size or dataset than `image_size` / `data_name`. `names` say the workdirs
    in the messages. ValueError."""
    pn, dn, cn = names
    kinds = [(pn, prior, "prior", "unclip_prior"), (dn, decoder, "unclip_decoder", "unclip_decoder")]
    for name, cfg, kind, task in kinds:
        got = dict(cfg.get("model", {})).get("kind")
        _require(got == kind, f"{name} is a {got!r} workdir; expected a workdir of the {task!r} task (model kind "
                              f"{kind!r})")
    try:
        toy_clip.clip_vocab(clip)
    except ValueError as e:
        raise ValueError(f"{cn} is {e}: unCLIP's text encoder is the clean CLIP pair "
                         "(configs/digits_clip.py:unclip)") from None
    cm, pm = clip["model"], prior["model"]
    tp, dec = decoder["model"]["text_proj"], decoder["model"]["decoder"]
    d, length = int(cm["n_embd"]), int(cm["max_text_len"])
    width = int(cm["n_head_text"]) * int(cm.get("n_head_state_text", 64))
    _require(int(pm["embedding_proj_dim"]) == d and int(pm["embedding_dim"]) == width
             and int(pm["num_embeddings"]) == length,
             f"{pn} takes CLIP text embeddings of width {pm['embedding_proj_dim']} and token states "
             f"[{pm['num_embeddings']}, {pm['embedding_dim']}], but the CLIP {cn} gives {d} and [{length}, {width}]")
    _require(int(pm["clip_embed_dim"]) == int(tp["clip_embeddings_dim"]),
             f"{pn} makes CLIP image embeddings of width {pm['clip_embed_dim']}, but {dn} takes "
             f"{tp['clip_embeddings_dim']}: the prior and the decoder must share one CLIP")
    _require(int(tp["clip_embeddings_dim"]) == d == width,
             f"{dn} takes CLIP embeddings and token states of width {tp['clip_embeddings_dim']}, but the CLIP {cn} "
             f"gives embeddings of width {d} and token states of width {width}")
    for name, cfg in ((pn, prior), (dn, decoder)):
        diff = cfg.get("diffusion", {})
        _require(diff.get("schedule") == unclip.SCHEDULE and int(diff.get("num_timesteps", 0)) == unclip.NUM_TIMESTEPS,
                 f"{name} was trained on the {diff.get('schedule')!r} schedule of {diff.get('num_timesteps')} steps; "
                 f"unCLIP samples on the {unclip.SCHEDULE!r} one of {unclip.NUM_TIMESTEPS}")
    if image_size is not None:
        _require(int(dec["sample_size"]) == int(image_size),
                 f"{dn} makes {dec['sample_size']}x{dec['sample_size']} images; the sweep's other models and its "
                 f"evaluation make {image_size}x{image_size}")
    if data_name is not None:
        for name, cfg in ((pn, prior), (dn, decoder)):
            got = dict(cfg.get("data", {})).get("name")
            _require(got == data_name, f"{name} was trained on {got!r}; the sweep's captions are {data_name!r}'s")


def _same_clip(cfg: dict, clip_dir: str, name: str, clip_name: str) -> None:
    """The CLIP a workdir was trained with (its config's text_encoder.path) is `clip_dir`, when that path exists."""
    trained = str(dict(cfg.get("text_encoder", {})).get("path", "") or "")
    if trained and os.path.isdir(trained) and os.path.realpath(trained) != os.path.realpath(clip_dir):
        raise ValueError(f"{name} was trained with the CLIP {trained}, not {clip_name}")


def check_workdirs(prior: str, decoder: str, clip: str, *, names: Optional[Sequence[str]] = None,
                   image_size: Optional[int] = None, data_name: Optional[str] = None) -> None:
    """`check_configs` of three workdirs from their config.json files only (nothing loaded or compiled), and the
    prior and decoder trained with this CLIP. ValueError / FileNotFoundError."""
    from jaxdiff import checkpoints

    names = tuple(names or (f"the prior {prior}", f"the decoder {decoder}", clip))
    cfgs = [checkpoints.read_config(p) for p in (prior, decoder, clip)]
    check_configs(*cfgs, names=names, image_size=image_size, data_name=data_name)
    for cfg, name in zip(cfgs[:2], names[:2]):
        _same_clip(cfg, clip, name, names[2])


def load_workdirs(prior: str, decoder: str, clip: str, **check) -> ToyUnclip:
    """The networks of the three workdirs (EMA parameters), checked first (`check_workdirs`)."""
    from jaxdiff import checkpoints

    check_workdirs(prior, decoder, clip, **check)
    p, d = checkpoints.load_unclip(prior), checkpoints.load_unclip(decoder)
    return ToyUnclip(p["prior"], d["text_proj"], d["decoder"], toy_clip.load_clip_text(clip))


def _cached(compiled: Optional[dict], key, make):
    if compiled is None:
        return make()
    if key not in compiled:
        compiled[key] = make()
    return compiled[key]


def sample(nets: ToyUnclip, captions: Sequence[str], *, prior_scale: float, decoder_scale: float,
           num_samples: int, batch_size: int, seed: int = 0, steps: Sequence[int] = STEPS,
           out: Optional[str] = None, grid_max: int = 50, compiled: Optional[dict] = None) -> dict:
    """Sample i from caption i % P through the prior (CFG `prior_scale`) and the decoder (CFG `decoder_scale`),
    in the Imagen convention (1 = conditional). `compiled`: a dict kept across calls with the same nets and
    captions (a sweep), so the text table and both stage programs are made once. Writes OUT/samples.npz (images,
    captions) and OUT/grid.png on process 0 when `out` is given. Returns {"images" uint8 [N, H, W, C],
    "embeddings" float32 [N, D] (the prior's, post-processed), "labels": None, "captions", "npz", "grid",
    "num_samples"} as `runner.run`."""
    import jax

    from jaxdiff.util import files

    captions = [str(c) for c in captions]
    n, bs, p = int(num_samples), int(batch_size), len(captions)
    ps, ds = (int(s) for s in steps)
    _require(n >= 1 and bs >= 1 and p >= 1, f"num_samples={n}, batch_size={bs} and {p} captions must be >= 1")
    _require(2 <= ps <= unclip.NUM_TIMESTEPS and 2 <= ds <= unclip.NUM_TIMESTEPS,
             f"steps={tuple(steps)}: each stage takes 2..{unclip.NUM_TIMESTEPS} steps")
    for what, s in (("prior", prior_scale), ("decoder", decoder_scale)):
        guides.check_scale(f"the {what}'s CFG scale", float(s))
    check_process_split(n, bs)
    text = _cached(compiled, ("text", tuple(captions)), lambda: tuple(toy_clip.text_table(nets.clip, captions)))
    prior_fn, prior_sched = _cached(compiled, ("prior", p, ps), lambda: unclip.prior_sampler(nets.prior[0], p, ps))
    decoder_fn, decoder_sched = _cached(compiled, ("decoder", p, ds),
                                        lambda: unclip.decoder_sampler(nets.text_proj[0], nets.decoder[0], p, ds))
    rows = (np.arange(n) % p).astype(np.int32)
    key = jax.random.key(int(seed))
    embeddings = generate(prior_fn, {"model": nets.prior[1], "text": text}, prior_sched, num_samples=n,
                          batch_size=bs, per_sample={PROMPT_KEY: rows}, scales={guides.CFG_SCALE: float(prior_scale)},
                          key=jax.random.fold_in(key, 0), convert=lambda x: unclip.post_process(nets.prior[1], x))
    params = {"model": nets.decoder[1], "text_proj": nets.text_proj[1], "text": text}
    images = generate(decoder_fn, params, decoder_sched, num_samples=n, batch_size=bs,
                      per_sample={PROMPT_KEY: rows, unclip.IMAGE_EMBED_KEY: embeddings},
                      scales={guides.CFG_SCALE: float(decoder_scale)}, key=jax.random.fold_in(key, 1))
    sample_captions = [captions[r] for r in rows]
    result = {"images": images, "embeddings": embeddings, "labels": None, "captions": sample_captions, "npz": None,
              "grid": None, "num_samples": n}
    if out is not None and jax.process_index() == 0:
        result["npz"] = files.save_npz(os.path.join(out, "samples.npz"), images, captions=sample_captions)
        if grid_max > 0:
            result["grid"] = files.save_grid(os.path.join(out, "grid.png"), images[:min(n, grid_max)])
    return result


__all__ = ["STEPS", "ToyUnclip", "check_configs", "check_workdirs", "load_workdirs", "sample"]
