"""Helper program of tests/test_unclip_training.py: the unCLIP tasks' runs on digits_text (tiny networks, a few
steps), each with LLVM -O0 and the session's persistent compilation cache.

    _unclip_worker.py prior DATA_DIR ROOT    a tiny clean CLIP (ROOT/clip_prior, 2 steps), then "unclip_prior" on
                                             its embeddings (cached in ROOT/cache_prior): ROOT/prior_ref
                                             uninterrupted, then ROOT/prior SIGKILLed at step KILL_AT (its
                                             checkpoint of step CHECKPOINT_EVERY complete)
    _unclip_worker.py decoder DATA_DIR ROOT  the same CLIP (ROOT/clip_decoder), "unclip_decoder" alike (cache in
                                             each workdir's text_states/): ROOT/decoder_ref, then ROOT/decoder killed
    _unclip_worker.py resume_prior / resume_decoder DATA_DIR ROOT   reruns ROOT/prior / ROOT/decoder to the end

Each mode writes ROOT/<mode>.json (the killed runs just before they die): per run, how many times it computed
the text states and the image embeddings (0 = read from the cache).
"""

import json
import sys
from pathlib import Path

import _training_helpers as H

from jaxdiff.train import config as train_config
from jaxdiff.train import image_embeddings, text_states
from jaxdiff.train import loop as training

STEPS = 8          # checkpoints at 4 and 8, metrics every 2 steps
KILL_AT = 6        # the killed runs die right after step 6 is dispatched
CHECKPOINT_EVERY = 4


def clip_config(data_dir: str):
    """A tiny clean CLIP whose embeddings are as wide as its token states (32), as unCLIP needs."""
    c = train_config.default_config("clip")
    c.data.update(name="digits_text", data_dir=str(data_dir))
    c.model.update(n_embd=32, patch_size=4, n_head_image=1, n_head_state_image=16, n_xf_blocks_image=1,
                   n_head_text=1, n_head_state_text=32, n_xf_blocks_text=1, max_text_len=6)
    c.train.update(batch_size=8, steps=2, warmup_steps=1, log_every=2, checkpoint_every=2, async_checkpointing=False,
                   noised=False)
    return c


def unclip_config(task: str, data_dir: str, clip: str, cache_dir: str = ""):
    """The tiny unCLIP runs: a 1-layer prior of width 32; a decoder of one 32-channel level with cross-attention."""
    c = train_config.default_config(task)
    c.data.update(name="digits_text", data_dir=str(data_dir))
    c.text_encoder.update(kind="clip", path=str(clip), cache_dir=str(cache_dir))
    if task == "unclip_prior":
        c.model.update(num_attention_heads=1, attention_head_dim=32, num_layers=1)
    else:
        c.model.decoder.update(block_out_channels=(32,), down_block_types=("SimpleCrossAttnDownBlock2D",),
                               up_block_types=("SimpleCrossAttnUpBlock2D",), attention_head_dim=32,
                               cross_attention_dim=32)
    c.diffusion.num_timesteps = 100
    c.train.update(batch_size=16, steps=STEPS, lr=3e-3, warmup_steps=1, log_every=2,
                   checkpoint_every=CHECKPOINT_EVERY, keep=3)
    return c


class Counter:
    """Counts calls of a module function (the text states / image embeddings computed, not read)."""

    def __init__(self, module, name):
        self.calls, self.orig = 0, getattr(module, name)
        setattr(module, name, self)

    def __call__(self, *a, **k):
        self.calls += 1
        return self.orig(*a, **k)


def run(cfg, workdir, counters, report: dict, name: str, out: Path, kill: bool = False) -> None:
    """train() in `workdir`; report[name] = what it computed; `out` gets the report. kill: SIGKILL this process
    right after step KILL_AT is dispatched, once checkpoint CHECKPOINT_EVERY is complete."""
    before = {k: c.calls for k, c in counters.items()}

    def computed():
        return {k: c.calls - before[k] for k, c in counters.items()}

    def last_words(step):
        report[name] = dict(computed(), killed_at=step)
        out.write_text(json.dumps(report))

    hook = H.sigkill_hook(workdir, KILL_AT, CHECKPOINT_EVERY, last_words) if kill else None
    training.train(cfg, str(workdir), step_hook=hook)
    report[name] = computed()
    out.write_text(json.dumps(report))


def main(mode: str, data_dir: str, root: str) -> None:
    root = Path(root)
    counters = {"texts": Counter(text_states, "encode_all"), "images": Counter(image_embeddings, "encode_all")}
    report = {}
    out = root / f"{mode}.json"
    which = mode.replace("resume_", "")
    task = f"unclip_{which}"
    clip = root / f"clip_{which}"
    cfg = unclip_config(task, data_dir, clip, str(root / "cache_prior") if which == "prior" else "")
    if mode.startswith("resume_"):
        run(cfg, root / which, counters, report, which, out)
        return
    training.train(clip_config(data_dir), str(clip))
    run(cfg, root / f"{which}_ref", counters, report, f"{which}_ref", out)
    run(cfg, root / which, counters, report, which, out, kill=True)
    raise SystemExit(f"{which} was not killed")


if __name__ == "__main__":
    main(*sys.argv[1:])
