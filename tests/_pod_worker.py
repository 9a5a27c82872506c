"""Helper programs of tests/test_pod.py (several checks per run, each program compiled once).

    _pod_worker.py eight DATA_DIR BASE TWO_PROCESS_WORKDIR OUT.json   (1 process, 8 CPU devices)
1. `train()` with mesh data=2 x fsdp=4 and remat, 30 steps of the tiny config: per-device bytes
   of the returned train state.
2. The 2-process x 4-device checkpoint restored onto fsdp=8, data=8 and one device: bitwise equal
   to the stored arrays.

    _pod_worker.py accumulation DATA_DIR BASE   (1 process, 8 CPU devices)
Gradient accumulation, batch 32, 10 steps on fsdp=8: k=1 and k=4 (the compiled steps' temporary
bytes are in their W/memory.json).

    _pod_worker.py grid DATA_DIR OUT_DIR PORT 2 INDEX   (each of 2 processes)
The training sample grid (`training.make_sample_fn`) of a freshly initialised tiny model: process
0 writes OUT_DIR/grid.npz.
"""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _training_helpers as H  # noqa: E402

from jaxdiff import checkpoints, parallel
from jaxdiff.train import config as train_config
from jaxdiff.train import grids
from jaxdiff.train import loop as training
from jaxdiff.train import state as train_state
from jaxdiff.train import step as train_step  # noqa: E402

MIN_SHARD = 64  # elements: the tiny model's 32-channel norm scales and biases stay replicated


def config(data_dir, **overrides):
    spec = importlib.util.spec_from_file_location("tiny_config", H.TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.data.data_dir = str(data_dir)
    cfg.train.update(steps=H.STEPS, keep=3)
    cfg.mesh.min_shard_size = MIN_SHARD
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def layout(state) -> dict:
    """Largest per-device share of the state's bytes, and how many leaves are replicated."""
    leaves = jax.tree_util.tree_leaves(state)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    per_device = parallel.addressable_bytes(state)
    return {"max_fraction": max(per_device.values()) / total, "devices": len(per_device), "total_bytes": int(total),
            "replicated_leaves": sum(x.sharding.is_fully_replicated for x in leaves), "leaves": len(leaves)}


def eight(data_dir, base, two_process, out):
    base = Path(base)
    assert jax.device_count() == 8, jax.devices()
    res = {}
    # 1. data x fsdp layout, with remat
    state = training.train(config(data_dir, **{"mesh.data": 2, "mesh.fsdp": 4, "model.use_checkpoint": True}),
                           str(base / "data2_fsdp4"))
    res["data2_fsdp4"] = layout(state)
    # 2. restore the 2-process checkpoint on other meshes
    resolved = train_config.resolve_config(config(data_dir, **{"mesh.fsdp": 8}))
    model, tx = train_config.create_model(resolved), train_state.make_optimizer(resolved.train)
    stored = H.load_tree(two_process, H.STEPS)
    manager = checkpoints.make_manager(str(Path(two_process) / "checkpoints"), read_only=True)
    res["restore"] = {}
    for name, mesh in (("fsdp8", parallel.make_mesh(1, 8)), ("data8", parallel.make_mesh(8, 1)),
                       ("one_device", parallel.make_mesh(1, 1, devices=jax.devices()[:1]))):
        abstract, _, _ = train_step.state_layout(resolved, model, tx, mesh)
        state = checkpoints.restore(manager, H.STEPS, abstract)
        got = {"params": state.params, "ema_params": state.ema_params, "opt_state": state.opt_state}
        la, lb = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves({k: stored[k] for k in got})
        kernel = state.params["out_2"]["kernel"].sharding
        res["restore"][name] = {
            "bitwise": len(la) == len(lb) and all(np.array_equal(np.asarray(a), b) for a, b in zip(la, lb)),
            "devices": len(kernel.device_set), "spec": str(kernel.spec)}
    manager.close()
    Path(out).write_text(json.dumps(res, indent=1))


def accumulation(data_dir, base):
    assert jax.device_count() == 8, jax.devices()
    acc = {"mesh.fsdp": 8, "train.batch_size": 32, "train.steps": 10}
    for k in (1, 4):
        training.train(config(data_dir, **acc, **{"train.grad_accum_steps": k}), str(Path(base) / f"k{k}"))


def grid(data_dir, out_dir):
    resolved = train_config.resolve_config(config(data_dir, **{"train.batch_size": 12}))
    model = train_config.create_model(resolved)
    tx = train_state.make_optimizer(resolved.train)
    _, _, init_fn = train_step.state_layout(resolved, model, tx, train_step.train_mesh(resolved))
    state = init_fn(jax.random.key(0))
    images, labels = grids.make_sample_fn(resolved, model)(state.ema_params)
    if jax.process_index() == 0:
        np.savez(Path(out_dir) / "grid.npz", images=images, labels=labels)


if __name__ == "__main__":
    if sys.argv[1] == "grid":
        port, count, index = sys.argv[4:7]
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", int(count), int(index))
        grid(*sys.argv[2:4])
    else:
        {"eight": eight, "accumulation": accumulation}[sys.argv[1]](*sys.argv[2:])
