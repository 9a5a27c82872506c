"""Evaluating models and samples as a library (the command: `python -m jaxdiff.eval`): samples against a
dataset split in a clean classifier's feature space (`evaluate`), a classifier's accuracy against t (also
training's periodic evaluation, `make_eval_fn`), the evaluation CLIP's score of captioned samples, and the
class accuracy of CFG samples."""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checkpoints
from jaxdiff.data import sources as data_sources
from jaxdiff.data import transforms
from jaxdiff.diffusion import gaussian as diffusion_lib
from jaxdiff.diffusion import schedules
from jaxdiff.eval import metrics
from jaxdiff.util import config as config_util
from jaxdiff.util import cpu
from jaxdiff.util import images as image_util


def load_classifier(workdir: str, what: str = "it"):
    """(module, params, config) of a trained classifier workdir; ValueError if it holds another kind."""
    module, params, cfg = checkpoints.load_model(workdir)
    config_util.require_kind(cfg, ("classifier",), what, workdir)
    return module, params, cfg


def _logits_fn(module):
    @cpu.jit
    def fn(params, x, t):
        return module.apply({"params": params}, x, t).astype(jnp.float32)

    return fn


def extractor_from_workdir(workdir: str, *, batch_size: int = 256) -> tuple[metrics.FeatureExtractor, dict]:
    """A FeatureExtractor from a trained classifier workdir (EMA weights), and that workdir's config.

    The classifier is evaluated at t = 0 (clean images); features are its penultimate representation
    (`return_features=True`), logits its class scores.
    """
    module, params, cfg = load_classifier(workdir, "the evaluation extractor (train configs/*_eval_classifier.py)")

    def feature_fn(p, x):
        t = jnp.zeros((x.shape[0],), jnp.int32)
        logits, feats = module.apply({"params": p}, x, t, return_features=True)
        return feats, logits

    extractor = metrics.classifier_extractor(
        None, params, feature_fn=feature_fn, batch_size=batch_size,
        name=f"classifier:{os.path.basename(os.path.normpath(workdir))}",
        config={"model": cfg["model"], "features": "penultimate", "t": 0})
    return extractor, cfg


def dataset_of(cfg: Mapping[str, Any]) -> dict:
    """The data settings (name, data_dir, image size, classes) a trained workdir's config was made with."""
    d = dict(cfg.get("data", {}))
    return {"name": d.get("name"), "data_dir": d.get("data_dir"),
            "image_size": cfg.get("model", {}).get("image_size"), "num_classes": config_util.model_classes(cfg)}


def reference_for(extractor: metrics.FeatureExtractor, *, dataset: str, split: str, image_size: int,
                  data_dir: Optional[str] = None, cache_dir: Optional[str] = None) -> metrics.FeatureStats:
    """Cached reference statistics (with features) of a dataset split at the model's image size."""
    cache_dir = cache_dir or os.path.join(data_dir or data_sources.default_data_dir(), "jaxdiff_reference_stats")
    return metrics.reference_stats(
        lambda: data_sources.load_split(dataset, split, data_dir, image_size=image_size)[0],
        extractor, cache_dir, f"{dataset}/{split}/{image_size}")


def evaluate(images: np.ndarray, labels: Optional[np.ndarray], *, classifier: str, dataset: Optional[str] = None,
             split: str = "train", data_dir: Optional[str] = None, cache_dir: Optional[str] = None,
             k: int = 3) -> dict:
    """FID, IS, precision/recall, density/coverage and accuracy of uint8 NHWC `images` (with their
    requested `labels`, or None) against a dataset split, in the feature space of the trained
    evaluation classifier in directory `classifier` (dataset, data_dir: the classifier's by default)."""
    extractor, cfg = extractor_from_workdir(classifier)
    ds = dataset_of(cfg)
    dataset = dataset or ds["name"]
    data_dir = data_dir or ds["data_dir"]
    images = image_util.validate_images(images)
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"samples must be square images, got {images.shape[1:3]}")
    ref = reference_for(extractor, dataset=dataset, split=split, image_size=images.shape[1],
                        data_dir=data_dir, cache_dir=cache_dir)
    if tuple(ref.image_shape) != tuple(images.shape[1:]):
        raise ValueError(f"samples have shape {images.shape[1:]} but {dataset}/{split} images are "
                         f"{tuple(ref.image_shape)}")
    result = metrics.evaluate_samples(images, labels, ref, extractor, num_classes=ds["num_classes"], k=k)
    result.update(dataset=dataset, split=split)
    return result


def evaluate_npz(samples_path: str, *, classifier_dir: str, **kwargs) -> dict:
    """`evaluate` on a guided-diffusion-layout samples.npz (arr_0 images, optional arr_1 labels)."""
    extractor_cfg = checkpoints.read_config(classifier_dir)
    images, labels = image_util.load_samples_npz(samples_path, num_classes=config_util.model_classes(extractor_cfg))
    result = evaluate(images, labels, classifier=classifier_dir, **kwargs)
    result.update(samples=os.path.abspath(samples_path))
    return result


