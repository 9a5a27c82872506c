"""Orbax checkpointing of train states, resume, and loading trained models for sampling.

A workdir written by `train.py` looks like::

    W/config.json        the resolved config (derived values filled in)
    W/checkpoints/<step>/ one orbax checkpoint per kept step (a `TrainState`)
    W/metrics.jsonl      one JSON line per log interval
    W/samples/           PNG grids
    W/<network>/config.json  the unCLIP tasks: each network's diffusers config.json (`write_unclip_configs`)

W may be a local directory or a URL etils.epath understands (gs://bucket/run): paths go through
`as_path`, never os.path.abspath, which would mangle a URL.

Checkpoints are written with `ocp.CheckpointManager` (every process calls `save` / `restore`;
asynchronous where the backend allows). A step is written to a temporary directory and renamed
when complete, so a run killed while saving leaves the last complete checkpoint as the latest. The
manager keeps the last `keep` steps plus the best one (lowest training loss before the save).

Sharded train states restore into whatever shardings the abstract state passed to `restore`
carries (another mesh, device count, one device). `save` stores a small JSON `custom_metadata`
with the step (the training loop's data stream position), read back by `step_metadata`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
BEST_METRIC = "loss"


def as_path(directory: Union[str, os.PathLike]) -> epath.Path:
    """An epath.Path: URLs (gs://...) as given, local paths made absolute (orbax wants that)."""
    text = os.fspath(directory)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _best_loss(metrics: Mapping[str, Any]) -> float:
    value = float(metrics[BEST_METRIC])
    return value if np.isfinite(value) else float("inf")


def make_manager(directory: str, *, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, best_fn: Callable[[Mapping], float] = _best_loss,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A `CheckpointManager` over `directory` keeping the last `keep` steps (and the best one).

    `best_fn(metrics)` ranks checkpoints (lower is better); `save` must then be given `metrics`
    (a dict with at least "loss" for the default). `async_save` writes in a background thread
    after the device-to-host copy; `wait_until_finished()` / `close()` join it.
    """
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1 (number of recent checkpoints kept), got {keep!r}")
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best:
        policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=best_fn, reverse=True, n=1))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # best_fn / best_mode make orbax store the metrics with each step and answer best_step().
        best_fn=best_fn if keep_best else None,
        best_mode="min",
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(as_path(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: Mapping[str, float] | None = None, *, force: bool = True,
         custom_metadata: Mapping[str, Any] | None = None) -> bool:
    """Save `state` as step `step` (on every process). Returns whether a save was started.

    An existing step is not rewritten; process 0's view of that decides for every process, so
    no process enters orbax's collective save alone.
    """
    from jaxdiff import parallel

    if metrics is not None:
        metrics = {k: float(v) for k, v in metrics.items()}
    if parallel.broadcast_from_first(int(step) in manager.all_steps()):
        return False
    return manager.save(int(step), args=ocp.args.StandardSave(state), metrics=metrics, force=force,
                        custom_metadata=dict(custom_metadata or {}))


def step_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    """The `custom_metadata` saved with `step` ({} for checkpoints written without it)."""
    meta = manager.metadata(int(step))
    return dict(getattr(meta, "custom_metadata", None) or {})


def abstract_like(tree: Any) -> Any:
    """jax.ShapeDtypeStruct (with sharding) for every array of `tree` (e.g. from jax.eval_shape)."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree_util.tree_map(leaf, tree)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """Restore step `step` into the structure, dtypes and shardings of `abstract_state`."""
    return manager.restore(int(step), args=ocp.args.StandardRestore(abstract_like(abstract_state)))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, int | None]:
    """(state, step) of the latest complete checkpoint, or (None, None) when there is none."""
    step = manager.latest_step()
    if step is None:
        return None, None
    return restore(manager, step, abstract_state), step


# --- loading a trained model for sampling -----------------------------------------------------

def _normalise_converted_diffusion(d: Mapping[str, Any]) -> dict:
    """guided-diffusion flag names -> jaxdiff's (schedule, num_timesteps, prediction, learned_sigma)."""
    d = dict(d)
    out = {}
    out["schedule"] = d.pop("noise_schedule", d.pop("schedule", "linear"))
    out["num_timesteps"] = int(d.pop("diffusion_steps", d.pop("num_timesteps", 1000)))
    if "prediction" in d:
        out["prediction"] = d.pop("prediction")
    else:
        out["prediction"] = "x0" if d.pop("predict_xstart", False) else "eps"
    out["learned_sigma"] = bool(d.pop("learn_sigma", d.pop("learned_sigma", False)))
    d.pop("predict_xstart", None)
    out.update(d)  # anything else (timestep_respacing, rescale_learned_sigmas, ...) as given
    return out


def read_config(directory: str) -> dict:
    path = as_path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: load_model needs a workdir written by train.py (or a directory "
            "written by jaxdiff.convert)")
    return json.loads(path.read_text())


def load_model(directory: str, *, step: int | None = None, ema: bool = True, dtype: str | None = None,
               kind: str | None = None):
    """(module, params, config) of a trained workdir or of a converted checkpoint (guided-diffusion, GLIDE,
    a diffusers U-Net or a transformers T5 encoder).

    Trained workdir: the EMA parameters (``ema=False``: the raw ones) of the latest checkpoint (or
    `step`), restored on the host; `config` is the resolved training config as a dict ("model": the
    `create_model` flags plus "kind"; "diffusion": schedule, num_timesteps, prediction,
    learned_sigma). A converted checkpoint ("source": "guided-diffusion" or "glide") is loaded by
    `jaxdiff.convert.converted.load_converted`, its diffusion flags renamed to the same keys. A converted
    diffusers / transformers model folder ("source": "diffusers" / "transformers"; kind "unet2d_condition",
    "unet2d" or "t5_encoder") comes back as load_converted gives it: config {"kind", "model": the folder's
    config.json, "source"}, float32 params, the module computing in `dtype` (default float32). `dtype`
    overrides the compute dtype (else a converted use_fp16 checkpoint computes in bfloat16). `kind`
    "clip-image" / "clip-text" picks that encoder of a trained CLIP (config["model"] = its kwargs +
    "kind"); "text_proj" / "unet2d_condition" picks that network of an "unclip_decoder" workdir (its parameter
    subtree "text_proj" / "decoder"; config["model"] = its config.json fields + "kind" (+ "dtype")); otherwise
    it is ignored (callers check the kind).
    """
    cfg = read_config(directory)
    overrides = {"dtype": dtype} if dtype else {}
    from jaxdiff.convert import converted

    if cfg.get("source") in converted.FOLDER_SOURCES:  # a diffusers / transformers model folder, converted
        return converted.load_converted(directory, **overrides)
    if cfg.get("source") in converted.SOURCES:
        module, params, ccfg = converted.load_converted(directory, **overrides)
        ccfg = dict(ccfg)
        ccfg["model"] = {"kind": ccfg.get("kind"), **dict(ccfg.get("model", {}))}
        ccfg["diffusion"] = _normalise_converted_diffusion(ccfg.get("diffusion", {}))
        return module, params, ccfg

    from jaxdiff import models

    model_cfg = dict(cfg["model"])
    module = models.create_model(model_cfg.pop("kind"), **{**_tuples(model_cfg), **overrides})
    ckpt_dir = as_path(directory) / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {ckpt_dir} (has {directory} been trained?)")
    # A plain PyTree handler reads what StandardSave wrote and answers item_metadata without the
    # abstract train state (so no optimiser needs to be rebuilt to sample).
    manager = ocp.CheckpointManager(ckpt_dir, item_handlers=ocp.PyTreeCheckpointHandler(),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        if step is None:
            step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}")
        key = "ema_params" if ema else "params"
        meta = manager.item_metadata(step)
        tree = meta.tree if hasattr(meta, "tree") else meta
        target = {key: jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree[key])}
        restored = manager.restore(step, args=ocp.args.PyTreeRestore(
            item=target, partial_restore=True,
            restore_args=jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)))
        params = restored[key]
    finally:
        manager.close()
    out = dict(cfg)
    out["model"] = dict(cfg["model"])
    out["step"] = int(step)
    if kind in ("clip-image", "clip-text") and out["model"]["kind"] == "clip":
        part = kind.split("-")[1]
        module = getattr(module, f"{part}_encoder")(parent=None)
        params = params[part]
        out["model"] = {"kind": kind, **{f: getattr(module, f) for f in module.__dataclass_fields__
                                         if f not in ("parent", "name")}}
    if kind in UNCLIP_DECODER_PARTS and out["model"]["kind"] == "unclip_decoder":
        part = UNCLIP_DECODER_PARTS[kind]
        module = getattr(module, part)(parent=None)
        params = params[part]
        fields = dict(cfg["model"][part])
        out["model"] = {"kind": kind, **fields, **({"dtype": cfg["model"].get("dtype", "float32")}
                                                   if kind == "unet2d_condition" else {})}
    return module, params, out


