"""Sample from a trained (or converted guided-diffusion) model, with optional guidance.

    python sample.py --config configs/sample.py --config.model=W --config.out=OUT \
        [--config.classifier=C] --config.sample.sampler=ddim|ddpm|dpmpp2m \
        --config.sample.steps=50 --config.sample.eta=0 \
        --config.sample.guidance=none|classifier|cfg|both|autoguidance \
        --config.sample.scale=3 --config.sample.classifier_scale=1 \
        --config.sample.classes=all|3,5 --config.sample.num_samples=64 \
        --config.sample.batch_size=16 --config.sample.seed=0

Writes OUT/samples.npz (guided-diffusion's evaluator layout: arr_0 uint8 NHWC images, arr_1 int
labels for class-conditional models), atomically, and a labelled PNG grid OUT/grid.png. Every
setting is validated before anything is compiled. The same seed gives the same images with any
batch size and any number of devices (sample i uses noise from fold_in(seed, i)).
Multi-host: one process per host with --coordinator_address=HOST:PORT --num_processes=N --process_id=i.
"""

from __future__ import annotations

import os
import sys

from jaxdiff.sampling import run


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def main(argv):
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = _flags().FLAGS
    if FLAGS.num_processes > 1:
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from jaxdiff import parallel

        parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        res = run(FLAGS.config)
    except (ValueError, FileNotFoundError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if res["npz"]:
        print(f"wrote {res['npz']} ({len(res['images'])} images)" + (f" and {res['grid']}" if res["grid"] else ""))


def _flags():
    from absl import flags
    from ml_collections import config_flags

    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                               "configs", "sample.py"),
                                        "ml_collections sampling config (configs/sample.py)", lock_config=True)
        flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0")
        flags.DEFINE_integer("num_processes", 1, "multi-process: number of processes")
        flags.DEFINE_integer("process_id", 0, "multi-process: index of this process")
    return flags


if __name__ == "__main__":
    from absl import app

    from jaxdiff import cpu

    cpu.use_huge_page_malloc()  # re-executes once with glibc huge-page malloc (jaxdiff/cpu.py)

    _flags()
    app.run(main)
