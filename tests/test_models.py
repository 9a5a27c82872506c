"""ADM networks: parity with openai/guided-diffusion, flag validation, labels, dtype, dropout, remat."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert.guided_diffusion import abstract_params, from_guided_diffusion
from jaxdiff.models import (
    EncoderUNetModel,
    SuperResModel,
    UNetModel,
    check_labels,
    create_model,
    upsample_bilinear,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

from _adm import CLASSIFIER_FLAGS as CLF_FLAGS  # the architecture of adm_tiny_a.npz
from _adm import UNET_FLAGS

# A small network for behaviour tests (8x8, one level).
TINY = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
            attention_resolutions=(1,), channel_mult=(1,), num_heads=2)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def random_params(module, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * scale), abstract_params(module)
    )


@pytest.fixture(scope="module")
def unet(adm):
    return from_guided_diffusion({k[5:]: adm[k] for k in adm if k.startswith("unet/")}, "unet", **UNET_FLAGS)


@pytest.fixture(scope="module")
def classifier(adm):
    sd = {k[11:]: adm[k] for k in adm if k.startswith("classifier/")}
    return from_guided_diffusion(sd, "classifier", **CLF_FLAGS)


@pytest.fixture(scope="module")
def variants():
    with np.load(FIXTURES / "adm_variants.npz") as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------------------
# Parity with guided-diffusion
# ------------------------------------------------------------------------------------------------


def test_unet_matches_guided_diffusion(adm, unet):
    module, params = unet
    assert isinstance(module, UNetModel)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))(
            params, nhwc(adm["x"]), jnp.asarray(adm["t"]), jnp.asarray(adm["y"])
        )
    assert out.shape == (4, 32, 32, 6) and out.dtype == jnp.float32
    assert rel(np.asarray(out).transpose(0, 3, 1, 2), adm["unet_out"]) <= 1e-4


def test_classifier_logits_and_guidance_gradient(adm, classifier):
    module, params = classifier
    assert isinstance(module, EncoderUNetModel)
    t, y = jnp.asarray(adm["t"]), jnp.asarray(adm["y"])
    scale = float(adm["classifier_scale"])

    def log_p(x):
        logits = module.apply({"params": params}, x, t)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return logp[jnp.arange(x.shape[0]), y].sum(), logits

    with jax.default_matmul_precision("highest"):
        (_, logits), grad = jax.jit(jax.value_and_grad(log_p, has_aux=True))(nhwc(adm["x"]))
    assert logits.shape == (4, 10)
    assert rel(logits, adm["classifier_logits"]) <= 1e-4
    assert rel(scale * np.asarray(grad).transpose(0, 3, 1, 2), adm["cond_grad"]) <= 1e-4


VARIANTS = ["unet_neworder_noss", "superres_avgpool_heads_up", "classifier_adaptive_half", "classifier_spatial_v2"]


@pytest.mark.parametrize("name", VARIANTS)
def test_flag_variants_match_reference(variants, name):
    """New/legacy QKV order, num_heads(_upsample), no scale-shift, conv/avg-pool resampling, fractional
    channel_mult, adaptive and spatial_v2 pooling, SuperResModel (tests/fixtures/README.md)."""
    flags = json.loads(str(variants[f"{name}/flags"]))
    kind = flags.pop("kind")
    prefix = f"{name}/sd/"
    sd = {k[len(prefix):]: variants[k] for k in variants if k.startswith(prefix)}
    module, params = from_guided_diffusion(sd, kind, **flags)
    args = [nhwc(variants[f"{name}/x"]), jnp.asarray(variants[f"{name}/t"])]
    kw = {}
    if f"{name}/y" in variants:
        kw["y"] = jnp.asarray(variants[f"{name}/y"])
    if kind == "superres":
        kw["low_res"] = nhwc(variants[f"{name}/low_res"])
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(lambda p, a, k: module.apply({"params": p}, *a, **k))(params, args, kw))
    if out.ndim == 4:
        out = out.transpose(0, 3, 1, 2)
    assert rel(out, variants[f"{name}/out"]) <= 1e-4


@pytest.mark.parametrize("size", [(16, 20), (20, 28)])
def test_superres_upsampling_is_torch_bilinear(variants, size):
    low = nhwc(variants["bilinear/low_res"])
    up = upsample_bilinear(low, *size)
    ref = variants[f"bilinear/up_{size[0]}x{size[1]}"]
    np.testing.assert_allclose(np.asarray(up).transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------


def test_classifier_and_unet_share_one_encoder():
    trunk = dict(image_size=32, in_channels=3, model_channels=32, num_res_blocks=2, attention_resolutions=(2,),
                 channel_mult=(1, 2), num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
    u = abstract_params(create_model("unet", out_channels=3, **trunk))
    c = abstract_params(create_model("classifier", out_channels=5, pool="attention", **trunk))
    enc = lambda p: {k: jax.tree_util.tree_map(lambda s: s.shape, v) for k, v in p.items()
                     if k.startswith(("input_blocks", "middle_block", "time_embed"))}
    assert enc(u) == enc(c)
    assert not any(k.startswith("output_blocks") for k in c)


def test_params_are_float32_and_init_works():
    m = create_model("unet", **TINY, num_classes=4, dtype="bfloat16")
    variables = jax.eval_shape(
        m.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    )
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert variables["params"]["label_emb"]["embedding"].shape == (4, 128)


# ------------------------------------------------------------------------------------------------
# bfloat16 compute
# ------------------------------------------------------------------------------------------------


def test_bfloat16_stays_close_to_float32(variants):
    """bfloat16 compute against the float32 PyTorch reference: close, not equal; params stay float32."""
    name = "classifier_adaptive_half"
    flags = json.loads(str(variants[f"{name}/flags"]))
    flags.pop("kind")
    prefix = f"{name}/sd/"
    sd = {k[len(prefix):]: variants[k] for k in variants if k.startswith(prefix)}
    m16, params16 = from_guided_diffusion(sd, "classifier", **flags, dtype="bfloat16")
    x, t = nhwc(variants[f"{name}/x"]), jnp.asarray(variants[f"{name}/t"])
    apply = lambda p: m16.apply({"params": p}, x, t)
    assert "bf16" in str(jax.make_jaxpr(apply)(params16))
    out16 = jax.jit(apply)(params16)
    assert out16.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params16))
    err = rel(out16, variants[f"{name}/out"])
    assert 1e-5 < err < 5e-2, err


def test_use_fp16_maps_to_bfloat16_unless_dtype_given():
    from jaxdiff.models.layers import compute_dtype

    assert compute_dtype(create_model("unet", **TINY, use_fp16=True)) == jnp.bfloat16
    assert compute_dtype(create_model("unet", **TINY, use_fp16=True, dtype="float32")) == jnp.float32
    assert compute_dtype(create_model("unet", **TINY)) == jnp.float32


# ------------------------------------------------------------------------------------------------
# Dropout, remat, labels
# ------------------------------------------------------------------------------------------------


def test_dropout_only_in_training():
    m = create_model("unet", **{**TINY, "dropout": 0.5, "attention_resolutions": ()})
    params = random_params(m)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)), jnp.float32)
    t = jnp.array([10, 500])
    f = jax.jit(lambda p, key, train: m.apply({"params": p}, x, t, train=train, rngs={"dropout": key}),
                static_argnums=2)
    eval_a, eval_b = f(params, jax.random.key(0), False), f(params, jax.random.key(1), False)
    train_a, train_b = f(params, jax.random.key(0), True), f(params, jax.random.key(1), True)
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(train_a, f(params, jax.random.key(0), True))


def test_use_checkpoint_is_remat():
    flags = dict(TINY, use_scale_shift_norm=True)
    plain, remat = create_model("unet", **flags), create_model("unet", **flags, use_checkpoint=True)
    params = random_params(plain)
    assert jax.tree_util.tree_structure(abstract_params(remat)) == jax.tree_util.tree_structure(params)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 3)), jnp.float32)
    t = jnp.array([3, 700])
    loss = lambda m: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, t) ** 2))
    is_remat = lambda m: re.search(r"\b(remat\d*|checkpoint)\[", str(jax.make_jaxpr(loss(m))(params)))
    assert is_remat(remat) and not is_remat(plain)


def test_check_labels():
    np.testing.assert_array_equal(check_labels([0, 9], 10), [0, 9])
    np.testing.assert_array_equal(check_labels([10], 10, null_label=True), [10])
    with pytest.raises(ValueError, match=r"y=10 .*0\.\.9"):
        check_labels([3, 10], 10)
    with pytest.raises(ValueError, match="y=-1"):
        check_labels(np.array([-1]), 10, null_label=True)
    with pytest.raises(ValueError, match="y=11"):
        check_labels([11], 10, null_label=True)
    with pytest.raises(ValueError, match="integers"):
        check_labels([1.5], 10)
    with pytest.raises(ValueError, match="unconditional"):
        check_labels([1], None)


def test_labels_checked_in_apply_and_null_label():
    m = create_model("unet", **TINY, num_classes=4, null_label=True)
    params = random_params(m)
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.array([1, 2])
    with pytest.raises(ValueError, match="y=5"):
        m.apply({"params": params}, x, t, jnp.array([0, 5]))
    with pytest.raises(ValueError, match="unconditional"):
        create_model("unet", **TINY).apply({"params": random_params(create_model("unet", **TINY))}, x, t, jnp.array([0, 1]))
    none, null = jax.jit(lambda p: (m.apply({"params": p}, x, t), m.apply({"params": p}, x, t, jnp.array([4, 4]))))(
        params
    )
    np.testing.assert_allclose(none, null, rtol=1e-5, atol=1e-6)
    strict = create_model("unet", **TINY, num_classes=4)
    with pytest.raises(ValueError, match="pass labels y"):
        strict.apply({"params": random_params(strict)}, x, t)


# ------------------------------------------------------------------------------------------------
# Flag validation: every error is raised by create_model, before anything is traced or compiled
# ------------------------------------------------------------------------------------------------

BASE = dict(image_size=64, in_channels=3, model_channels=64, out_channels=6, num_res_blocks=2,
            attention_resolutions=(2, 4), channel_mult=(1, 2, 3, 4), num_head_channels=32)


@pytest.mark.parametrize(
    "kind, changes, match",
    [
        ("unet", dict(image_size=60), r"image_size=60 .*divisible by 8"),
        ("unet", dict(num_head_channels=-1, num_heads=5), r"num_heads=5 does not divide the 128 channels"),
        ("unet", dict(num_head_channels=48), r"num_head_channels=48 does not divide"),
        ("unet", dict(num_head_channels=-1, num_heads=2, num_heads_upsample=3), r"num_heads_upsample=3"),
        ("unet", dict(attention_resolutions=(16,)), r"ds\) this network never reaches.*\[1, 2, 4, 8\]"),
        ("unet", dict(attention_resolutions=(3,)), r"contains 3"),
        ("unet", dict(model_channels=48), r"multiple of 32"),
        ("unet", dict(channel_mult=()), r"channel_mult"),
        ("unet", dict(null_label=True), r"null_label=True needs num_classes"),
        ("unet", dict(dtype="float16"), r"dtype='float16'.*'float32' or 'bfloat16'"),
        ("unet", dict(dropout=1.5), r"dropout=1.5"),
        ("unet", dict(num_channels=64), r"unknown flag 'num_channels'.*did you mean 'model_channels'"),
        ("unet", dict(num_head_channel=32), r"unknown flag 'num_head_channel'.*did you mean 'num_head_channels'"),
        ("unet", dict(pool="attention"), r"unknown flag 'pool'"),
        ("classifier", dict(out_channels=10, pool="max"), r"pool='max' is unknown.*adaptive"),
        ("classifier", dict(pool="attention", num_head_channels=-1), r"needs num_head_channels"),
        ("classifier", dict(num_classes=10), r"unknown flag 'num_classes'"),
        ("superres", dict(image_size=100), r"image_size=100"),
        ("unett", dict(), r"unknown model kind 'unett'.*did you mean 'unet'"),
    ],
)
def test_bad_flags_raise_before_compiling(kind, changes, match):
    compiles = []

    def listener(event, duration, **kw):
        if "compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    flags = {**BASE, **changes}
    with pytest.raises(ValueError, match=match):
        create_model(kind, **flags)
    assert compiles == []


def test_missing_required_flag():
    flags = dict(BASE)
    del flags["num_res_blocks"]
    with pytest.raises(ValueError, match="num_res_blocks"):
        create_model("unet", **flags)


def test_input_errors():
    m = create_model("unet", **TINY)
    params = random_params(m)
    with pytest.raises(ValueError, match="NCHW"):
        m.apply({"params": params}, jnp.zeros((1, 3, 8, 8)), jnp.zeros((1,)))
    sr = create_model("superres", **TINY)
    with pytest.raises(ValueError, match="low_res"):
        sr.apply({"params": random_params(sr)}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))
    assert isinstance(sr, SuperResModel)
