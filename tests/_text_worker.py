"""Helper program of tests/test_text_training.py: every text task's short run, a resume, and a text
sweep in ONE process (LLVM -O0 and a persistent compilation cache: each program is compiled once).

    _text_worker.py DATA_DIR ROOT OUT.json

1. train() 4 steps of a tiny "text2im" model (checkpoints at 2 and 4), 2 steps of a noised "clip"
   (with its zero-shot evaluation) and 2 of a clean classifier on the digits.
2. A copy of the text2im workdir without its step-4 checkpoint, resumed from step 2 to 4.
3. A text sweep (CFG over captions and CLIP guidance, 2 DDPM steps) of those models; the noised CLIP
   also serves as the evaluation CLIP (the sweep reads it at t = 0).
OUT.json: the sweep's rows (the runs' checkpoints and metrics.jsonl are in ROOT/<name>).
"""

import json
import shutil
import sys
from pathlib import Path

from jaxdiff.eval import sweep
from jaxdiff.train import config as train_config
from jaxdiff.train import loop as training

N = 40  # samples of the sweep (more than the tiny classifier's 32 features, for FID)


def _config(task: str, data_dir: str, **train):
    c = train_config.default_config(task)
    c.data.update(name="digits" if task == "classifier" else "digits_text", data_dir=data_dir)
    if task == "clip":
        c.model.update(n_embd=16, patch_size=4, n_head_image=1, n_head_state_image=16, n_xf_blocks_image=1,
                       n_head_text=1, n_head_state_text=16, n_xf_blocks_text=1, max_text_len=6)
    else:
        c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(1,) if task == "text2im" else (),
                       channel_mult=(1,), num_head_channels=32, resblock_updown=False)
    if task == "text2im":
        c.model.update(text_ctx=6, xf_width=16, xf_layers=1, xf_heads=1)
    if task == "classifier":
        c.model.pool = "adaptive"
    c.diffusion.num_timesteps = 50
    c.train.update(dict(batch_size=8, steps=2, warmup_steps=1, log_every=2, checkpoint_every=2, keep=3,
                        sample_every=0, async_checkpointing=False), **train)
    return c


def main(data_dir: str, root: str, out: str) -> None:
    root = Path(root)
    runs = {"text": _config("text2im", data_dir, steps=4), "clip": _config("clip", data_dir, sample_every=2),
            "eval_classifier": _config("classifier", data_dir, noised=False)}
    for name, cfg in runs.items():
        training.train(cfg, str(root / name))
    resumed = root / "resumed"
    shutil.copytree(root / "text", resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    training.train(runs["text"], str(resumed))
    cfg = sweep.default_config("digits_text")
    cfg.update(dict(model=str(root / "text"), clip_image=str(root / "clip"), clip_text=str(root / "clip"),
                    eval_clip=str(root / "clip"), eval_classifier=str(root / "eval_classifier"),
                    out=str(root / "report"), cache_dir=str(root / "refcache"), classifier_scales=(),
                    cfg_scales=(0.0, 3.0), clip_scales=(2.0,), steps=(2,), num_samples=N, batch_size=N, grid_max=4))
    Path(out).write_text(json.dumps(sweep.run_sweep(cfg)))


if __name__ == "__main__":
    main(*sys.argv[1:])
