"""Parameter bytes of DeepFloyd IF's stage I and its text encoder, whole and per device when sharded over an
fsdp axis, from `jax.eval_shape` (nothing is allocated or compiled); prints JSON.

    python bench/bench_if_memory.py [--fsdp 8] [--min-shard-size 16384] [--chip-gb 16]

Models (bfloat16 parameters):
- T5-v1.1-XXL's encoder (IF's text encoder, transformers T5EncoderModel): d_model 4096, 24 layers, d_ff 10240
  (gated GELU), 64 heads of d_kv 64, vocabulary 32128 (`jaxdiff.models.t5.T5Encoder`).
- IF-I-XL stage I (4.3 B parameters, `jaxdiff.models.unet2d_condition.UNet2DConditionModel`) from its
  diffusers unet/config.json (IF_I_XL below: where its values come from is said there).

The mesh is a real one of `--fsdp` CPU devices (--xla_force_host_platform_device_count, set here before jax
is imported), data = 1; `parallel.state_shardings` lays the parameters out with the training default
`mesh.min_shard_size` (`parallel.DEFAULT_MIN_SHARD_SIZE`): each array of at least that many elements is
split along its largest dimension divisible by fsdp, smaller ones are replicated. Counted: parameters
only. Not counted: activations (they grow with batch and resolution), the weights one layer gathers for a
moment when it runs (`largest_array_bytes` bounds that per array), XLA's scratch space and the compiled
program.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _force_devices(n: int) -> None:
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag.split("=")[0])]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _fsdp_arg(argv) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--fsdp", type=int, default=8)
    return p.parse_known_args(argv)[0].fsdp


if __name__ == "__main__":
    _force_devices(_fsdp_arg(sys.argv[1:]))  # before jax is imported (bench/common imports it)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import common  # noqa: E402  (puts this checkout first on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff import parallel  # noqa: E402
from jaxdiff.convert.diffusers import abstract_unet2d_params, unet2d_config  # noqa: E402
from jaxdiff.models import t5  # noqa: E402

# google/t5-v1_1-xxl's config.json, the encoder's fields (IF's text_encoder/config.json has the same)
T5_XXL = {"d_model": 4096, "num_layers": 24, "d_ff": 10240, "num_heads": 64, "d_kv": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6}

# DeepFloyd/IF-I-XL-v1.0 unet/config.json (diffusers 0.19). Source: the copy a DreamBooth fine-tune saved
# from it, huggingface.co/lucostiguy11/dreambooth_if, unet/config.json (raw at commit c2434e5b, whose
# "_name_or_path" is "DeepFloyd/IF-I-XL-v1.0"); DeepFloyd's own config.yml for IF-I-XL (huggingface.co/
# ckpt/IF-I-XL-v1.0-16bit, config.yml) agrees: model_channels 704, channel_mult 1,2,3,4 (704, 1408, 2112,
# 2816), num_res_blocks 3, num_head_channels 64, encoder_dim 4096, encoder_channels 2816, att_pool_heads 64,
# attention at 32,16,8 (every level but the first), out_channels 6, gelu, scale-shift norm. The upsampling
# block types mirror the downsampling ones (the copy above is cut there). Fields that change no parameter
# shape (sample_size, downsample_padding, transformer_layers_per_block, ...) are left out.
IF_I_XL = {
    "_class_name": "UNet2DConditionModel", "act_fn": "gelu", "addition_embed_type": "text",
    "addition_embed_type_num_heads": 64, "attention_head_dim": 64, "block_out_channels": [704, 1408, 2112, 2816],
    "class_embed_type": None, "cross_attention_dim": 2816, "cross_attention_norm": "group_norm",
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D"],
    "encoder_hid_dim": 4096, "encoder_hid_dim_type": "text_proj", "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 3, "layers_per_block": 3, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "only_cross_attention": False, "out_channels": 6, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "scale_shift", "time_embedding_act_fn": None, "time_embedding_dim": None,
    "timestep_post_act": None,
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "ResnetUpsampleBlock2D"],
}
GIB = 2 ** 30


def abstract_t5_xxl():
    """The encoder's params as bfloat16 ShapeDtypeStructs (eval_shape of init)."""
    module = t5.T5Encoder(t5.t5_config_from_json(T5_XXL), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    return t5.abstract_t5_params(module)


def abstract_if_i_xl():
    """Stage I's params (eval_shape of init, float32) as bfloat16 ShapeDtypeStructs."""
    tree = abstract_unet2d_params(unet2d_config(IF_I_XL))
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), tree)


def report(name: str, tree, mesh, min_size: int) -> dict:
    shardings = parallel.state_shardings(tree, mesh, min_size)
    leaves, shs = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)
    sizes = [int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in leaves]
    total, per_device = sum(sizes), parallel.bytes_per_device(tree, shardings)
    fsdp = parallel.axis_size(mesh, parallel.FSDP_AXIS)
    replicated = [(s, x.shape) for s, x, sh in zip(sizes, leaves, shs) if sh.is_fully_replicated]
    return {"model": name, "params": sum(int(np.prod(x.shape, dtype=np.int64)) for x in leaves),
            "dtype": "bfloat16", "arrays": len(leaves), "bytes": total, "gib": round(total / GIB, 3),
            "bytes_per_device": per_device, "gib_per_device": round(per_device / GIB, 3),
            "of_ideal": round(per_device / (total / fsdp), 4),
            "replicated_arrays": len(replicated), "replicated_bytes": sum(s for s, _ in replicated),
            "largest_replicated_shape": list(max(replicated)[1]) if replicated else None,
            "largest_array_bytes": max(sizes)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fsdp", type=int, default=8, help="devices the parameters are split over")
    p.add_argument("--min-shard-size", type=int, default=parallel.DEFAULT_MIN_SHARD_SIZE)
    p.add_argument("--chip-gb", type=float, default=16.0, help="memory of one chip, GB (10^9 bytes)")
    args = p.parse_args(argv)
    if jax.device_count() < args.fsdp:
        raise SystemExit(f"{jax.device_count()} devices, --fsdp {args.fsdp} needs as many: run this file as a "
                         "script (it sets --xla_force_host_platform_device_count before jax starts)")
    mesh = parallel.make_mesh(data=1, fsdp=args.fsdp, devices=jax.devices()[:args.fsdp])
    models = [report("t5_v1_1_xxl_encoder", abstract_t5_xxl(), mesh, args.min_shard_size),
              report("if_i_xl_unet", abstract_if_i_xl(), mesh, args.min_shard_size)]
    chip = int(args.chip_gb * 1e9)
    total = sum(m["bytes"] for m in models)
    per_device = sum(m["bytes_per_device"] for m in models)
    pair = {"bytes": total, "gib": round(total / GIB, 3), "fits_one_chip_unsharded": total <= chip,
            "bytes_per_device": per_device, "gib_per_device": round(per_device / GIB, 3),
            "chip_bytes": chip, "fits_sharded": per_device <= chip,
            "margin_bytes_per_device": chip - per_device, "margin_gib_per_device": round((chip - per_device) / GIB, 3),
            "fraction_of_chip_used": round(per_device / chip, 4),
            "not_counted": "activations, each layer's gathered weights while it runs, XLA scratch, the program"}
    print(json.dumps({"benchmark": "if_memory", "machine": common.machine(),
                      "mesh": {"data": 1, "fsdp": args.fsdp}, "min_shard_size": args.min_shard_size,
                      "results": models, "pair": pair}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