# --- unCLIP workdirs ------------------------------------------------------------------------------------------

UNCLIP_DECODER_PARTS = {"text_proj": "text_proj", "unet2d_condition": "decoder"}  # load_model kind -> subtree
_CLASS_NAMES = {"prior": "PriorTransformer", "text_proj": "UnCLIPTextProjModel", "decoder": "UNet2DConditionModel"}


def unclip_scheduler_config(diffusion: Mapping[str, Any], prior: bool) -> dict:
    """diffusers' UnCLIPScheduler config.json of a workdir's diffusion settings (the prior: x_0 ("sample"),
    fixed_small_log, clip_sample_range 5 as Karlo's; the decoder: epsilon, learned_range)."""
    beta = {"cosine": "squaredcos_cap_v2"}.get(diffusion["schedule"], diffusion["schedule"])
    pred = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[diffusion["prediction"]]
    return {"_class_name": "UnCLIPScheduler", "num_train_timesteps": int(diffusion["num_timesteps"]),
            "variance_type": "learned_range" if diffusion.get("learned_sigma") else "fixed_small_log",
            "clip_sample": True, "clip_sample_range": 5.0 if prior else 1.0, "prediction_type": pred,
            "beta_schedule": beta}


def unclip_network_configs(cfg: Mapping[str, Any]) -> dict:
    """{folder: config.json dict} of an unCLIP workdir's resolved config: "prior" and "prior_scheduler" (task
    unclip_prior) or "text_proj", "decoder" and "decoder_scheduler" (unclip_decoder), as diffusers' unCLIP
    pipeline folder names them."""
    model = dict(cfg["model"])
    if model["kind"] == "prior":
        fields = {k: v for k, v in model.items() if k not in ("kind", "dtype")}
        return {"prior": {"_class_name": _CLASS_NAMES["prior"], **fields},
                "prior_scheduler": unclip_scheduler_config(cfg["diffusion"], prior=True)}
    if model["kind"] == "unclip_decoder":
        return {"text_proj": {"_class_name": _CLASS_NAMES["text_proj"], **dict(model["text_proj"])},
                "decoder": {"_class_name": _CLASS_NAMES["decoder"], **dict(model["decoder"])},
                "decoder_scheduler": unclip_scheduler_config(cfg["diffusion"], prior=False)}
    raise ValueError(f"model kind {model['kind']!r} is not an unCLIP network (prior, unclip_decoder)")


