"""Guidance sweep: sample, evaluate and report FID / IS / precision / recall against the scale.

    python sweep.py --config configs/sweep_digits.py --config.out=reports/digits \
        --config.model=runs/digits/model --config.classifier=runs/digits/classifier \
        --config.eval_classifier=runs/digits/eval_classifier

Writes OUT/results.md and OUT/results.json (one row per setting), the plots OUT/fid_vs_is.png,
OUT/precision_vs_recall.png and OUT/accuracy_vs_scale.png, and OUT/settings/<setting>/ with the
samples.npz and labelled grid of each setting.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxdiff import parallel
from jaxdiff.util import cli

config_flags.DEFINE_config_file("config", None, "sweep config (configs/sweep_*.py)", lock_config=True)
parallel.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.setup_from_flags()
    from jaxdiff.eval import sweep

    sys.exit(cli.report_errors(lambda: sweep.run_sweep(flags.FLAGS.config), "sweep.py"))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
