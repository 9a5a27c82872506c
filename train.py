"""Train a jaxdiff diffusion model or (noisy) classifier.

    python train.py --config configs/digits.py --workdir W [--config.train.steps=100]

`config.task` picks the task ("diffusion" or "classifier"); see jaxdiff/training.py. Rerunning the
same command resumes from the latest complete checkpoint in W/checkpoints. Multi-host: start one
process per host with --coordinator_address=HOST:PORT --num_processes=N --process_id=i.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl, samples/ and config.json")
flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0")
flags.DEFINE_integer("num_processes", 1, "multi-process: number of processes")
flags.DEFINE_integer("process_id", 0, "multi-process: index of this process")
flags.DEFINE_string("jax_cache_dir", "~/.cache/jaxdiff/xla",
                    "persistent XLA compilation cache (a restarted run skips compiling); '' = off. "
                    "$JAX_COMPILATION_CACHE_DIR wins when set")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    from absl import logging as absl_logging

    # orbax logs every save at INFO through absl; keep the console to the progress bar and warnings.
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    if FLAGS.jax_cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.jax_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if FLAGS.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from jaxdiff import parallel

        parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.getLogger("jaxdiff").setLevel(logging.INFO)
    from jaxdiff import training

    try:
        training.train(FLAGS.config, FLAGS.workdir)
    except (training.ConfigError, training.NonFiniteLossError) as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    from jaxdiff import cpu

    cpu.use_huge_page_malloc()  # re-executes once with glibc huge-page malloc (jaxdiff/cpu.py)
    app.run(main)
