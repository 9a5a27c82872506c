"""The guidance sweep: sample with no guidance, classifier guidance and CFG over lists of scales
(and sampler step counts), evaluate each setting, and write a table, plots and one grid per setting.

Text-conditional models (a "text2im" workdir) are swept over captions: sample i gets the caption of
example i of a deterministic draw from `caption_split` (`text_prompts`); each setting also reports
the attribute accuracy of the named attributes (`jaxdiff.data.captions`' oracle; chance 1/3) and the
evaluation CLIP's score (`eval_clip`: mean cosine x 100 of samples and captions). CFG over text uses
the empty caption as its null condition; "clip" guides with the noised CLIP (`clip_image`, `clip_text`).

unCLIP beside them (`unclip_prior_scales` x `unclip_decoder_scales`, the workdirs `unclip_prior`,
`unclip_decoder` and their clean CLIP `unclip_clip`): each caption through the prior (CFG s_p) and the decoder
(CFG s_d) (`jaxdiff.sample.unclip_toy`), one curve per prior scale over the decoder's scales (guidance
"unclip_prior<s_p>", scale s_d, prior_scale s_p, sampler "unclip", steps the decoder's), the same metrics.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterator

import ml_collections
import numpy as np

from jaxdiff.diffusion import guidance
from jaxdiff.eval import evaluation, report
from jaxdiff.sample import unclip_toy

EXTRACTORS = ("classifier", "inception")
SWEPT = {"classifier": (0.25, 1.0, 4.0), "cfg": (0.0, 1.5, 3.0, 5.0)}  # the default sweep's scales
# A captioned dataset's text model has no labels for a classifier to guide towards: CFG over text
# and CLIP guidance instead.
SWEPT_TEXT = {"cfg": (0.0, 1.5, 3.0), "clip": (1.0, 3.0)}


def default_config(dataset: str = "digits") -> ml_collections.ConfigDict:
    """Every sweep setting with its default; configs/sweep_*.py start from this.

    One `<guide>_scales` list per registered guide (empty: not swept) and one path key per
    network a guide needs, so a guide registered before this is called can be swept by name.
    """
    c = ml_collections.ConfigDict()
    c.model = f"runs/{dataset}/model"
    c.classifier = f"runs/{dataset}/classifier"
    for g in guidance.GUIDES.values():
        for net in g.networks:
            if net not in c:
                c[net] = ""
    text = dataset.endswith("_text")
    if text:
        c.clip_image = c.clip_text = f"runs/{dataset}/clip"
    c.eval_classifier = f"runs/{dataset}/eval_classifier"
    c.eval_clip = f"runs/{dataset}/eval_clip" if text else ""  # text models: configs/*_clip.py:eval
    c.caption_split = "test"    # text models: the split the samples' captions are drawn from
    c.out = f"reports/{dataset}"
    c.extractor = "classifier"  # metrics' features: "classifier" (eval_classifier) or "inception" (RGB images)
    c.inception = ""            # extractor "inception": the FID Inception weights (python -m jaxdiff.convert.inception convert)
    c.inception_mode = "tf1"
    c.reference_batch = ""      # extractor "inception": reference batch .npz (python -m jaxdiff.eval reference)
    c.cache_dir = ""            # reference statistics cache ("" = under the tfds data_dir / none for inception)
    c.reference_split = "train"
    c.sampler = "ddpm"          # ancestral: the sampler Dhariwal & Nichol guide with a classifier
    c.steps = (50,)             # one curve per step count
    c.eta = 0.0
    for name in guidance.GUIDES:
        c[f"{name}_scales"] = (SWEPT_TEXT if text else SWEPT).get(name, ())
    c.unclip_prior = c.unclip_decoder = c.unclip_clip = ""  # unCLIP workdirs (configs/digits_unclip_*.py)
    c.unclip_prior_scales = ()    # unCLIP rows: every prior scale x every decoder scale (CFG, Imagen convention)
    c.unclip_decoder_scales = ()
    c.unclip_steps = unclip_toy.STEPS  # (prior, decoder) sampling steps
    c.num_samples = 400
    c.batch_size = 200
    c.seed = 0
    c.k = 3
    c.progress = False
    c.grid_max = 50
    return c


def swept_guides(cfg) -> list[str]:
    """The registered guides the sweep config gives scales for."""
    return [name for name in guidance.GUIDES if cfg.get(f"{name}_scales")]


UNCLIP = "unclip"  # the unCLIP rows' sampler; their guidance is unclip_guidance(prior scale)
UNCLIP_WORKDIRS = {"unclip_prior": "unCLIP prior", "unclip_decoder": "unCLIP decoder",
                   "unclip_clip": "unCLIP's clean CLIP"}


def unclip_guidance(prior_scale: float) -> str:
    """The guidance name of the unCLIP rows at one prior scale: one curve each over the decoder's scales."""
    return f"unclip_prior{float(prior_scale):g}"


