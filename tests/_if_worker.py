"""Helper program of tests/test_if_training.py: the IF tasks' runs on digits_text (tiny models, a few steps),
each with LLVM -O0 and the session's persistent compilation cache.

    _if_worker.py stage1 DATA_DIR ROOT   a tiny CLIP (ROOT/clip, 2 steps), then "if_text2im" on its text tower's
                                         states (cached in ROOT/text_cache): ROOT/if1_ref uninterrupted, then
                                         ROOT/if1 SIGKILLed at step KILL_AT (its checkpoint of step 4 complete)
    _if_worker.py stage2 DATA_DIR ROOT   "if_superres" 8 -> 16 on the states of the T5 folder ROOT/t5 (cached in
                                         each workdir's text_states/): ROOT/if2_ref, then ROOT/if2 SIGKILLed alike
    _if_worker.py resume1 DATA_DIR ROOT  reruns ROOT/if1 (resuming from step 4) to the end; resume2: ROOT/if2

Each mode writes ROOT/<mode>.json (the killed runs just before they die): per run, how many times it computed
the text states (calls of `text_states.encode_all`; 0 = read from the cache).
"""

import json
import sys
from pathlib import Path

import _training_helpers as H

from jaxdiff.train import config as train_config
from jaxdiff.train import loop as training
from jaxdiff.train import text_states

STEPS = 8          # checkpoints at 4 and 8, metrics every 2 steps
KILL_AT = 6        # the killed runs die right after step 6 is dispatched
CHECKPOINT_EVERY = 4


def clip_config(data_dir: str):
    c = train_config.default_config("clip")
    c.data.update(name="digits_text", data_dir=data_dir)
    c.model.update(n_embd=16, patch_size=4, n_head_image=1, n_head_state_image=16, n_xf_blocks_image=1,
                   n_head_text=1, n_head_state_text=32, n_xf_blocks_text=1, max_text_len=6)  # text width 32
    c.diffusion.num_timesteps = 50
    c.train.update(batch_size=8, steps=2, warmup_steps=1, log_every=2, checkpoint_every=2, async_checkpointing=False)
    return c


def if_config(task: str, data_dir: str, root) -> "train_config.ml_collections.ConfigDict":
    """The tiny IF runs: two levels of 32 channels, one layer each, one 32-wide attention head."""
    root = Path(root)
    c = train_config.default_config(task)
    c.data.update(name="digits_text", data_dir=str(data_dir))
    c.model.update(block_out_channels=(32, 32), attention_head_dim=32)
    if task == "if_text2im":
        c.text_encoder.update(kind="clip", path=str(root / "clip"), cache_dir=str(root / "text_cache"))
    else:
        c.data.image_size = 16
        c.superres.low_res = 8
        c.text_encoder.update(kind="t5", path=str(root / "t5"))  # spiece.model in the same folder
    c.diffusion.num_timesteps = 100
    c.train.update(batch_size=16, steps=STEPS, lr=2e-3, warmup_steps=1, log_every=2,
                   checkpoint_every=CHECKPOINT_EVERY, keep=3)
    return c


class Counter:
    """Counts `text_states.encode_all` calls (the states computed, not read from the cache)."""

    def __init__(self):
        self.calls = 0
        self.orig = text_states.encode_all
        text_states.encode_all = self

    def __call__(self, *a, **k):
        self.calls += 1
        return self.orig(*a, **k)


def run(cfg, workdir, counter, report: dict, name: str, out: Path, kill: bool = False) -> None:
    """train() in `workdir`; report[name] = how many times it computed text states; `out` gets the report.
    kill: SIGKILL this process right after step KILL_AT is dispatched, once checkpoint 4 is complete."""
    before = counter.calls

    def last_words(step):
        report[name] = {"computed": counter.calls - before, "killed_at": step}
        out.write_text(json.dumps(report))

    hook = H.sigkill_hook(workdir, KILL_AT, CHECKPOINT_EVERY, last_words) if kill else None
    training.train(cfg, str(workdir), step_hook=hook)
    report[name] = {"computed": counter.calls - before}
    out.write_text(json.dumps(report))


def main(mode: str, data_dir: str, root: str) -> None:
    root = Path(root)
    counter = Counter()
    report = {}
    out = root / f"{mode}.json"
    if mode in ("resume1", "resume2"):
        task, name = {"resume1": ("if_text2im", "if1"), "resume2": ("if_superres", "if2")}[mode]
        run(if_config(task, data_dir, root), root / name, counter, report, name, out)
        return
    if mode == "stage1":
        training.train(clip_config(data_dir), str(root / "clip"))
    task, name = {"stage1": ("if_text2im", "if1"), "stage2": ("if_superres", "if2")}[mode]
    cfg = if_config(task, data_dir, root)
    run(cfg, root / f"{name}_ref", counter, report, f"{name}_ref", out)
    run(cfg, root / name, counter, report, name, out, kill=True)
    raise SystemExit(f"{name} was not killed")


if __name__ == "__main__":
    main(*sys.argv[1:])
