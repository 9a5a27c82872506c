"""GLIDE's text-conditional ADM (Text2ImUNet and variants): parity with openai/glide-text2im
(tests/fixtures/glide/glide_tiny_a.npz), text caching, released layouts, conversion and its errors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import checkpoints
from jaxdiff.convert.__main__ import main
from jaxdiff.convert.glide import flags_from_glide, from_glide
from jaxdiff.convert.guided_diffusion import expected_state_dict_shapes, to_guided_diffusion
from jaxdiff.diffusion import schedules
from jaxdiff.diffusion.guides import guided_output
from jaxdiff.models import create_model, encode_text
from jaxdiff.util import cpu

GLIDE = pathlib.Path(__file__).parent / "fixtures" / "glide"
RELEASED = json.loads((GLIDE / "released_keys" / "released.json").read_text())

# The fixture's architecture as GLIDE options (its constructor kwargs are in the npz's unet_kwargs).
TINY_OPTIONS = ("--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
                "--num_head_channels 16 --text_ctx 8 --xf_width 32 --xf_layers 2 --xf_heads 4 --n_vocab 64 "
                "--dropout 0.0 --use_fp16 False")
# A configuration without a fixture: super-resolution, no final LayerNorm, no padding embedding, one text
# block of 2 heads, 2 attention heads in the U-Net, fixed variance (3 output channels).
OTHER_OPTIONS = ("--super_res True --image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
                 "--attention_resolutions 8 --num_heads 2 --num_head_channels -1 --text_ctx 8 --xf_width 32 "
                 "--xf_layers 1 --xf_heads 2 --xf_final_ln False --xf_padding False --n_vocab 64 "
                 "--learn_sigma False --use_fp16 False")


def max_rel_err(a, b):
    """max |a - b| relative to max |b| (at least 1), the fixture README's measure."""
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(1.0, np.max(np.abs(b))))


def nhwc(a):
    return jnp.asarray(np.moveaxis(np.asarray(a), 1, -1))


def read_listing(path):
    out = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


# ------------------------------------------------------------------------------------------------
# Helpers for sampling with the fixture (the lead's 10-step trajectories r10/cfg_sample, r10/cfg_ddim)
# ------------------------------------------------------------------------------------------------


def text_encoder(module):
    """Jitted encode(params, tokens, mask) -> cond entries {"xf_proj": [B, 4C], "xf_out": [B, text_ctx,
    xf_width]}: the captions of a sampling run, encoded once."""
    return cpu.jit(lambda p, tok, m: dict(zip(("xf_proj", "xf_out"), encode_text(module, p, tok, m))))


def glide_model_fn(module, params):
    """model_fn(x, t, cond) -> [B, H, W, out_channels] on the cached text features in cond."""

    def model_fn(x, t, cond):
        return module.apply({"params": params}, x, t, text=(cond["xf_proj"], cond["xf_out"]))

    return model_fn


def glide_cfg_fn(model_fn, scale):
    """GLIDE's notebook CFG: rows [conditional captions; empty captions], x's first half used for both;
    eps = eps_u + s (eps_c - eps_u) in both halves, each row keeps its own variance channels."""

    def fn(x, t, cond):
        b = x.shape[0] // 2
        out = model_fn(jnp.concatenate([x[:b], x[:b]]), t, cond)
        g = guided_output(out[:b], out[b:], jnp.full((b,), scale), learned_sigma=True)
        return jnp.concatenate([g, jnp.concatenate([g[..., :3], out[b:, ..., 3:]], axis=-1)])

    return fn