def accuracy_vs_t(module, params, images, labels, sched: schedules.Schedule, ts: Sequence[int], *,
                  noised: bool = True, batch_size: int = 256, seed: int = 0, logits=None) -> dict:
    """{t: top-1 accuracy} of a classifier on x_t = q_sample(images, t) for each schedule index t.

    The noise of x_t is drawn from fold_in(fold_in(key(seed), t), batch start): the same every run.
    """
    images = jnp.asarray(images, jnp.float32)
    labels = np.asarray(labels)
    logits = logits or _logits_fn(module)
    key = jax.random.key(int(seed))
    out = {}
    for t in ts:
        t = int(t)
        if not 0 <= t < sched.num_steps:
            raise ValueError(f"timestep {t} is outside the schedule's 0..{sched.num_steps - 1}")
        correct = 0
        for start in range(0, len(labels), batch_size):
            x0 = images[start: start + batch_size]
            b = x0.shape[0]
            tt = jnp.full((b,), t, jnp.int32)
            if noised:
                noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, t), start), x0.shape)
                x = diffusion_lib.q_sample(sched, x0, tt, noise)
            else:
                x = x0
            pred = np.asarray(jnp.argmax(logits(params, x, sched.timestep_map[tt]), -1))
            correct += int(np.sum(pred == labels[start: start + b]))
        out[t] = correct / max(len(labels), 1)
    return out