def has_unclip(cfg) -> bool:
    """Whether the sweep config asks for unCLIP rows."""
    return bool(cfg.get("unclip_prior_scales") or cfg.get("unclip_decoder_scales"))


def settings(cfg) -> Iterator[dict]:
    """Every (guidance, scale, sampler, steps) the sweep config asks for, unguided first, unCLIP's last."""
    for steps in cfg.steps:
        yield dict(guidance="none", scale=float("nan"), sampler=cfg.sampler, steps=int(steps))
        for name in swept_guides(cfg):
            for s in cfg[f"{name}_scales"]:
                yield dict(guidance=name, scale=float(s), sampler=cfg.sampler, steps=int(steps))
    if has_unclip(cfg):
        for sp in cfg.unclip_prior_scales:
            for sd in cfg.unclip_decoder_scales:
                yield dict(guidance=unclip_guidance(sp), scale=float(sd), prior_scale=float(sp), sampler=UNCLIP,
                           steps=int(cfg.unclip_steps[1]))


def validate(cfg) -> None:
    """Refuse a bad sweep config before anything is loaded or compiled."""
    extractor = cfg.get("extractor", "classifier")
    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor={extractor!r}; allowed: {', '.join(EXTRACTORS)}")
    needed = ("model", "out") + (("eval_classifier",) if extractor == "classifier" else ("inception", "reference_batch"))
    for key in needed:
        if not cfg.get(key):
            raise ValueError(f"sweep config needs {key!r} (got {cfg.get(key)!r})")
    for name in swept_guides(cfg):
        for net in guidance.GUIDES[name].networks:
            if not cfg.get(net):
                raise ValueError(f"{name}_scales given but no {guidance.NETWORK_NAMES.get(net, net)} workdir "
                                 f"(config.{net})")
    if not cfg.steps or any(int(s) < 1 for s in cfg.steps):
        raise ValueError(f"steps must be a non-empty list of positive integers, got {list(cfg.steps)}")
    for name in guidance.GUIDES:
        for s in cfg.get(f"{name}_scales") or ():
            if not math.isfinite(float(s)):
                raise ValueError(f"{name}_scales must be finite numbers, got {list(cfg[f'{name}_scales'])}")
    if int(cfg.num_samples) < 2:
        raise ValueError(f"num_samples must be >= 2, got {cfg.num_samples}")
    if has_unclip(cfg):
        _validate_unclip(cfg)


def _validate_unclip(cfg) -> None:
    for key in ("unclip_prior_scales", "unclip_decoder_scales"):
        scales = list(cfg.get(key) or ())
        if not scales or not all(math.isfinite(float(s)) for s in scales):
            raise ValueError(f"unCLIP rows need finite {key} (prior x decoder scales), got {scales}")
    for key, what in UNCLIP_WORKDIRS.items():
        if not cfg.get(key):
            raise ValueError(f"unCLIP rows need the {what} workdir (config.{key})")
    steps = list(cfg.get("unclip_steps") or ())
    if len(steps) != 2 or any(int(s) < 2 for s in steps):
        raise ValueError(f"unclip_steps must be (prior steps, decoder steps), each >= 2, got {steps}")


