"""The training loop: one entry point, `train(config, workdir)`, for every task (`config.task`).

One entry point, `train(config, workdir)`, for every task (`config.task`):

* "diffusion": an ADM U-Net, class-conditional; labels are dropped to the null label
  (index num_classes) with probability `diffusion.p_uncond`, so one model serves classifier-free
  guidance. Targets eps / x0 / v; learned sigma trains with the hybrid loss
  (`jaxdiff.diffusion.gaussian.training_losses`); t is uniform over the schedule.
* "text2im": the same recipe for GLIDE's text-conditional U-Net (`jaxdiff.models.Text2ImUNet`) on a
  captioned dataset; captions are word-tokenized (`jaxdiff.data.tokenizers.WordTokenizer`, truncated to
  `model.text_ctx` words as GLIDE does) and dropped to the empty caption with probability
  `diffusion.p_uncond` (default 0.2).
* "classifier": the ADM noisy classifier on q_sample'd inputs at uniform t (`train.noised=True`)
  or on clean images at t = 0 (`train.noised=False`, the classifier of the evaluation metrics).
* "clip": a noised CLIP (`models.ClipModel`) on a captioned dataset, images q_sample'd at uniform t
  (the encoder sees the ORIGINAL timestep), with CLIP's symmetric contrastive loss
  (`losses.contrastive_loss`). `model.learn_logit_scale` learns log(scale) (capped at 100) or keeps
  `model.logit_scale` fixed; `train.noised=False` trains the clean CLIP the text sweep scores with.
  The negatives are the rows of one micro-batch, so with `train.grad_accum_steps` > 1 the loss
  differs from one batch of B (the other tasks' updates do not depend on it).
* "if_text2im", "if_superres": DeepFloyd IF's stage I and stage II, diffusers' UNet2DConditionModel
  (`config.model`: config.json fields) on a captioned dataset, conditioned on the token states of a
  frozen text encoder (`config.text_encoder`: a transformers T5 folder or a "clip" workdir of this
  repository), computed once before training and cached (`text_states`); captions are dropped to the
  empty caption's states with probability `diffusion.p_uncond` (0.1). Learned-range variance with the
  hybrid loss, as "diffusion". Stage II sees the noisy high-resolution image concatenated with the
  low-resolution image (`superres.low_res`) upscaled bilinearly (align_corners=True) and q_sample'd at a
  random level per example (uniform in [0, `superres.max_level`)), the level being its class label.
* "unclip_prior", "unclip_decoder": DALL-E 2 (unCLIP) on a frozen clean CLIP pair (`config.text_encoder`, a
  "clip" workdir). The CLIP image embedding of every training example and the text embedding and token states
  of every caption are computed once and cached (`image_embeddings`, `text_states`). The prior (diffusers'
  PriorTransformer) learns x_0 = the normalised image embedding (clip_mean / clip_std: the split's statistics,
  frozen parameters of the prior) from the caption, captions dropped with p 0.1; the decoder (text_proj + a
  UNet2DConditionModel, `models.UnCLIPDecoder`) learns eps with learned-range variance from the image
  embedding (dropped to the learned null embedding with p 0.1) and the caption (dropped, p 0.5). Their
  workdirs also hold diffusers-style config.json files per network (`checkpoints.write_unclip_configs`;
  `checkpoints.load_unclip` loads them): docs/unclip_training.md.

The text tasks write the dataset's vocabulary into W/config.json ({"text": {"vocab": [...]}}).
All tasks use AdamW with linear warm-up (then constant, linear to 0 or cosine), global-norm
clipping and an EMA of the weights kept in the `TrainState`.

Parallelism (`config.mesh`, a ('data', 'fsdp') mesh), gradient accumulation, randomness (example j
of a step draws from fold_in(fold_in(key(seed), step), j), so resumed runs repeat uninterrupted
ones), preemption and the multi-host rules: docs/training.md.

Derived values are never configured twice: image size, channels and num_classes come from the
dataset; out_channels from in_channels and learned_sigma (or num_classes for the classifier);
null_label from p_uncond > 0. The resolved config is written to W/config.json.

Non-finite losses are folded into an on-device accumulator read at every log boundary and before
every save: training stops at most `log_every - 1` steps after the first bad step, no checkpoint
is written after it, and the error names that step and the last good checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import checkpoints, parallel
from jaxdiff.diffusion import schedules
from jaxdiff.train import image_embeddings, monitor, preemption, text_states
from jaxdiff.train.config import (
    DIFFUSION_TASKS,
    FROZEN_TEXT_TASKS,
    UNCLIP_TASKS,
    ConfigError,
    create_model,
    open_dataset,
    resolve_config,
    validate_config,
)
from jaxdiff.train.grids import make_sample_fn
from jaxdiff.train.inputs import train_batches
from jaxdiff.train.monitor import MetricsWriter
from jaxdiff.train.state import TrainState, frozen_params, make_optimizer, root_keys
from jaxdiff.train.step import (
    abstract_inputs,
    jit_train_step,
    memory_report,
    metric_names,
    state_layout,
    train_mesh,
    zero_accumulator,
)
from jaxdiff.util import config as config_util
from jaxdiff.util import files

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"


MEMORY_FILE = "memory.json"  # the compiled step's and the train state's bytes per device


HOSTS_FILE = ".hosts_check"  # written by process 0, read by every process (is W shared?)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf loss (or gradient norm)."""


