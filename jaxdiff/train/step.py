"""The jitted train step on a (data, fsdp) mesh: gradient accumulation, shardings, metrics, memory report."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdiff import parallel
from jaxdiff.diffusion import schedules
from jaxdiff.train.config import FROZEN_TEXT_TASKS, create_model
from jaxdiff.train.losses import LOSSES
from jaxdiff.train.state import (
    TrainState,
    cond_spec,
    ema_decay_at,
    ema_update,
    frozen_params,
    init_state,
    learning_rate_fn,
    make_optimizer,
    root_keys,
)
from jaxdiff.util import config as config_util
from jaxdiff.util import cpu


def zero_accumulator(metric_names) -> dict:
    """On-device sums of the step metrics since the last log, and the first non-finite step."""
    return {"sums": {k: jnp.zeros((), jnp.float32) for k in metric_names},
            "count": jnp.zeros((), jnp.int32),
            "first_nonfinite": jnp.full((), -1, jnp.int32)}


def make_train_step(resolved, model, tx, sched, train_key, *, mesh=None, state_shardings=None,
                    loss_kwargs=None) -> Callable:
    """step(state, images, cond, acc) -> (state, acc): one AdamW update + EMA, metrics accumulated;
    cond: the labels, caption tokens or text states (`cond_spec`), split into micro-batches like the images.
    `loss_kwargs`: extra arguments of the task's loss (the IF tasks: `null_text`, the empty caption's
    states, constants of the compiled step).

    With `mesh` and `state_shardings` (`state_layout`) the parameters are gathered for the
    forward/backward pass when split over 'fsdp', and the gradients constrained to their layout.
    `train.grad_accum_steps = k` > 1 sums k micro-batches' gradients in a `lax.scan`; micro-batch m
    holds rows m*b'..(m+1)*b'-1 of every device's block of b = k*b' rows.
    """
    loss_fn = LOSSES[resolved.task](resolved, model, sched, **(loss_kwargs or {}))
    lr_fn = learning_rate_fn(resolved.train)
    tcfg = resolved.train
    k = int(config_util.get(tcfg, "grad_accum_steps", 1))
    param_sh = None if state_shardings is None else state_shardings.params
    gather = mesh is not None and parallel.axis_size(mesh, parallel.FSDP_AXIS) > 1
    shards = 1 if mesh is None else int(mesh.size)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    loss_metrics = [n for n in metric_names(resolved) if n not in ("grad_norm", "lr")]
    frozen = frozen_params(resolved)

    def constrain(tree, sharding):
        return tree if sharding is None else jax.lax.with_sharding_constraint(tree, sharding)

    def micro_batches(a):
        b = a.shape[0]
        a = a.reshape((shards, k, b // (shards * k)) + a.shape[1:]).swapaxes(0, 1).reshape((k, b // k) + a.shape[1:])
        if mesh is None:
            return a
        return jax.lax.with_sharding_constraint(
            a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.batch_axes(mesh))))

    def gradients(params, images, cond, key):
        full = constrain(params, parallel.replicated_sharding(mesh)) if gather else params
        ids = jnp.arange(images.shape[0], dtype=jnp.int32)
        if k == 1:
            (_, metrics), grads = value_and_grad(full, images, cond, key, ids)
            return metrics, constrain(grads, param_sh)
        xs = (micro_batches(images), jax.tree_util.tree_map(micro_batches, cond), micro_batches(ids))

        def body(carry, mb):
            x, y, i = mb
            (_, metrics), grads = value_and_grad(full, x, y, key, i)
            metrics = {n: metrics[n].astype(jnp.float32) for n in loss_metrics}
            return jax.tree_util.tree_map(jnp.add, carry, (metrics, constrain(grads, param_sh))), None

        zeros = ({n: jnp.zeros((), jnp.float32) for n in loss_metrics},
                 constrain(jax.tree_util.tree_map(jnp.zeros_like, params), param_sh))
        (msum, gsum), _ = jax.lax.scan(body, zeros, xs)
        return jax.tree_util.tree_map(lambda v: v / k, (msum, gsum))

    def step_fn(state: TrainState, images, cond, acc):
        key = jax.random.fold_in(train_key, state.step)
        metrics, grads = gradients(state.params, images, cond, key)
        loss = metrics["loss"]
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay_at(tcfg, state.step))
        if frozen:  # fixed parameters (the prior's clip_mean / clip_std): the EMA keeps them bit for bit
            ema = {**ema, **{name: params[name] for name in frozen}}
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr_fn(state.step))
        bad = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        first = jnp.where((acc["first_nonfinite"] < 0) & bad, state.step + 1, acc["first_nonfinite"])
        acc = {"sums": {k: acc["sums"][k] + metrics[k].astype(jnp.float32) for k in acc["sums"]},
               "count": acc["count"] + 1, "first_nonfinite": first}
        return new_state, acc

    return step_fn


def train_mesh(resolved):
    """The (data, fsdp) mesh of config.mesh over every device of every process."""
    m = config_util.get(resolved, "mesh", {})
    return parallel.make_mesh(config_util.get(m, "data", -1), config_util.get(m, "fsdp", 1))


def state_layout(resolved, model, tx, mesh, param_overrides=None) -> tuple:
    """(abstract TrainState with shardings, TrainState of NamedShardings, jitted init_fn(key)) on
    `mesh` (`parallel.state_shardings` with config.mesh.min_shard_size); `param_overrides`: see `init_state`."""
    def init(key):
        return init_state(resolved, model, tx, key, param_overrides)

    shapes = jax.eval_shape(init, jax.random.key(0))
    min_size = int(config_util.get(config_util.get(resolved, "mesh", {}), "min_shard_size",
                                   parallel.DEFAULT_MIN_SHARD_SIZE))
    shardings = parallel.state_shardings(shapes, mesh, min_size)
    abstract = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                      shapes, shardings)
    return abstract, shardings, cpu.jit(init, out_shardings=shardings)


def jit_train_step(resolved, model, tx, sched, train_key, mesh, shardings, loss_kwargs=None) -> tuple:
    """(jitted step with explicit in/out shardings and donated state, accumulator sharding)."""
    repl = parallel.replicated_sharding(mesh)
    acc_sharding = jax.tree_util.tree_map(lambda _: repl, zero_accumulator(metric_names(resolved)))
    batch = parallel.batch_sharding(mesh)
    step = cpu.jit(make_train_step(resolved, model, tx, sched, train_key, mesh=mesh, state_shardings=shardings,
                                   loss_kwargs=loss_kwargs),
                   in_shardings=(shardings, batch, batch, acc_sharding),
                   out_shardings=(shardings, acc_sharding), donate_argnums=(0, 3))
    return step, acc_sharding


def abstract_inputs(resolved, mesh, acc_sharding) -> tuple:
    """ShapeDtypeStructs (with shardings) of a step's images, condition and metric accumulator."""
    batch = parallel.batch_sharding(mesh)
    b, s, c = int(resolved.train.batch_size), int(resolved.data.image_size), int(resolved.data.channels)
    acc = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                 jax.eval_shape(lambda: zero_accumulator(metric_names(resolved))), acc_sharding)
    cond = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch),
                                  cond_spec(resolved, b))
    return jax.ShapeDtypeStruct((b, s, s, c), jnp.float32, sharding=batch), cond, acc


