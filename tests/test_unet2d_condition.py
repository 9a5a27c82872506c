"""diffusers' UNet2DConditionModel (the DeepFloyd IF / unCLIP subset): parity with diffusers 0.42.1 through
the folder path (config.json + safetensors), and the converter's and config's errors.

Fixtures (copies of /work/shared/fixtures/cascade/*.npz, made with PyTorch 2.13 CPU float32 and diffusers
0.42.1 on tiny random configurations, every parameter perturbed; layouts are PyTorch's: NCHW, Linear (out, in),
Conv (out, in, kh, kw); each model's config.json is stored as a JSON string `<name>_config`):
  if_tiny_a.npz: IF stage I `unet1` (16x16, text_proj, attention-pooled text, group-normed cross-attention
    input, scale-shift, GELU) and stage II `unet2` (32x32, 6 input channels, class_embed_type "timestep",
    layers_per_block [1, 2], mid_block_scale_factor 1.414, GELU time embedding of width 32); t5_out is
    their encoder_hidden_states.
  unclip_tiny_a.npz: unCLIP's `decoder` (class_embed_type "identity" fed text_proj_time_embeddings,
    encoder_hidden_states text_proj_hidden_states, attention_mask decoder_attention_mask).
"""

import dataclasses
import json

import _cascade as C
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxdiff.convert.diffusers import (
    expected_unet2d_shapes,
    flax_path,
    load_diffusers_unet,
    unet2d_config,
    unet2d_params_from_state_dict,
)
from jaxdiff.models.unet2d import unet2d_model_config
from jaxdiff.models.unet2d_condition import (
    UNet2DConditionModel,
    unet2d_condition_config,
)


def write_folder(path, config, sd):
    return C.write_diffusers_folder(path, "UNet2DConditionModel", config, sd)


def nhwc(a):
    return jnp.asarray(np.moveaxis(np.asarray(a), 1, -1))


def rel_err(out_nhwc, ref_nchw):
    out = np.moveaxis(np.asarray(out_nhwc, np.float64), -1, 1)
    ref = np.asarray(ref_nchw, np.float64)
    assert out.shape == ref.shape
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def run_folder(tmp_path, z, prefix, x, t, context, dtype=None, **kw):
    module, params, _ = load_diffusers_unet(write_folder(tmp_path / prefix, C.config_of(z, prefix + "_config"),
                                                           C.state_dict(z, prefix)), dtype=dtype)
    assert isinstance(module, UNet2DConditionModel)
    fn = jax.jit(lambda p, x, t, c, kw: module.apply({"params": p}, x, t, c, **kw))
    return fn(params, nhwc(z[x]), jnp.asarray(z[t]), jnp.asarray(z[context]),
              {k: jnp.asarray(z[v]) for k, v in kw.items()})


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------


def test_if_stage1_parity(tmp_path, if_a):
    out = run_folder(tmp_path, if_a, "unet1", "unet1_x", "unet1_t", "t5_out")
    assert out.dtype == jnp.float32
    assert rel_err(out, if_a["unet1_out"]) <= C.TOL


def test_if_stage2_parity(tmp_path, if_a):
    out = run_folder(tmp_path, if_a, "unet2", "unet2_x", "unet2_t", "t5_out", class_labels="unet2_noise_level")
    assert rel_err(out, if_a["unet2_out"]) <= C.TOL


def test_unclip_decoder_parity(tmp_path, unclip_a):
    z = unclip_a
    assert not z["decoder_attention_mask"].all()  # the mask matters
    out = run_folder(tmp_path, z, "decoder", "decoder_x", "decoder_t", "text_proj_hidden_states",
                     class_labels="text_proj_time_embeddings", attention_mask="decoder_attention_mask")
    assert rel_err(out, z["decoder_out"]) <= C.TOL


def test_unclip_decoder_bfloat16(tmp_path, unclip_a):
    """bfloat16 compute (float32 parameters, norms, softmax, embeddings and output head) stays close."""
    z = unclip_a
    out = run_folder(tmp_path, z, "decoder", "decoder_x", "decoder_t", "text_proj_hidden_states", dtype="bfloat16",
                     class_labels="text_proj_time_embeddings", attention_mask="decoder_attention_mask")
    assert out.dtype == jnp.float32
    assert rel_err(out, z["decoder_out"]) <= 5e-2


