"""Evaluating models and samples: one command.

    python -m jaxdiff.eval samples --samples S.npz --classifier E [--split train] [--out m.json]
    python -m jaxdiff.eval accuracy --workdir W [--ts 0,100,500] [--split test]
    python -m jaxdiff.eval cfg --diffusion D --classifier E [--scale 3] [--steps 50] [--per_class 50]
    python -m jaxdiff.eval adm REF.npz SAMPLES.npz --inception W.npz [--mode tf1] [--out m.json]
    python -m jaxdiff.eval reference --dataset NAME --split train --inception W.npz --out REF.npz

`samples` (the default): FID, IS, precision/recall, density/coverage and class accuracy of a
samples.npz against a dataset split, in the feature space of a classifier trained on clean images
(`configs/*_eval_classifier.py`). `accuracy`: a classifier's top-1 accuracy on q_sample'd images
against t. `cfg`: the class accuracy of classifier-free-guided samples (DDIM). `adm`: guided-diffusion's
evaluator (IS, FID, sFID, precision, recall with the FID Inception-v3, `jaxdiff.eval.adm`).
`reference`: a reference batch in the evaluator's layout from a prepared tfds split. `adm` and
`reference` run on every device of every process. Every subcommand prints JSON; bad input is one
error line.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

import jax

from jaxdiff.eval.evaluation import cfg_accuracy, evaluate_npz, evaluate_workdir
from jaxdiff.util import files


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (see the module docstring); raises ValueError on bad input."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["samples"] + argv  # the default subcommand
    p = argparse.ArgumentParser(prog="python -m jaxdiff.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sm = sub.add_parser("samples", help="metrics of a samples.npz against a dataset split")
    sm.add_argument("--samples", required=True, help="samples.npz (arr_0 uint8 NHWC, arr_1 labels)")
    sm.add_argument("--classifier", required=True, help="workdir of the evaluation classifier")
    sm.add_argument("--dataset", default=None, help="dataset name (default: the classifier's)")
    sm.add_argument("--split", default="train", help="reference split (default: train)")
    sm.add_argument("--data_dir", default=None)
    sm.add_argument("--cache_dir", default=None, help="where reference statistics are cached")
    sm.add_argument("--k", type=int, default=3, help="neighbours for precision/recall (default 3)")
    ac = sub.add_parser("accuracy", help="classifier accuracy against t")
    ac.add_argument("--workdir", required=True)
    ac.add_argument("--split", default="test")
    ac.add_argument("--ts", default=None, help="comma-separated timesteps (default: a spread over T)")
    cf = sub.add_parser("cfg", help="class accuracy of classifier-free-guided samples")
    cf.add_argument("--diffusion", required=True)
    cf.add_argument("--classifier", required=True)
    cf.add_argument("--scale", type=float, default=3.0)
    cf.add_argument("--steps", type=int, default=50)
    cf.add_argument("--per_class", type=int, default=50)
    cf.add_argument("--seed", type=int, default=0)
    cf.add_argument("--step", type=int, default=None, help="diffusion checkpoint step (default: latest)")
    ad = sub.add_parser("adm", help="guided-diffusion's evaluator: IS, FID, sFID, precision, recall")
    ad.add_argument("ref", help="reference batch .npz (arr_0 uint8 NHWC; mu/sigma/mu_s/sigma_s used when present)")
    ad.add_argument("samples", help="samples .npz (arr_0 uint8 NHWC)")
    ad.add_argument("--distance", default="float16", choices=("float16", "float32"),
                    help="precision/recall distances (float16: the evaluator's)")
    rf = sub.add_parser("reference", help="a reference batch (evaluator layout) from a prepared tfds split")
    rf.add_argument("--dataset", required=True)
    rf.add_argument("--split", default="train")
    rf.add_argument("--data_dir", default=None)
    rf.add_argument("--num_images", type=int, default=10_000, help="images stored in arr_0")
    rf.add_argument("--stats_images", type=int, default=None, help="images the statistics use (default: all)")
    rf.add_argument("--image_size", type=int, default=None, help="resize to this size (default: as stored)")
    rf.add_argument("--seed", type=int, default=0)
    for sp in (ad, rf):
        sp.add_argument("--inception", required=True, help="FID Inception weights (python -m jaxdiff.convert.inception convert)")
        sp.add_argument("--mode", default="tf1", help="preprocessing: tf1 (the evaluator's) or pytorch_fid")
        sp.add_argument("--batch_size", type=int, default=256, help="global batch (a multiple of the device count)")
        sp.add_argument("--cache_dir", default=None, help="reference statistics cache (adm)")
        sp.add_argument("--coordinator_address", default=None, help="multi-process: HOST:PORT of process 0")
        sp.add_argument("--num_processes", type=int, default=1)
        sp.add_argument("--process_id", type=int, default=0)
    for sp in (sm, ac, cf, ad):
        sp.add_argument("--out", default=None, help="write the JSON here too")
    rf.add_argument("--out", required=True, help="the reference batch .npz to write")
    a = p.parse_args(argv)
    if a.cmd in ("adm", "reference"):
        result = _inception_command(a)
        if a.cmd == "adm":
            for key, name in (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
                              ("precision", "Precision"), ("recall", "Recall")):
                print(f"{name}: {result[key]}")
    elif a.cmd == "samples":
        result = evaluate_npz(a.samples, classifier_dir=a.classifier, dataset=a.dataset, split=a.split,
                              data_dir=a.data_dir, cache_dir=a.cache_dir, k=a.k)
    elif a.cmd == "accuracy":
        ts = None if a.ts is None else [int(v) for v in a.ts.split(",") if v.strip()]
        result = evaluate_workdir(a.workdir, split=a.split, ts=ts)
    else:
        result = cfg_accuracy(a.diffusion, a.classifier, scale=a.scale, steps=a.steps, per_class=a.per_class,
                              seed=a.seed, diffusion_step=a.step)
    if a.out and a.cmd != "reference":
        files.write_json(a.out, result)
    print(json.dumps(result, indent=1, default=float))
    return 0


def _inception_command(a) -> dict:
    """`adm` and `reference`: the FID Inception over every device of every process."""
    from jaxdiff import parallel
    from jaxdiff.convert import inception as convert_inception
    from jaxdiff.eval import adm as adm_eval
    from jaxdiff.eval import inception

    if a.num_processes > 1:  # (parallel.initialize selects the CPU collectives itself)
        parallel.initialize(a.coordinator_address, a.num_processes, a.process_id)
    params = convert_inception.load_params(a.inception)
    fn = inception.pure_feature_fn(a.mode)
    progress = jax.process_index() == 0
    if a.cmd == "adm":
        return adm_eval.evaluate(a.ref, a.samples, fn, params, mode=a.mode, batch_size=a.batch_size,
                                 cache_dir=a.cache_dir, distance=a.distance, progress=progress)
    return adm_eval.write_reference_batch(a.out, a.dataset, a.split, fn, params, num_images=a.num_images,
                                          stats_images=a.stats_images, seed=a.seed, mode=a.mode,
                                          image_size=a.image_size, data_dir=a.data_dir,
                                          batch_size=a.batch_size, progress=progress)


if __name__ == "__main__":
    from jaxdiff.util import cli

    cli.main_of(main, "python -m jaxdiff.eval")