def lower_train_step(resolved, mesh=None):
    """The train step of `resolved` lowered for `mesh` (default config.mesh) on abstract inputs, for
    `.compile().memory_analysis()` / `.cost_analysis()` without data or a workdir."""
    model = create_model(resolved)
    tx = make_optimizer(resolved.train, frozen_params(resolved))
    sched = schedules.make_schedule(resolved.diffusion.schedule, int(resolved.diffusion.num_timesteps))
    mesh = train_mesh(resolved) if mesh is None else mesh
    abstract, shardings, _ = state_layout(resolved, model, tx, mesh)
    kwargs = None
    if resolved.task in FROZEN_TEXT_TASKS:  # the empty caption's states are constants of the step: zeros cost the same
        spec = cond_spec(resolved, 1)
        spec.pop("image_emb", None)
        kwargs = {"null_text": jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape[1:], a.dtype), spec)}
    step, acc_sharding = jit_train_step(resolved, model, tx, sched, root_keys(resolved.seed)[1], mesh, shardings,
                                        kwargs)
    return step.lower(abstract, *abstract_inputs(resolved, mesh, acc_sharding))


def memory_report(compiled, state, mesh) -> dict:
    """What W/memory.json holds: the compiled step's buffer sizes per device (XLA's memory
    analysis) and the train state's bytes (all, and the most any device of this process holds)."""
    out = {"mesh": {k: int(v) for k, v in dict(mesh.shape).items()}, "devices": jax.device_count()}
    mem = compiled.memory_analysis()
    if mem is not None:
        out["train_step"] = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                             ("temp", "argument", "output", "alias", "generated_code")
                             if hasattr(mem, f"{k}_size_in_bytes")}
    leaves = jax.tree_util.tree_leaves(state)
    out["state_bytes"] = int(sum(x.size * x.dtype.itemsize for x in leaves))
    out["state_bytes_per_device"] = int(max(parallel.addressable_bytes(state).values()))
    return out


def metric_names(resolved) -> tuple:
    if resolved.task == "classifier":
        return ("loss", "accuracy", "grad_norm", "lr")
    if resolved.task == "clip":
        return ("loss", "accuracy", "logit_scale", "grad_norm", "lr")
    names = ("loss", "mse") + (("vb",) if resolved.diffusion.learned_sigma else ())
    return names + ("grad_norm", "lr")
