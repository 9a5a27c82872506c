"""Train a jaxdiff model: diffusion model, (noisy) classifier, text-conditional model or CLIP.

    python train.py --config configs/digits.py --workdir W [--config.train.steps=100]

`config.task` picks the task ("diffusion", "classifier", "text2im", "clip", "if_text2im", "if_superres",
"unclip_prior", "unclip_decoder"); see jaxdiff/train/. Rerunning the
same command resumes from the latest complete checkpoint in W/checkpoints; SIGTERM / Ctrl-C saves
the current step and exits 0. Multi-host: start one process per host with the same workdir (shared
storage or gs://); TPU pods, SLURM, Open MPI and Kubernetes are detected (--distributed=auto),
elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=i. Big models:
--config.mesh.fsdp, --config.train.grad_accum_steps, --config.model.use_checkpoint (docs/training.md).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxdiff import parallel
from jaxdiff.util import cli

config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl, samples/ and config.json")
parallel.define_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.setup_from_flags()
    from jaxdiff.train import config as train_config
    from jaxdiff.train import loop as training

    sys.exit(cli.report_errors(lambda: training.train(FLAGS.config, FLAGS.workdir), "train.py",
                               (train_config.ConfigError, training.NonFiniteLossError), status=1))


if __name__ == "__main__":
    app.run(main)