def write_unclip_configs(directory, cfg: Mapping[str, Any]) -> None:
    """W/<folder>/config.json for every network (and scheduler) of an unCLIP workdir (`unclip_network_configs`)."""
    from jaxdiff.util import files

    for folder, content in unclip_network_configs(cfg).items():
        files.atomic_write(str(as_path(directory) / folder / CONFIG_FILE),
                           json.dumps(_jsonable(content), indent=2, sort_keys=True) + "\n")


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def load_unclip(directory: str, *, step: int | None = None, ema: bool = True) -> dict:
    """The networks of an unCLIP workdir: {"prior": (module, params, config)} for an "unclip_prior" workdir,
    {"text_proj": ..., "decoder": ...} for an "unclip_decoder" one (each `load_model`'s triple: the standalone
    PriorTransformer / UnCLIPTextProjModel / UNet2DConditionModel and its parameters; the decoder's params are
    the "decoder" subtree of the trained {"text_proj", "decoder"} tree). config["scheduler"] is the network's
    UnCLIPScheduler config.json (`unclip_scheduler_config`)."""
    kind = read_config(directory)["model"]["kind"]
    kw = dict(step=step, ema=ema)
    if kind == "prior":
        module, params, cfg = load_model(directory, **kw)
        return {"prior": (module, params, dict(cfg, scheduler=unclip_scheduler_config(cfg["diffusion"], True)))}
    if kind == "unclip_decoder":
        out = {}
        for name, k in (("text_proj", "text_proj"), ("decoder", "unet2d_condition")):
            module, params, cfg = load_model(directory, kind=k, **kw)
            out[name] = (module, params, dict(cfg, scheduler=unclip_scheduler_config(cfg["diffusion"], False)))
        return out
    raise ValueError(f"{directory} is not an unCLIP workdir: its model kind is {kind!r} (allowed: prior, "
                     "unclip_decoder: workdirs of the unclip_prior / unclip_decoder tasks)")


def _tuples(flags: Mapping[str, Any]) -> dict:
    """JSON lists back to tuples (attention_resolutions, channel_mult)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}