def text_prompts(model_cfg, split: str, n: int, seed: int) -> dict:
    """The captions of a text model's n samples: examples 0..n-1 of the stream order of `split` of the
    model's captioned dataset (`data.global_batch_indices` with `seed`: a fixed permutation, repeated
    when n exceeds the split). Returns captions (list of str), labels (int (n,)), requested (int
    (n, A): the bins asked for, -1 where not named), the caption scheme and its thresholds."""
    from jaxdiff.data import captions
    from jaxdiff.data import order as data_order
    from jaxdiff.data import sources as data_sources

    d = model_cfg["data"]
    source, info = data_sources.make_source(d["name"], split, d.get("data_dir"))
    idx = data_order.global_batch_indices(0, global_batch_size=int(n), num_examples=len(source), seed=int(seed))
    text = source.gather_text(idx)
    scheme, thresholds = captions.from_metadata(info.captions)
    return dict(captions=[str(c) for c in text[info.caption_key]], labels=source.gather(idx)[1].astype(np.int64),
                requested=captions.requested_bins(text["attributes"], text["named"]), scheme=scheme,
                thresholds=thresholds)


def text_metrics(prompts: dict, clip_score: Callable) -> Callable[[np.ndarray], dict]:
    """images -> {"attribute_accuracy": over every named (sample, attribute), "attribute_accuracy/<a>"
    per attribute, "clip_score": the evaluation CLIP's score} of samples made from `prompts`."""
    from jaxdiff.data import captions

    named = prompts["requested"] >= 0
    names = prompts["scheme"].attribute_names

    def fn(images) -> dict:
        acc = captions.attribute_accuracy(prompts["scheme"], prompts["thresholds"], images, prompts["labels"],
                                          prompts["requested"])
        counts = named.sum(axis=0)
        pooled = sum(acc[a] * c for a, c in zip(names, counts) if c) / max(int(counts.sum()), 1)
        return {"attribute_accuracy": float(pooled), **{f"attribute_accuracy/{a}": acc[a] for a in names},
                "clip_score": clip_score(images, prompts["captions"])}

    return fn


def setting_name(row: dict) -> str:
    """The setting's folder name, e.g. cfg_s3_ddpm50, unclip_prior4_s3_unclip50."""
    scale = "" if row["guidance"] == "none" else f"_s{row['scale']:g}"
    return f"{row['guidance']}{scale}_{row['sampler']}{row['steps']}"


def sample_config(cfg, row: dict, out: str, captions=None) -> ml_collections.ConfigDict:
    """A sample.py config for one sweep setting (`captions`: a text model's, one per sample)."""
    from jaxdiff.sample import runner

    c = runner.default_config()
    c.model, c.out = cfg.model, out
    for g in guidance.GUIDES.values():
        for net in g.networks:
            c[net] = cfg.get(net, "")
    s = c.sample
    s.sampler, s.steps, s.eta = row["sampler"], row["steps"], float(cfg.eta)
    s.num_samples, s.batch_size, s.seed = int(cfg.num_samples), int(cfg.batch_size), int(cfg.seed)
    s.classes, s.progress, s.grid_max = "all", bool(cfg.progress), int(cfg.grid_max)
    if captions is not None:
        s.captions = "|".join(captions)
    s.guidance = row["guidance"]
    if row["guidance"] != "none":
        s[guidance.GUIDES[row["guidance"]].config_scale] = row["scale"]
    return c


def _classifier_metrics(cfg, model_cfg) -> Callable[[dict], dict]:
    """Per-setting metrics in the evaluation classifier's feature space against a dataset split."""
    from jaxdiff.eval import metrics

    extractor, ecfg = evaluation.extractor_from_workdir(cfg.eval_classifier)
    ds = evaluation.dataset_of(ecfg)
    ref = evaluation.reference_for(extractor, dataset=ds["name"], split=cfg.reference_split,
                                   image_size=int(model_cfg["model"]["image_size"]), data_dir=ds["data_dir"],
                                   cache_dir=cfg.get("cache_dir") or None)
    metrics.check_full_rank(int(cfg.num_samples), int(ref.mu.shape[0]), "the sweep's samples (config.num_samples)")
    return lambda res: metrics.evaluate_samples(res["images"], res["labels"], ref, extractor,
                                                num_classes=ds["num_classes"], k=int(cfg.k))


