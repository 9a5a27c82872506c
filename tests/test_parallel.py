"""Data-parallel sampling: same seed, same images on 1 or 8 devices and with any batch size."""

import os
import pathlib
import subprocess
import sys

import _tiny
import jax
import numpy as np
import pytest

from jaxdiff import parallel

HERE = pathlib.Path(__file__).parent

_WORKER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
assert jax.device_count() == 8, jax.devices()
import _tiny
full = _tiny.sample_sharded([np.arange(13)])                  # 13 on 8 devices: padded to 16, trimmed
split = _tiny.sample_sharded([np.arange(5), np.arange(5, 13)])  # other batch sizes
np.savez(sys.argv[2], full=full, split=split)
"""


def test_pad_batch_repeats_last_row_and_keeps_size():
    tree = {"y": np.array([0, 1, 2]), "x": np.arange(6.0).reshape(3, 2)}
    padded, n = parallel.pad_batch(tree, 4)
    assert n == 3
    np.testing.assert_array_equal(padded["y"], [0, 1, 2, 2])
    np.testing.assert_array_equal(padded["x"][3], [4.0, 5.0])
    same, n = parallel.pad_batch(tree, 3)
    assert n == 3 and same["y"].shape == (3,)
    with pytest.raises(ValueError, match="rows"):
        parallel.pad_batch({"a": np.zeros(3), "b": np.zeros(4)}, 2)


def test_mesh_and_shardings():
    mesh = parallel.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    a = parallel.shard_batch(np.arange(8.0), mesh)
    assert a.sharding.spec == parallel.batch_sharding(mesh).spec
    r = parallel.replicate({"w": np.ones(3)}, mesh)
    assert r["w"].sharding.is_fully_replicated
    assert parallel.replicate(r, mesh)["w"] is r["w"]  # already placed: untouched
    np.testing.assert_array_equal(parallel.process_rows(5), np.arange(5))
    np.testing.assert_array_equal(parallel.gather_rows(np.arange(5), 5), np.arange(5))


def test_same_samples_on_1_and_8_devices_any_batch_size(tmp_path):
    out = tmp_path / "eight.npz"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(HERE), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # meanwhile, on this process's single device (one compile; batch-size independence is checked
    # on 8 devices, where 5 and 8 rows pad to one shape, and in test_samplers on the exact model):
    one = _tiny.sample_sharded([np.arange(13)])
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    eight = np.load(out)
    assert one.shape == (13, 8, 8, 3) and np.isfinite(one).all()
    assert np.std(one) > 0.05  # not a degenerate all-clipped output
    # equal up to float32 rounding: the CPU convolution's and products' blocking depends on the
    # batch size, which changes the summation order (differences seen: up to 1.5e-5 on [-1, 1])
    np.testing.assert_allclose(eight["full"], one, atol=5e-5, rtol=0)
    np.testing.assert_allclose(eight["split"], one, atol=5e-5, rtol=0)


def test_sharded_run_with_recorded_noises_matches_direct_loop():
    import jax.numpy as jnp
    from _gmm import GMM, K

    from jaxdiff.diffusion import guides
    from jaxdiff.diffusion import samplers as S
    from jaxdiff.diffusion.schedules import make_schedule

    g = GMM()
    sched = make_schedule("cosine", 1000, "6")
    run = S.make_sampler(lambda p: (g.model_fn, None), S.SamplerSpec("ddpm", clip_denoised=False), (2,))
    rng = np.random.default_rng(0)
    x_T = rng.normal(size=(5, 2)).astype(np.float32)
    noises = rng.normal(size=(6, 5, 2)).astype(np.float32)
    ids = np.arange(5)
    cond = guides.make_cond(5, ids % K)
    out = parallel.sample_batch_sharded(run, {}, sched, cond, jax.random.key(0), ids, x_T=x_T, noises=noises)
    want = S.sample_loop(g.model_fn, sched, jnp.asarray(x_T), cond, sampler="ddpm", noises=jnp.asarray(noises),
                         clip_denoised=False, loop="python")
    np.testing.assert_allclose(out, np.asarray(want), atol=1e-5)


def test_state_shardings_split_t5_xxl_over_fsdp_8():
    """IF's text encoder (T5-v1.1-XXL, 4.76 B bfloat16 parameters, abstract: nothing allocated) over fsdp=8 with
    the training default min_shard_size: every kernel and the embedding are split 8 ways, only the norm
    scales and the small relative-position table stay whole, so a device holds total / 8 (bench_if_memory.py)."""
    from flax.traverse_util import flatten_dict
    from jax.sharding import AbstractMesh, AxisType

    from jaxdiff.models import t5

    config = t5.t5_config_from_json({"d_model": 4096, "num_layers": 24, "d_ff": 10240, "num_heads": 64, "d_kv": 64,
                                     "vocab_size": 32128, "feed_forward_proj": "gated-gelu"})
    tree = t5.abstract_t5_params(t5.T5Encoder(config, dtype=jax.numpy.bfloat16, param_dtype=jax.numpy.bfloat16))
    mesh = AbstractMesh((1, 8), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    shardings = parallel.state_shardings(tree, mesh)
    leaves, specs = flatten_dict(tree), flatten_dict(shardings)
    total = sum(x.size * x.dtype.itemsize for x in leaves.values())
    assert sum(x.size for x in leaves.values()) == 4_762_310_656
    for path, x in leaves.items():
        large = path[-1] in ("kernel", "embedding") and x.size >= parallel.DEFAULT_MIN_SHARD_SIZE
        if large:
            assert int(np.prod(specs[path].shard_shape(x.shape))) * 8 == x.size, path
        else:
            assert specs[path].is_fully_replicated and x.size < parallel.DEFAULT_MIN_SHARD_SIZE, path
    assert sum(p[-1] == "kernel" for p in leaves) == 24 * 7  # q, k, v, o, wi_0, wi_1, wo per layer: all split
    per_device = parallel.bytes_per_device(tree, shardings)
    assert total / 8 <= per_device <= total / 8 * 1.001