# ------------------------------------------------------------------------------------------------
# Fixtures: the converted tiny model and its compiled calls (each program compiled once)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glide():
    with np.load(GLIDE / "glide_tiny_a.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def unet_sd(glide):
    return {k[5:]: v for k, v in glide.items() if k.startswith("unet/")}


@pytest.fixture(scope="module")
def tiny(unet_sd):
    return from_glide(unet_sd, TINY_OPTIONS)


@pytest.fixture(scope="module")
def calls(tiny):
    """(encode, full, cached): the text encoder, the U-Net on captions, the U-Net on cached text."""
    module, _ = tiny
    full = cpu.jit(lambda p, x, t, tok, m: module.apply({"params": p}, x, t, tok, m))
    cached = cpu.jit(lambda p, x, t, cond: glide_model_fn(module, p)(x, t, cond))
    return text_encoder(module), full, cached


# ------------------------------------------------------------------------------------------------
# Parity with openai/glide-text2im
# ------------------------------------------------------------------------------------------------


def test_flags_match_the_fixture(glide, tiny):
    module, _ = tiny
    kw = json.loads(str(glide["unet_kwargs"]))
    assert type(module).__name__ == "Text2ImUNet" and module.n_vocab == kw["tokenizer"]["n_vocab"]
    for k, v in kw.items():
        if k not in ("tokenizer", "cache_text_emb"):
            assert getattr(module, k) == (tuple(v) if isinstance(v, list) else v), k


def test_text_encoder_parity(glide, tiny, calls):
    cond = calls[0](tiny[1], glide["tokens"], glide["mask"])
    assert max_rel_err(cond["xf_proj"], glide["xf_proj"]) <= 1e-5
    assert max_rel_err(np.swapaxes(cond["xf_out"], 1, 2), glide["xf_out"]) <= 1e-5


def test_unet_parity_padding_and_cache(glide, tiny, calls):
    params = tiny[1]
    encode, full, cached = calls
    x, t = nhwc(glide["x"]), glide["t"]
    out = full(params, x, t, glide["tokens"], glide["mask"])
    assert max_rel_err(np.moveaxis(out, -1, 1), glide["unet_out"]) <= 1e-4
    # ids where the mask is off have no effect
    swapped = full(params, x, t, glide["tokens_pad_swapped"], glide["mask"])
    assert not np.array_equal(glide["tokens_pad_swapped"], glide["tokens"])
    np.testing.assert_array_equal(swapped, out)
    np.testing.assert_array_equal(glide["unet_out_pad_swapped"], glide["unet_out"])
    # the text encoded once and cached gives the per-call result
    out_cached = cached(params, x, t, encode(params, glide["tokens"], glide["mask"]))
    np.testing.assert_allclose(out_cached, out, rtol=0, atol=1e-6)


def test_classifier_free_guidance_parity(glide, tiny, calls):
    params = tiny[1]
    encode, _, cached = calls
    cond = encode(params, glide["cfg_tokens"], glide["cfg_mask"])
    assert not glide["cfg_mask"][2:].any()  # rows 2-3: the empty caption
    guided = glide_cfg_fn(lambda x, t, c: cached(params, x, t, c), float(glide["cfg_scale"]))
    out = guided(nhwc(glide["x"]), glide["cfg_t"], cond)
    assert max_rel_err(np.moveaxis(out, -1, 1), glide["cfg_out"]) <= 1e-4


def test_schedule_and_respacing_match_glide(glide):
    np.testing.assert_allclose(schedules.named_betas("cosine", 1000), glide["betas"], rtol=1e-12, atol=0)
    for spacing, key in (("10", "r10/timestep_map"), ("100", "timestep_map_100")):
        np.testing.assert_array_equal(schedules.space_timesteps(1000, spacing), glide[key])
    betas, tmap = schedules.respace_betas(glide["betas"], glide["r10/timestep_map"])
    np.testing.assert_allclose(betas, glide["r10/betas"], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(tmap, glide["r10/timestep_map"])


# ------------------------------------------------------------------------------------------------
# Released checkpoints: exact layouts and parameter counts (shapes only, nothing allocated)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "upsample"])
def test_released_layouts(name):
    info = RELEASED[name]
    kind, model_flags, diffusion = flags_from_glide(info["options"])
    module = create_model(kind, **model_flags)
    assert type(module).__name__.lower() == info["model_class"].lower()
    expected = expected_state_dict_shapes(module, kind)  # jax.eval_shape of init
    listing = read_listing(GLIDE / "released_keys" / f"{name}.txt")
    assert list(expected.items()) == list(listing.items())  # keys, shapes and state_dict order
    assert len(expected) == info["n_tensors"]
    assert sum(int(np.prod(s)) for s in expected.values()) == info["n_params"]
    assert expected["input_blocks.0.0.weight"][1] == info["in_channels"]
    assert diffusion["noise_schedule"] == ("linear" if "upsample" in name else "cosine")


@pytest.mark.parametrize("name, kind, options", [
    ("base-inpaint", "text2im_inpaint", TINY_OPTIONS + " --inpaint True"),
    ("upsample-inpaint", "text2im_superres_inpaint", TINY_OPTIONS + " --inpaint True --super_res True"),
])
def test_inpaint_layouts(name, kind, options, tiny):
    """The released inpainting layouts are base / upsample's with a wider first convolution (x, the masked
    image, the mask [, the low-res image]); the inpainting kinds (tiny ones here) widen it the same way."""
    info, plain = RELEASED[name], RELEASED[name.replace("-inpaint", "")]
    listing = read_listing(GLIDE / "released_keys" / f"{name}.txt")
    plain_listing = read_listing(GLIDE / "released_keys" / f"{name.replace('-inpaint', '')}.txt")
    first = "input_blocks.0.0.weight"
    assert listing[first][1] == info["in_channels"] and listing == {**plain_listing, first: listing[first]}
    c = listing[first][0] * 9
    assert info["n_params"] - plain["n_params"] == c * (info["in_channels"] - plain["in_channels"])
    assert flags_from_glide(info["options"])[0] == kind
    kind_, flags, _ = flags_from_glide(options)
    assert kind_ == kind
    expected = expected_state_dict_shapes(create_model(kind, **flags))
    tiny_listing = expected_state_dict_shapes(tiny[0])
    assert expected == {**tiny_listing, first: (32, info["in_channels"], 3, 3)}


def test_glide_option_errors():
    with pytest.raises(ValueError, match="unknown GLIDE flag --xf_layer .*--xf_layers"):
        flags_from_glide("--xf_layer 3")
    with pytest.raises(ValueError, match="contradicts kind"):
        flags_from_glide("--super_res True", "text2im")
    with pytest.raises(ValueError, match="2 \\*\\* \\(levels \\+ 2\\) == image_size"):
        flags_from_glide("--image_size 32 --channel_mult 1,2")
    with pytest.raises(ValueError, match="xf_heads=3 does not divide xf_width=32"):
        kind, flags, _ = flags_from_glide(TINY_OPTIONS + " --xf_heads 3")
        create_model(kind, **flags)
    kind, flags, _ = flags_from_glide(TINY_OPTIONS)
    del flags["xf_width"]
    with pytest.raises(ValueError, match="missing required flag.*xf_width"):
        create_model(kind, **flags)


# ------------------------------------------------------------------------------------------------
# Conversion errors name the key (and the GLIDE option that most likely differs)
# ------------------------------------------------------------------------------------------------


def _err(sd, options=TINY_OPTIONS):
    with pytest.raises(ValueError) as info:
        from_glide(sd, options)
    return str(info.value)


def test_missing_unexpected_and_misshaped_keys(unet_sd):
    sd = dict(unet_sd)
    del sd["input_blocks.3.1.encoder_kv.bias"]
    assert "missing key 'input_blocks.3.1.encoder_kv.bias'" in _err(sd)
    sd = dict(unet_sd, **{"transformer.resblocks.2.ln_1.weight": np.zeros(32, np.float32)})
    msg = _err(sd)
    assert "unexpected key 'transformer.resblocks.2.ln_1.weight'" in msg and "xf_layers" in msg
    sd = dict(unet_sd, **{"token_embedding.weight": np.zeros((65, 32), np.float32)})
    msg = _err(sd)
    assert "'token_embedding.weight' has shape (65, 32), the model needs (64, 32)" in msg and "n_vocab" in msg
    assert "likely flag: xf_padding" in _err(unet_sd, TINY_OPTIONS + " --xf_padding False")
    assert "likely flag: xf_final_ln" in _err(unet_sd, TINY_OPTIONS + " --xf_final_ln False")
    # a GLIDE checkpoint given a guided-diffusion kind is told to use the text kinds
    from jaxdiff.convert.guided_diffusion import from_guided_diffusion

    flags = {k: v for k, v in flags_from_glide(TINY_OPTIONS)[1].items() if not k.startswith(("xf_", "text", "n_"))}
    with pytest.raises(ValueError, match="text2im"):
        from_guided_diffusion(unet_sd, "unet", **flags)


# ------------------------------------------------------------------------------------------------
# A configuration without a fixture: flags build, convert and run; layout from the README's rules
# ------------------------------------------------------------------------------------------------


def derived_other_layout():
    """The OTHER_OPTIONS state_dict layout derived from the fixture's listing by the README's rules."""
    out = {}
    for key, shape in read_listing(GLIDE / "glide_tiny_a.unet.txt").items():
        if key.startswith(("final_ln.", "padding_embedding", "transformer.resblocks.1.")):
            continue  # xf_final_ln False, xf_padding False, xf_layers 1
        if key == "input_blocks.0.0.weight":
            shape = (shape[0], 6) + shape[2:]  # x and the upsampled low-res image
        if key.startswith("out.2."):
            shape = (3,) + shape[1:]  # fixed variance: eps only
        out[key] = shape
    return out


def test_other_configuration_builds_converts_and_runs(glide):
    kind, flags, diffusion = flags_from_glide(OTHER_OPTIONS)
    assert kind == "text2im_superres" and diffusion["learn_sigma"] is False
    module = create_model(kind, **flags)
    expected = expected_state_dict_shapes(module, kind)
    assert list(expected.items()) == list(derived_other_layout().items())
    rng = np.random.default_rng(1)
    sd = {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in expected.items()}
    module2, params = from_glide(sd, OTHER_OPTIONS)
    assert module2 == module
    back = to_guided_diffusion(params, module2)
    assert list(back) == list(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)

    apply = cpu.jit(lambda p, x, t, tok, m, lr: module.apply({"params": p}, x, t, tok, m, low_res=lr))
    x, t, low = nhwc(glide["x"]), glide["t"], nhwc(glide["x"][:, :, ::2, ::2])
    out = apply(params, x, t, glide["tokens"], glide["mask"], low)
    assert out.shape == (4, 16, 16, 3) and np.isfinite(np.asarray(out)).all()
    # without xf_padding the mask is not used and every id counts
    np.testing.assert_array_equal(apply(params, x, t, glide["tokens"], ~glide["mask"], low), out)
    swapped = apply(params, x, t, glide["tokens_pad_swapped"], glide["mask"], low)
    assert np.abs(np.asarray(swapped[0] - out[0])).max() > 1e-4
    np.testing.assert_array_equal(swapped[1:], out[1:])
    # the head count of the text transformer is honoured (same parameters, other split)
    two, four = (text_encoder(m)(params, glide["tokens"][:1], None)["xf_out"] for m in (module, module.clone(xf_heads=4)))
    assert np.abs(np.asarray(two - four)).max() > 1e-4


def test_call_errors_and_bfloat16(tiny, glide):
    module, params = tiny
    x, t = nhwc(glide["x"]), glide["t"]
    with pytest.raises(ValueError, match="xf_padding=True\\): pass mask"):
        module.apply({"params": params}, x, t, glide["tokens"])
    with pytest.raises(ValueError, match="tokens must have shape \\[B, text_ctx\\] = \\[B, 8\\]"):
        module.apply({"params": params}, x, t, glide["tokens"][:, :5], glide["mask"][:, :5])
    with pytest.raises(ValueError, match="token id 64 is outside the vocabulary 0..63"):
        module.apply({"params": params}, x, t, np.full((4, 8), 64), glide["mask"])
    with pytest.raises(ValueError, match="needs the captions"):
        module.apply({"params": params}, x, t)
    with pytest.raises(ValueError, match="either tokens/mask or the cached text"):
        module.apply({"params": params}, x, t, glide["tokens"], glide["mask"], text=(None, None))
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    out = jax.eval_shape(lambda p: module.clone(dtype="bfloat16").apply({"params": p}, x, t, glide["tokens"],
                                                                        glide["mask"]), abstract)
    assert out.shape == (4, 16, 16, 6) and out.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# Command line: --source glide writes a directory that checkpoints.load_model loads
# ------------------------------------------------------------------------------------------------


def test_command_line_glide(tmp_path, unet_sd, tiny):
    npz = tmp_path / "glide.npz"
    np.savez(npz, **unet_sd)
    out = tmp_path / "ckpt"
    assert main(["--source", "glide", "--npz", str(npz), "--flags", TINY_OPTIONS, "--out", str(out)]) == 0
    module, params, config = checkpoints.load_model(str(out))
    assert config["source"] == "glide" and config["model"]["kind"] == "text2im"
    assert config["diffusion"]["schedule"] == "cosine" and config["diffusion"]["learned_sigma"] is True
    assert module == tiny[0]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, tiny[1])
    with pytest.raises(SystemExit):
        main(["--source", "glide", "--kind", "unet", "--npz", str(npz), "--out", str(tmp_path / "x")])