def default_ts(num_timesteps: int) -> list:
    T = int(num_timesteps)
    return sorted({0, T // 10, T // 4, T // 2, (3 * T) // 4, T - 1})


def _accuracy_setup(cfg: Mapping, split: str, ts: Optional[Sequence[int]]):
    """(images in [-1, 1], labels, schedule, noised, ts) of a classifier config's evaluation."""
    images, labels = data_sources.load_split(cfg["data"]["name"], split, cfg["data"]["data_dir"],
                                     image_size=int(cfg["data"]["image_size"]))
    d = cfg["diffusion"]
    noised = bool(cfg["train"].get("noised", True))
    if ts is None:
        ts = default_ts(d["num_timesteps"]) if noised else [0]
    return (transforms.to_model_range(images), labels, schedules.make_schedule(d["schedule"], int(d["num_timesteps"])),
            noised, ts)


def clip_class_logits(module, cfg: Mapping) -> Any:
    """logits(params, x, t) [B, num_classes] of a trained CLIP (`models.ClipModel`, config `cfg`) used
    as a zero-shot classifier: cosine similarity of x_t with the caption naming each class alone
    ("a seven")."""
    from jaxdiff.data import captions
    from jaxdiff.sample import runner

    scheme = captions.scheme(cfg["data"]["name"])
    words = [captions.class_caption(scheme, c) for c in range(scheme.num_classes)]
    tokens, lengths = runner.tokenizer_for(cfg).tokens_and_lengths(words, int(cfg["model"]["max_text_len"]))

    @cpu.jit
    def fn(params, x, t):
        z_img, z_txt = _unit_embeddings(module, params, x, t, tokens, lengths)
        return z_img @ z_txt.T

    return fn


def _unit_embeddings(module, params, x, t, tokens, lengths) -> tuple:
    """A CLIP's (image, text) embeddings of x at t and of the tokens, float32 and of unit length."""
    from jaxdiff.diffusion.clip_guide import normalize

    z_img = module.apply({"params": params}, x, t, method="encode_image")
    z_txt = module.apply({"params": params}, tokens, lengths, method="encode_text")
    return normalize(z_img.astype(jnp.float32)), normalize(z_txt.astype(jnp.float32))


def make_eval_fn(resolved, module, split: Optional[str] = None, ts: Optional[Sequence[int]] = None):
    """fn(params) -> {"eval_acc_t<t>": accuracy} on the evaluation split, for the training loop: a
    classifier's accuracy, or a CLIP's zero-shot class accuracy (`clip_class_logits`)."""
    cfg = resolved.to_dict() if hasattr(resolved, "to_dict") else resolved
    images, labels, sched, noised, ts = _accuracy_setup(cfg, split or cfg["data"].get("eval_split") or "test", ts)
    logits = clip_class_logits(module, cfg) if cfg.get("task") == "clip" else _logits_fn(module)

    def fn(params):
        params = jax.device_get(params) if jax.process_count() == 1 else params
        acc = accuracy_vs_t(module, params, images, labels, sched, ts, noised=noised, logits=logits)
        return {f"eval_acc_t{t}": a for t, a in acc.items()}

    return fn


def evaluate_workdir(workdir: str, *, split: str = "test", ts: Optional[Sequence[int]] = None,
                     seed: int = 0) -> dict:
    """Accuracy against t of the classifier trained in `workdir` (EMA parameters)."""
    module, params, cfg = load_classifier(workdir, "--workdir")
    images, labels, sched, noised, ts = _accuracy_setup(cfg, split, ts)
    acc = accuracy_vs_t(module, params, images, labels, sched, ts, noised=noised, seed=seed)
    return {"workdir": workdir, "split": split, "step": cfg.get("step"), "noised": noised,
            "num_examples": int(len(labels)), "accuracy": {str(t): a for t, a in acc.items()}}


def clip_scorer(workdir: str, *, batch_size: int = 256):
    """score(uint8 NHWC images, captions) -> the mean cosine similarity x 100 between the clean
    (t = 0) image embeddings and the captions' embeddings of the CLIP trained in `workdir` (the
    evaluation CLIP, `configs/*_clip.py:eval`; EMA weights)."""
    from jaxdiff.sample import runner

    module, params, cfg = checkpoints.load_model(workdir)
    config_util.require_kind(cfg, ("clip",), "the evaluation CLIP (train configs/*_clip.py:eval)", workdir)
    tok = runner.tokenizer_for(cfg)
    n = int(cfg["model"]["max_text_len"])

    @cpu.jit
    def cosine(params, x, tokens, lengths):
        z_img, z_txt = _unit_embeddings(module, params, x, jnp.zeros((x.shape[0],), jnp.int32), tokens, lengths)
        return jnp.sum(z_img * z_txt, axis=-1)

    def score(images, captions: Sequence[str]) -> float:
        images = image_util.validate_images(images)
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        tokens, lengths = tok.tokens_and_lengths(list(captions), n)
        sims = [np.asarray(cosine(params, transforms.to_model_range(images[i: i + batch_size]),
                                  tokens[i: i + batch_size], lengths[i: i + batch_size]))
                for i in range(0, len(images), batch_size)]
        return 100.0 * float(np.mean(np.concatenate(sims)))

    return score


def cfg_accuracy(diffusion_dir: str, classifier_dir: str, *, scale: float = 3.0, steps: int = 50,
                 per_class: int = 50, seed: int = 0, batch_size: int = 250,
                 diffusion_step: Optional[int] = None) -> dict:
    """Fraction of CFG samples (DDIM `steps`, scale `scale`) classified as their requested class
    (EMA weights of the latest checkpoint, or of `diffusion_step`). Samples are quantised to uint8
    exactly as a samples.npz stores them before they are classified."""
    from jaxdiff.diffusion import guidance, guides, samplers
    from jaxdiff.sample import generation

    unet, uparams, ucfg = checkpoints.load_model(diffusion_dir, step=diffusion_step)
    config_util.require_kind(ucfg, ("unet",), "--diffusion", diffusion_dir)
    clf, cparams, ccfg = load_classifier(classifier_dir, "--classifier")
    d = ucfg["diffusion"]
    num_classes = int(ucfg["model"]["num_classes"])
    null = bool(ucfg["model"].get("null_label"))
    if not null and scale != 1.0:
        raise ValueError(f"{diffusion_dir} was trained without label dropout (p_uncond = 0): "
                         "it cannot do classifier-free guidance")
    sched = schedules.make_schedule(d["schedule"], int(d["num_timesteps"]), f"ddim{steps}")
    s = int(ucfg["model"]["image_size"])

    def build(p):
        return guidance.build_guides(("cfg",) if null else (), guides.unet_fn(unet, p),
                                     null_label=num_classes if null else None, learned_sigma=bool(d["learned_sigma"]))

    run = samplers.make_sampler(build, samplers.SamplerSpec(sampler="ddim", prediction=d["prediction"],
                                                            learned_sigma=bool(d["learned_sigma"])),
                                (s, s, int(ucfg["model"]["in_channels"])))
    y = np.repeat(np.arange(num_classes), per_class)
    t0 = time.time()
    images = generation.generate(run, uparams, sched, num_samples=len(y), labels=y,
                               scales={guides.CFG_SCALE: scale} if null else {}, seed=seed, batch_size=batch_size)
    logits = _logits_fn(clf)
    preds = np.concatenate([
        np.asarray(jnp.argmax(logits(cparams, transforms.to_model_range(images[i: i + batch_size]),
                                     jnp.zeros((len(images[i: i + batch_size]),), jnp.int32)), -1))
        for i in range(0, len(images), batch_size)])
    per = {int(c): float(np.mean(preds[y == c] == c)) for c in range(num_classes)}
    return {"accuracy": float(np.mean(preds == y)), "per_class": per, "scale": scale, "steps": steps,
            "num_samples": int(len(y)), "sample_seconds": time.time() - t0,
            "diffusion_step": ucfg.get("step"), "classifier_step": ccfg.get("step")}