def test_state_dict_round_trip(if_a):
    """The inverse mapping gives back the state_dict, key for key (no compile: shapes by eval_shape)."""
    cfg = C.config_of(if_a, "unet2_config")
    sd = C.state_dict(if_a, "unet2")
    params = unet2d_params_from_state_dict(sd, cfg)
    flat = flatten_dict(params)
    assert {flax_path(k, v.ndim) for k, v in sd.items()} == set(flat)  # the documented key -> path rule
    C.assert_round_trip(sd, cfg)


# ------------------------------------------------------------------------------------------------
# Config errors: one ValueError naming the field and what is allowed
# ------------------------------------------------------------------------------------------------


# UNet2DConditionModel's fields (IF's stage I config) and UNet2DModel's (unCLIP's upsampler config)
REFUSED = [("unet1", e) for e in [
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
     ["down_block_types", "CrossAttnDownBlock2D", "ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D"]),
    ("up_block_types", ["SimpleCrossAttnUpBlock2D", "UpBlock2D"], ["up_block_types", "ResnetUpsampleBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DCrossAttn", ["mid_block_type", "'UNetMidBlock2DSimpleCrossAttn'"]),
    ("class_embed_type", "projection", ["class_embed_type", "'timestep'", "'identity'"]),
    ("addition_embed_type", "text_time", ["addition_embed_type", "'text'"]),
    ("encoder_hid_dim_type", "image_proj", ["encoder_hid_dim_type", "'text_proj'"]),
    ("cross_attention_norm", "layer_norm", ["cross_attention_norm", "'group_norm'"]),
    ("resnet_time_scale_shift", "spatial", ["resnet_time_scale_shift", "'default'", "'scale_shift'"]),
    ("act_fn", "tanh", ["act_fn", "'silu'", "'gelu'"]),
    ("time_embedding_type", "fourier", ["time_embedding_type", "'positional'"]),
    ("num_class_embeds", 10, ["num_class_embeds", "None"]),
    ("class_embeddings_concat", True, ["class_embeddings_concat", "False"]),
    ("time_cond_proj_dim", 8, ["time_cond_proj_dim"]),
    ("attention_type", "gated", ["attention_type", "'default'"]),
    ("layers_per_block", [1, 1, 1], ["layers_per_block", "one per down block"]),
    ("norm_num_groups", 24, ["norm_num_groups=24", "does not divide"]),
    ("attention_head_dim", 128, ["attention_head_dim=128"]),
    ("conv_in_kernel", 4, ["conv_in_kernel", "odd"]),
    ("cross_attention_dimm", 32, ["'cross_attention_dimm'", "did you mean 'cross_attention_dim'"]),
    ("_class_name", "UNet2DModel", ["_class_name", "UNet2DConditionModel"]),
]] + [("super_res", e) for e in [
    ("down_block_types", ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
     ["down_block_types", "'AttnDownBlock2D' is not in the subset", "ResnetDownsampleBlock2D"]),
    ("up_block_types", ["UpBlock2D", "ResnetUpsampleBlock2D"], ["up_block_types", "ResnetUpsampleBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DCrossAttn", ["mid_block_type", "'UNetMidBlock2D'"]),
    ("time_embedding_type", "fourier", ["time_embedding_type", "'positional'"]),
    ("num_class_embeds", 10, ["num_class_embeds", "None"]),
    ("class_embed_type", "projection", ["class_embed_type", "'timestep'"]),
    ("resnet_time_scale_shift", "spatial", ["resnet_time_scale_shift", "'scale_shift'"]),
    ("norm_num_groups", 24, ["norm_num_groups=24", "does not divide"]),
    ("layers_per_block", [1, 1], ["layers_per_block", "a positive integer"]),
    ("cross_attention_dim", 32, ["'cross_attention_dim' is not a UNet2DModel argument"]),
]]


@pytest.mark.parametrize("which,case", REFUSED, ids=[f"{w}-{c[0]}" for w, c in REFUSED])
def test_config_outside_subset(if_a, unclip_a, which, case):
    field, value, words = case
    check, base = ((unet2d_condition_config, C.config_of(if_a, "unet1_config")) if which == "unet1"
                   else (unet2d_model_config, C.config_of(unclip_a, "super_res_config")))
    C.assert_refused(check, {**base, field: value}, words)


def test_config_ignored_fields_and_defaults(if_a):
    """Fields without effect on the subset are accepted; an absent field takes diffusers' default (here
    down_block_types: CrossAttnDownBlock2D, refused, naming the field)."""
    base = C.config_of(if_a, "unet1_config")
    cfg = unet2d_condition_config({**base, "upcast_attention": True, "use_linear_projection": True,
                                   "_name_or_path": "x", "sample_size": 64})
    assert dataclasses.replace(cfg, sample_size=None) == dataclasses.replace(unet2d_condition_config(base),
                                                                             sample_size=None)
    # mid_block_only_cross_attention follows a boolean only_cross_attention, as in diffusers
    only = unet2d_condition_config({**base, "only_cross_attention": True})
    assert only.only_cross_attention == (True, True) and only.mid_block_only_cross_attention
    no_down = {k: v for k, v in base.items() if k != "down_block_types"}
    with pytest.raises(ValueError, match="down_block_types.*CrossAttnDownBlock2D"):
        unet2d_condition_config(no_down)


def test_bad_config_refused_before_weights_are_read(tmp_path, if_a):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**C.config_of(if_a, "unet1_config"), "class_embed_type": "projection"}))
    with pytest.raises(ValueError, match="class_embed_type"):
        load_diffusers_unet(folder)  # no weights file: the config is refused first