def _inception_metrics(cfg, model_cfg) -> Callable[[dict], dict]:
    """Per-setting metrics of guided-diffusion's evaluator (FID Inception) against a reference batch."""
    from jaxdiff.convert import inception as convert_inception
    from jaxdiff.eval import adm as adm_eval
    from jaxdiff.eval import inception

    if int(model_cfg["model"]["in_channels"]) != 3:
        raise ValueError(f"extractor='inception' needs RGB images; the model makes "
                         f"{model_cfg['model']['in_channels']}-channel ones (use extractor='classifier')")
    params = convert_inception.load_params(cfg.inception)
    fn = inception.pure_feature_fn(cfg.inception_mode)
    def evaluate(res: dict) -> dict:
        import jax

        if jax.process_count() > 1:  # process 0 wrote the file (a shared filesystem): wait for it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxdiff.eval.sweep.samples_written")
        return adm_eval.evaluate(cfg.reference_batch, res["npz_path"], fn, params, mode=cfg.inception_mode,
                                 cache_dir=cfg.get("cache_dir") or None, k=int(cfg.k), progress=False)

    return evaluate


def run_sweep(cfg) -> list[dict]:
    """Run every setting; the table and plots are rewritten after each, so partial runs keep results."""
    validate(cfg)
    from jaxdiff import checkpoints
    from jaxdiff.sample import runner

    if has_unclip(cfg):  # config.json files only: refused before any weight is read or anything compiled
        mcfg = checkpoints.read_config(cfg.model)
        if not runner.is_text_model(mcfg):
            raise ValueError(f"unCLIP rows are swept over a text model's captions; config.model={cfg.model!r} is "
                             "not a text model")
        unclip_toy.check_workdirs(cfg.unclip_prior, cfg.unclip_decoder, cfg.unclip_clip,
                                  names=[f"config.{k}={cfg[k]!r}" for k in UNCLIP_WORKDIRS],
                                  image_size=int(mcfg["model"]["image_size"]), data_name=mcfg["data"]["name"])
    model = checkpoints.load_model(cfg.model)
    networks = {net: runner.load(cfg[net], net=net) for net in
                {n for g in swept_guides(cfg) for n in guidance.GUIDES[g].networks}}
    evaluate = (_inception_metrics if cfg.get("extractor") == "inception" else _classifier_metrics)(cfg, model[2])
    prompts, extra = None, None
    if runner.is_text_model(model[2]):
        if not cfg.get("eval_clip"):
            raise ValueError("a text model's sweep needs the evaluation CLIP workdir (config.eval_clip, "
                             "configs/*_clip.py:eval)")
        prompts = text_prompts(model[2], cfg.get("caption_split", "test"), int(cfg.num_samples), int(cfg.seed))
        extra = text_metrics(prompts, evaluation.clip_scorer(cfg.eval_clip))
    nets = (unclip_toy.load_workdirs(cfg.unclip_prior, cfg.unclip_decoder, cfg.unclip_clip)
            if has_unclip(cfg) else None)
    os.makedirs(cfg.out, exist_ok=True)
    rows, compiled, unclip_compiled = [], {}, {}
    for row in settings(cfg):
        out = os.path.join(cfg.out, "settings", setting_name(row))
        t0 = time.perf_counter()
        if row["sampler"] == UNCLIP:
            res = unclip_toy.sample(nets, prompts["captions"], prior_scale=row["prior_scale"],
                                    decoder_scale=row["scale"], num_samples=int(cfg.num_samples),
                                    batch_size=int(cfg.batch_size), seed=int(cfg.seed), steps=cfg.unclip_steps,
                                    out=out, grid_max=int(cfg.grid_max), compiled=unclip_compiled)
        else:
            res = runner.run(sample_config(cfg, row, out, prompts and prompts["captions"]), model=model,
                             networks=networks, compiled=compiled)
        seconds = time.perf_counter() - t0
        if prompts is not None:
            res = dict(res, labels=prompts["labels"])
        m = evaluate(dict(res, npz_path=os.path.join(out, "samples.npz")))
        if extra is not None:
            m.update(extra(res["images"]))
        row = dict(row, **m, seconds=round(seconds, 2), grid=os.path.relpath(res["grid"], cfg.out)
                   if res.get("grid") else None)
        rows.append(row)
        print(f"[sweep] {setting_name(row)}: " + " ".join(
            f"{name} {m[key]:.3f}" for key, name in (("fid", "FID"), ("inception_score", "IS"), ("precision", "P"),
                                                     ("recall", "R"), ("accuracy", "acc"),
                                                     ("attribute_accuracy", "attr"), ("clip_score", "CLIP"))
            if key in m)
              + f" ({seconds:.1f} s)", flush=True)
        report.write_table(rows, cfg.out)
        report.write_plots(rows, cfg.out)
    return rows
