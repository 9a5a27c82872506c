"""Sample from a trained (or converted guided-diffusion) model, with optional guidance.

    python sample.py --config configs/sample.py --config.model=W --config.out=OUT \
        [--config.classifier=C] --config.sample.sampler=ddim|ddpm|dpmpp2m \
        --config.sample.steps=50 --config.sample.eta=0 \
        --config.sample.guidance=none|classifier|cfg|cfg,classifier|autoguidance|clip \
        --config.sample.scale=3 --config.sample.classifier_scale=1 \
        --config.sample.classes=all|3,5 --config.sample.num_samples=64 \
        --config.sample.batch_size=16 --config.sample.seed=0
    python sample.py --config configs/sample.py --config.model=UPSAMPLER --config.low_res=OUT/samples.npz \
        --config.sample.sampler=ddpm --config.sample.steps=250 --config.sample.num_samples=N
    python sample.py --config configs/sample.py --config.model=TEXT_MODEL --config.sample.captions='a thick seven|a thin one' \
        --config.sample.guidance=cfg,clip --config.clip_image=CLIP --config.clip_text=CLIP   # docs/text.md
    python sample.py --config configs/sample.py --config.pipeline=if --config.prompts=PROMPTS.txt \
        --config.stages=IF-I-XL-v1.0,IF-II-L-v1.0 --config.text_encoder=IF-I-XL-v1.0/text_encoder \
        --config.tokenizer=IF-I-XL-v1.0/tokenizer/spiece.model --config.out=OUT   # docs/cascade.md: OUT/stage1, OUT/stage2
    python sample.py --config configs/sample.py --config.pipeline=unclip --config.prompts=PROMPTS.txt \
        --config.unclip.folder=karlo-v1-alpha --config.out=OUT   # docs/unclip.md: OUT/prior, OUT/decoder, OUT/super_res

Writes OUT/samples.npz (guided-diffusion's evaluator layout: arr_0 uint8 NHWC images, arr_1 int
labels for class-conditional models), atomically, and a labelled PNG grid OUT/grid.png. Every
setting is validated before anything is compiled. The same seed gives the same images with any
batch size and any number of devices or hosts (sample i uses noise from fold_in(seed, i)).
Guides registered by your own module: `--config configs/sample.py:my_module` imports it first.
Multi-host: one process per host with --coordinator_address=HOST:PORT --num_processes=N --process_id=i.

Resumable: each process writes its rows to OUT/shards/ as it goes; rerunning the same command after
an interruption generates only the missing samples, then OUT/samples.npz is merged in sample-id
order and the shards deleted. Other settings into the same OUT are refused, naming what differs.
OUT must be on a filesystem every host sees; with per-host disks, copy every host's OUT/shards/
into one and run `python -m jaxdiff.sample merge OUT` (jaxdiff.sample's doc has the layout).
Compiled programs are cached in --jax_cache_dir, so a rerun skips compiling.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxdiff import parallel
from jaxdiff.util import cli

config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                                       "sample.py"),
                                "ml_collections sampling config (configs/sample.py)", lock_config=True)
parallel.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.setup_from_flags()
    from jaxdiff.sample import runner

    def report(res):
        if not res["npz"]:
            return
        if res["generated"] == 0:
            print(f"{res['npz']} already holds these settings' {res['num_samples']} samples: nothing to do")
            return
        resumed = res["batches"] - res["generated"]
        print(f"wrote {res['npz']} ({res['num_samples']} images"
              + (f"; sampled {res['generated']} of {res['batches']} batches, {resumed} were already in its shards/"
                 if resumed else "") + ")" + (f" and {res['grid']}" if res["grid"] else ""))

    def run():
        res = runner.run(flags.FLAGS.config, shards=True)
        for stage in res.get("stages", [res]):  # a cascade (config.pipeline) reports each stage
            report(stage)

    sys.exit(cli.report_errors(run, "sample.py"))


if __name__ == "__main__":
    app.run(main)