def _host(x) -> np.ndarray:
    """Value of a replicated (possibly multi-process) array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def _all_finite(tree) -> bool:
    return bool(_host(_all_finite_jit(tree)))


@jax.jit
def _all_finite_jit(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0, smoothing=0.0)


def _read_text(path) -> Optional[str]:
    try:
        return path.read_text()
    except (OSError, ValueError):  # missing, or not readable from this host
        return None


def prepare_workdir(workdir, config_text: str) -> None:
    """Create W and write W/config.json (process 0); then check, collectively, that every process
    was given the same workdir on storage they all read, and the same config (else ConfigError on
    every process: none hangs).
    """
    pid, count = jax.process_index(), jax.process_count()
    path = workdir / checkpoints.CONFIG_FILE
    token = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF if pid == 0 else 0
    if pid == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        old = _read_text(path)
        if old is not None and old != config_text:
            log.warning("config differs from the one in %s; the new one replaces it", path)
        files.atomic_write(str(path), config_text)
        if count > 1:
            files.atomic_write(str(workdir / HOSTS_FILE), f"{token}\n")
    if count == 1:
        return
    token = int(parallel.process_values(np.array(token))[0])  # also a barrier: process 0 has written
    seen = _read_text(workdir / HOSTS_FILE)
    if seen is None or seen.strip() != str(token):
        code = 1
    else:
        code = 0 if _read_text(path) == config_text else 2
    codes = parallel.process_values(np.array(code))
    dirs = parallel.process_strings(str(workdir))
    if not codes.any():
        return
    where = "; ".join(f"process {i}: {d!r}" for i, d in enumerate(dirs))
    if (codes == 1).any():
        bad = ", ".join(str(i) for i in np.flatnonzero(codes == 1))
        raise ConfigError(
            f"process(es) {bad} cannot read the run files process 0 wrote ({checkpoints.CONFIG_FILE}, {HOSTS_FILE}) "
            f"in their workdir ({where}). Every process must be given the same workdir, on storage every host "
            "reads and writes (a shared file system, or gs://bucket/path); per-host local disks do not work")
    bad = ", ".join(str(i) for i in np.flatnonzero(codes == 2))
    raise ConfigError(f"process(es) {bad} resolved a different config than process 0 (compare their command "
                      f"lines with {path}): every process must run the same config")


def agree_on_start(manager) -> Optional[int]:
    """The latest complete checkpoint step, checked to be the same on every process (collective).

    Raises ConfigError on every process when they see different latest steps."""
    latest = manager.latest_step()
    steps = parallel.process_values(np.array(-1 if latest is None else int(latest))).reshape(-1)
    if (steps != steps[0]).any():
        seen = "; ".join(f"process {i}: {'none' if v < 0 else f'step {v}'}" for i, v in enumerate(steps))
        raise ConfigError(f"the processes see different latest checkpoints in {manager.directory} ({seen}): "
                          "they would start from different steps. Give every process the same workdir on "
                          "storage every host reads")
    return latest


def train(config, workdir: str, *, step_hook: Optional[Callable[[int], None]] = None) -> TrainState:
    """Train per `config` in `workdir`, resuming from its latest complete checkpoint.

    Returns the final TrainState (or the one saved when SIGTERM / SIGINT stopped the run early).
    `step_hook(step)` is called on the host after each step is dispatched. Raises NonFiniteLossError
    when a loss or gradient norm is NaN/inf (after waiting for pending checkpoint writes).
    """
    config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
    validate_config(config)
    source, info = open_dataset(config)
    resolved = resolve_config(config, info)
    workdir = checkpoints.as_path(workdir)
    prepare_workdir(workdir, config_util.to_json(resolved) + "\n")
    texts, embeds, loss_kwargs, overrides = None, None, None, None
    if resolved.task in FROZEN_TEXT_TASKS:  # the frozen encoder's outputs of every caption, before anything compiles
        texts = text_states.prepare(resolved, source, workdir, embeddings=resolved.task in UNCLIP_TASKS)
        loss_kwargs = {"null_text": texts.null()}
    if resolved.task in UNCLIP_TASKS:
        embeds = image_embeddings.prepare(resolved, source, workdir)
        if jax.process_index() == 0:
            checkpoints.write_unclip_configs(workdir, resolved.to_dict())
        if resolved.task == "unclip_prior":
            mean, std = embeds.stats()
            overrides = {"clip_mean": mean, "clip_std": std}

    model = create_model(resolved)
    tx = make_optimizer(resolved.train, frozen_params(resolved))
    sched = schedules.make_schedule(resolved.diffusion.schedule, int(resolved.diffusion.num_timesteps))
    init_key, train_key, _ = root_keys(resolved.seed)

    mesh = train_mesh(resolved)
    abstract, shardings, init_fn = state_layout(resolved, model, tx, mesh, overrides)
    repl = parallel.replicated_sharding(mesh)
    tcfg = resolved.train
    batch_size = int(tcfg.batch_size)
    manager = checkpoints.make_manager(workdir / checkpoints.CHECKPOINT_DIR, keep=int(tcfg.keep),
                                       async_save=bool(config_util.get(tcfg, "async_checkpointing", True)))
    try:
        start = agree_on_start(manager)
        state = None if start is None else checkpoints.restore(manager, start, abstract)
    except ConfigError:
        manager.close()
        raise
    except (ValueError, KeyError, TypeError) as e:
        manager.close()
        raise ConfigError(
            f"the latest checkpoint in {manager.directory} does not fit this config's model/optimiser "
            f"(was the workdir trained with another config?): {' '.join(str(e).split())[:600]}") from None
    if state is None:
        state, start, position = init_fn(init_key), 0, 0
        log.info("initialised a new %s model", resolved.task)
    else:
        # checkpoints written before positions were saved: the old order, step * batch_size
        position = int(checkpoints.step_metadata(manager, start).get("data_position", start * batch_size))
        log.info("resumed from the checkpoint of step %d (data stream position %d)", start, position)
    last_good = start if start else None
    total = int(tcfg.steps)
    names = metric_names(resolved)
    step_fn, acc_sharding = jit_train_step(resolved, model, tx, sched, train_key, mesh, shardings, loss_kwargs)
    step_fn = step_fn.lower(abstract, *abstract_inputs(resolved, mesh, acc_sharding)).compile()
    if jax.process_index() == 0:
        files.write_json(str(workdir / MEMORY_FILE), memory_report(step_fn, state, mesh))
    new_acc = jax.jit(lambda: zero_accumulator(names), out_shardings=acc_sharding)
    gather = jax.jit(lambda p: p, out_shardings=repl)  # the EMA parameters for sampling / evaluation
    batch_sh = parallel.batch_sharding(mesh)

    writer = MetricsWriter(workdir, start)
    profile = monitor.ProfileWindow(config_util.get(resolved, "profile_steps", ()), workdir / monitor.PROFILE_DIR)
    sample_every = int(config_util.get(tcfg, "sample_every", 0))
    sample_fn = None
    eval_fn = None
    samples_dir = workdir / SAMPLES_DIR
    log_every, ckpt_every = int(tcfg.log_every), int(tcfg.checkpoint_every)

    acc = new_acc()
    pbar = _progress(total, start)
    t_last, s_last = time.time(), start
    step = start
    try:
        with preemption.StopRequest() as stop:
            batches = (train_batches(source, resolved, start, total, position) if texts is None else
                       train_batches(source, resolved, start, total, position, text_states=texts,
                                     image_embeddings=embeds))
            for images, cond in batches:
                profile.before_step(step)
                x = jax.make_array_from_process_local_data(batch_sh, images)
                c = jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(batch_sh, a), cond)
                state, acc = step_fn(state, x, c, acc)
                step += 1
                position += batch_size
                if step_hook is not None:
                    step_hook(step)
                profile.after_step(step, state)
                stopping = stop.reached(step) and step < total
                at_log = step % log_every == 0 or step == total or stopping
                at_ckpt = step % ckpt_every == 0 or step == total or stopping
                at_sample = sample_every > 0 and step % sample_every == 0 and not stopping
                if not (at_log or at_ckpt or at_sample):
                    continue
                # --- host sync: metrics since the last boundary, non-finite check ---
                acc_host = jax.tree_util.tree_map(_host, acc)
                acc = new_acc()
                count = int(acc_host["count"])
                first_bad = int(acc_host["first_nonfinite"])
                means = {k: float(v) / max(count, 1) for k, v in acc_host["sums"].items()}
                if first_bad >= 0:
                    manager.wait_until_finished()
                    pbar.close()
                    where = (f"the last good checkpoint is step {last_good} in {manager.directory}"
                             if last_good is not None else "no checkpoint had been written yet")
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at training step {first_bad} (detected at step {step}, "
                        f"mean loss of steps {step - count + 1}..{step} = {means.get('loss')}); training "
                        f"stopped; {where}. Lower config.train.lr, raise warmup_steps or set grad_clip.")
                now = time.time()
                speed = monitor.throughput(step - s_last, now - t_last, batch_size)
                t_last, s_last = now, step
                means.update(speed)
                means.update(monitor.device_memory())
                writer.write(step, means)
                pbar.update(step - pbar.n)
                pbar.set_postfix(loss=f"{means['loss']:.4g}", steps_s=f"{speed['steps_per_sec']:.2f}", refresh=False)
                pbar.refresh()
                if at_ckpt:
                    if not _all_finite(state.params):
                        manager.wait_until_finished()
                        raise NonFiniteLossError(
                            f"parameters became non-finite by training step {step}; training stopped; "
                            f"the last good checkpoint is step {last_good}")
                    checkpoints.save(manager, step, state, {"loss": means["loss"]},
                                     custom_metadata={"data_position": position, "batch_size": batch_size})
                    last_good = step
                if stopping:
                    log.warning("stopped at step %d on request; its checkpoint is saved in %s: run the same "
                                "command to resume", step, manager.directory)
                    break
                if at_sample:
                    if resolved.task in DIFFUSION_TASKS and resolved.task not in FROZEN_TEXT_TASKS:
                        if sample_fn is None:
                            sample_fn = make_sample_fn(resolved, model)
                        grid, grid_labels = sample_fn(gather(state.ema_params))
                        if jax.process_index() == 0:
                            per_class = int(config_util.get(resolved.sample, "per_class", 8))
                            files.save_grid(str(samples_dir / f"step_{step:07d}.png"), grid, ncol=per_class)
                    else:
                        if eval_fn is None:
                            from jaxdiff.eval import evaluation

                            eval_fn = evaluation.make_eval_fn(resolved, model)
                        ev = eval_fn(gather(state.ema_params))
                        writer.write(step, ev)
                        log.info("step %d eval %s", step, ev)
                    t_last = time.time()  # sampling time does not count against steps/s
        manager.wait_until_finished()
    finally:
        profile.close()
        pbar.close()
        writer.close()
        manager.close()
    return state
