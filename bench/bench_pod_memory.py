"""Bytes per device of ADM train states on a (data, fsdp) mesh, from `jax.eval_shape` (nothing is
allocated or compiled); prints JSON.

    python bench/bench_pod_memory.py [--data 1] [--fsdp 16] [--min-shard-size 16384]

Models: guided-diffusion's released flags for the 512x512 class-conditional ADM and the ImageNet
64x64 ADM (jaxdiff.convert.guided_diffusion.flags_from_args). The train state is jaxdiff's `TrainState`: float32
parameters, their EMA and AdamW's two moments, laid out by `parallel.state_shardings` on an
abstract mesh of data x fsdp devices. Besides the state, a step holds for a moment the gathered
float32 parameters (the forward/backward pass sees whole weights) and, at most, the whole float32
gradient before it is reduce-scattered: both are reported (`step_transient_bytes`). Activations
come on top and depend on the per-device batch and remat (`model.use_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402

from jaxdiff import models, parallel
from jaxdiff.convert import guided_diffusion as convert_gd
from jaxdiff.train import config as train_config
from jaxdiff.train import state as train_state  # noqa: E402

MODELS = {
    # guided-diffusion README, "512x512 model" (MODEL_FLAGS of the released checkpoint)
    "adm_512": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 "
               "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
               "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    # guided-diffusion README, "64x64 model" (ImageNet 64)
    "adm_imagenet64": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
                      "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
                      "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
                      "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
}
GIB = 2 ** 30


def abstract_state(flags_text: str):
    """jax.eval_shape of the TrainState (with a null label row, as jaxdiff trains CFG models)."""
    flags, _ = convert_gd.flags_from_args(flags_text, kind="unet")
    flags["null_label"] = True
    model = models.create_model("unet", **flags)
    resolved = ml_collections.ConfigDict({"task": "diffusion", "data": {
        "image_size": flags["image_size"], "channels": flags["in_channels"]}})
    tx = train_state.make_optimizer(train_config.default_config().train)
    state = jax.eval_shape(lambda k: train_state.init_state(resolved, model, tx, k), jax.random.key(0))
    return state


def report(name: str, state, data: int, fsdp: int, min_size: int) -> dict:
    mesh = AbstractMesh((data, fsdp), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    shardings = parallel.state_shardings(state, mesh, min_size)
    leaves = jax.tree_util.tree_leaves(state)
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    per_device = parallel.bytes_per_device(state, shardings)
    replicated = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x, s in
                     zip(leaves, jax.tree_util.tree_leaves(shardings)) if s.is_fully_replicated)
    gathered = params * jnp.dtype(jnp.float32).itemsize
    return {"model": name, "params": params, "mesh": {"data": data, "fsdp": fsdp}, "min_shard_size": min_size,
            "state_bytes": total, "state_gib": round(total / GIB, 3),
            "state_bytes_per_device": per_device, "state_gib_per_device": round(per_device / GIB, 3),
            "replicated_bytes_per_device": replicated,
            "ideal_fraction": round(per_device / (total / fsdp), 4),
            "step_transient_bytes": {"gathered_params": gathered, "gradient_before_reduce_scatter": gathered},
            "gib_per_device_with_transients": round((per_device + 2 * gathered) / GIB, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=int, default=1)
    p.add_argument("--fsdp", type=int, default=16)
    p.add_argument("--min-shard-size", type=int, default=parallel.DEFAULT_MIN_SHARD_SIZE)
    args = p.parse_args(argv)
    results = [report(name, abstract_state(flags), args.data, args.fsdp, args.min_shard_size)
               for name, flags in MODELS.items()]
    print(json.dumps({"benchmark": "pod_memory", "machine": common.machine(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