# ------------------------------------------------------------------------------------------------
# Weight errors: missing, unexpected, wrongly shaped keys, listed together
# ------------------------------------------------------------------------------------------------


def test_missing_unexpected_and_wrong_shape_keys(tmp_path, if_a):
    cfg, sd = C.config_of(if_a, "unet1_config"), C.state_dict(if_a, "unet1")
    missing = "down_blocks.1.attentions.0.add_k_proj.weight"
    bad = dict(sd)
    del bad[missing]
    with pytest.raises(ValueError, match=rf"1 missing, 0 unexpected, 0 wrongly shaped(.|\n)*missing key '{missing}'"):
        load_diffusers_unet(write_folder(tmp_path / "missing", cfg, bad))

    extra = dict(sd, **{"mid_block.attentions.1.to_q.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected key 'mid_block.attentions.1.to_q.weight' \(64, 64\)"):
        load_diffusers_unet(write_folder(tmp_path / "unexpected", cfg, extra))

    wrong = dict(sd, **{"conv_in.weight": np.zeros((32, 6, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"key 'conv_in.weight' has shape \(32, 6, 3, 3\), the model needs "
                                         r"\(32, 3, 3, 3\)"):
        unet2d_params_from_state_dict(wrong, cfg)

    # stage II's weights under stage I's config: every problem listed in one error
    with pytest.raises(ValueError) as e:
        unet2d_params_from_state_dict(C.state_dict(if_a, "unet2"), cfg)
    msg = str(e.value)
    assert "unexpected key 'class_embedding.linear_1.weight'" in msg and "wrongly shaped" in msg

    ints = dict(sd, **{"conv_in.bias": np.zeros(32, np.int64)})
    with pytest.raises(ValueError, match="conv_in.bias.*floating"):
        unet2d_params_from_state_dict(ints, cfg)


def test_weights_files(tmp_path, if_a):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(C.config_of(if_a, "unet1_config")))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_diffusers_unet(folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"")
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs PyTorch"):
            load_diffusers_unet(folder)


def test_input_errors(if_a):
    cfg = unet2d_config(C.config_of(if_a, "unet2_config"))
    module = UNet2DConditionModel(cfg)
    x = jax.ShapeDtypeStruct((2, 32, 32, 6), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((2, 5, 32), jnp.float32)
    init = lambda *a, **k: jax.eval_shape(lambda a, k: module.init(jax.random.key(0), *a, **k), a, k)
    init(x, t, ctx, class_labels=t)
    with pytest.raises(ValueError, match="class_labels are required"):
        init(x, t, ctx)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[2, S, 32\]"):
        init(x, t, jax.ShapeDtypeStruct((2, 5, 31), jnp.float32), class_labels=t)
    with pytest.raises(ValueError, match="multiples of 2"):
        init(jax.ShapeDtypeStruct((2, 31, 32, 6), jnp.float32), t, ctx, class_labels=t)


def test_other_supported_options_trace(if_a):
    """Options outside the fixtures that the subset implements: the layout and a traced call (eval_shape,
    nothing compiled) are consistent, and only_cross_attention drops to_k / to_v as diffusers does."""
    cfg = unet2d_condition_config({
        **C.config_of(if_a, "unet1_config"), "only_cross_attention": [False, True], "mid_block_only_cross_attention": True,
        "flip_sin_to_cos": False, "freq_shift": 1, "time_embedding_act_fn": "silu", "timestep_post_act": "mish",
        "center_input_sample": True, "act_fn": "silu", "resnet_time_scale_shift": "default", "dropout": 0.1,
        "resnet_skip_time_act": True, "resnet_out_scale_factor": 2.0, "attention_head_dim": [16, 32],
        "class_embed_type": "identity", "encoder_hid_dim": 48, "addition_embed_type_num_heads": 4})
    shapes = expected_unet2d_shapes(cfg)
    assert "down_blocks.1.attentions.0.to_k.weight" not in shapes and "mid_block.attentions.0.to_v.bias" not in shapes
    # up block i takes the reversed list's entry i: up block 0 (the deepest level) is cross-attention only
    assert "up_blocks.0.attentions.1.to_k.weight" not in shapes and "up_blocks.0.attentions.1.add_k_proj.weight" in shapes
    assert shapes["up_blocks.0.attentions.0.to_q.weight"] == (64, 64)
    assert shapes["encoder_hid_proj.weight"] == (32, 48) and shapes["add_embedding.norm1.weight"] == (48,)
    module = UNet2DConditionModel(cfg)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    ctx = jax.ShapeDtypeStruct((2, 5, 48), jnp.float32)
    labels = jax.ShapeDtypeStruct((2, 128), jnp.float32)
    mask = jax.ShapeDtypeStruct((2, 5), jnp.bool_)
    args = (x, 3.0, ctx, labels, mask)
    params = jax.eval_shape(lambda a: module.init(jax.random.key(0), *a), args)["params"]
    out = jax.eval_shape(lambda p, a: module.apply({"params": p}, *a, train=True, rngs={"dropout": jax.random.key(1)}),
                         params, args)
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32


def test_shared_rows_match_the_repeated_input(if_a, unclip_a):
    """shared_rows=2 (classifier-free guidance's branches share x and t) gives the outputs of the input
    repeated twice, with the conditioning's own 2B rows: IF's stage II (class labels, 6 input channels) and
    unCLIP's decoder (identity class labels, attention mask)."""
    from jaxdiff.convert.diffusers import unet2d_module, unet2d_params_from_state_dict

    for z, key, extra in ((if_a, "unet2", lambda c, b: dict(class_labels=jnp.asarray([0, 100, 250, 999])[:2 * b])),
                          (unclip_a, "decoder", None)):
        cfg = C.config_of(z, key + "_config")
        module = unet2d_module(cfg)
        params = unet2d_params_from_state_dict(C.state_dict(z, key), cfg)
        x = jnp.asarray(np.moveaxis(z[key + "_x"], 1, -1))[:2]
        t = jnp.asarray(z[key + "_t"])[:2]
        if key == "decoder":
            ctx = jnp.asarray(z["text_proj_hidden_states"])
            kw = dict(class_labels=jnp.asarray(z["text_proj_time_embeddings"]),
                      attention_mask=jnp.asarray(z["decoder_attention_mask"]))
            ctx, kw = jnp.concatenate([ctx, ctx[::-1]]), {k: jnp.concatenate([v, v[::-1]]) for k, v in kw.items()}
        else:
            ctx = jnp.asarray(z["t5_out"])
            kw = extra(ctx, 2)
        apply = jax.jit(lambda x, t, ctx, kw, r, m=module, p=params: m.apply({"params": p}, x, t, ctx,
                                                                              shared_rows=r, **kw),
                        static_argnums=4)
        shared = apply(x, t, ctx, kw, 2)
        repeated = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]), ctx, kw, 1)
        np.testing.assert_allclose(np.asarray(shared), np.asarray(repeated), rtol=0, atol=2e-5 * float(
            np.abs(np.asarray(repeated)).max()), err_msg=key)


def test_text_conditioning_gives_the_same_output(if_a, unclip_a):
    """The text conditioning computed once (`text_conditioning`: the pooled text embedding and every attention
    layer's text keys and values) in place of the encoder states gives the network's output: IF's stage I
    (encoder_hid_proj, attention-pooled text), stage II (class labels), unCLIP's decoder (attention mask, with
    shared_rows=2), and a config with cross_attention_norm and cross-attention-only layers (random weights)."""
    from jaxdiff.convert.diffusers import unet2d_module, unet2d_params_from_state_dict
    from jaxdiff.models.unet2d_condition import text_conditioning

    def check(module, params, x, t, ctx, kw, shared_rows=1, name=""):
        fn = jax.jit(lambda p, ctx, kw, cached: module.apply(
            {"params": p}, x, t, text_conditioning(module, p, ctx) if cached else ctx, shared_rows=shared_rows, **kw),
            static_argnums=3)
        plain, cached = np.asarray(fn(params, ctx, kw, False)), np.asarray(fn(params, ctx, kw, True))
        assert np.abs(plain).max() > 0
        np.testing.assert_allclose(cached, plain, rtol=0, atol=1e-6 * float(np.abs(plain).max()), err_msg=name)

    for z, key in ((if_a, "unet1"), (if_a, "unet2"), (unclip_a, "decoder")):
        cfg = C.config_of(z, key + "_config")
        module, params = unet2d_module(cfg), unet2d_params_from_state_dict(C.state_dict(z, key), cfg)
        x, t = nhwc(z[key + "_x"]), jnp.asarray(z[key + "_t"])
        if key == "decoder":
            ctx = jnp.asarray(z["text_proj_hidden_states"])
            kw = dict(class_labels=jnp.asarray(z["text_proj_time_embeddings"]),
                      attention_mask=jnp.asarray(z["decoder_attention_mask"]))
            check(module, params, x, t, ctx, kw, name=key)
            ctx, kw = jnp.concatenate([ctx, ctx[::-1]]), {k: jnp.concatenate([v, v[::-1]]) for k, v in kw.items()}
            check(module, params, x, t, ctx, kw, shared_rows=2, name=key + " shared rows")
        else:
            kw = dict(class_labels=jnp.asarray(z["unet2_noise_level"])) if key == "unet2" else {}
            check(module, params, x, t, jnp.asarray(z["t5_out"]), kw, name=key)
    cfg = unet2d_condition_config({**C.config_of(if_a, "unet1_config"), "cross_attention_norm": "group_norm",
                                   "only_cross_attention": [False, True], "encoder_hid_dim": 48})
    module = UNet2DConditionModel(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    ctx = jax.random.normal(jax.random.key(2), (2, 5, 48))
    params = jax.jit(module.init)(jax.random.key(0), x, 3.0, ctx)["params"]
    check(module, params, x, 3.0, ctx, {}, name="cross_attention_norm")


def test_text_conditioning_errors(if_a):
    from jaxdiff.models.unet2d_condition import text_conditioning

    cfg = unet2d_config(C.config_of(if_a, "unet1_config"))
    module = UNet2DConditionModel(cfg)
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    ctx = jax.ShapeDtypeStruct((2, 5, cfg.context_dim), jnp.float32)
    params = jax.eval_shape(lambda x, c: module.init(jax.random.key(0), x, 3.0, c), x, ctx)["params"]
    with pytest.raises(ValueError, match=rf"encoder_hidden_states must be \[B, S, {cfg.context_dim}\]"):
        jax.eval_shape(lambda p: text_conditioning(module, p, jnp.zeros((2, 5, cfg.context_dim + 1))), params)
    text = jax.eval_shape(lambda p, c: text_conditioning(module, p, c), params, ctx)
    with pytest.raises(ValueError, match="text_conditioning must have 4 rows in every array, got \\[2\\]"):
        jax.eval_shape(lambda p, x, t: module.apply({"params": p}, x, 3.0, t, shared_rows=2), params, x, text)
