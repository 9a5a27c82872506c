"""GLIDE's noised CLIP: encoders, converter and guidance gradient against glide-text2im's outputs
(tests/fixtures/glide/README.md, glide_tiny_a.npz) and the released checkpoints' key layouts."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert.__main__ import main
from jaxdiff.convert.clip import (
    CLIP_CONFIG,
    clip_config,
    encoder_kwargs,
    expected_clip_shapes,
    from_glide_clip,
    to_glide_clip,
)
from jaxdiff.convert.converted import load_converted
from jaxdiff.diffusion.clip_guide import (
    CLIP_SCALE,
    CLIP_TEXT_KEY,
    clip_guide,
    image_embedding_fn,
    logit_scale_exp,
    text_embeddings,
)
from jaxdiff.models.clip import create_clip_encoder
from jaxdiff.util import cpu

GLIDE = pathlib.Path(__file__).parent / "fixtures" / "glide"


def rel_err(a, ref):
    """Max abs error relative to the reference's max (at least 1), as the fixture README states it."""
    ref = np.asarray(ref)
    return float(np.max(np.abs(np.asarray(a) - ref)) / max(1.0, float(np.max(np.abs(ref)))))


@pytest.fixture(scope="module")
def fx():
    with np.load(GLIDE / "glide_tiny_a.npz") as f:
        return {k: f[k] for k in f.files if k.startswith("clip")}


def state_dict(fx, which):
    prefix = f"clip_{which}/"
    return {k[len(prefix):]: v for k, v in fx.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def image(fx):
    module, params = from_glide_clip(state_dict(fx, "image"), "clip-image", **json.loads(str(fx["clip_image_kwargs"])))
    return module, params


@pytest.fixture(scope="module")
def text(fx):
    module, params = from_glide_clip(state_dict(fx, "text"), "clip-text", **json.loads(str(fx["clip_text_kwargs"])))
    return module, params


@pytest.fixture(scope="module")
def guide(image):
    """(image embeddings, CLIP guidance gradient) from one compiled program (one compilation for both)."""
    image_fn = image_embedding_fn(*image)
    grad_fn = clip_guide(image_fn)
    return cpu.jit(lambda x, t, cond: (image_fn(x, t), grad_fn(x, t, cond)))


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def test_text_embedding_parity_and_padding(fx, text):
    module, params = text
    tokens, lens = fx["clip_text_tokens"], fx["clip_text_len"]
    out = np.asarray(text_embeddings(module, params, tokens, lens))
    assert rel_err(out, fx["clip_text_emb"]) <= 1e-5
    # ids after the end token (position text_len - 1) do not change the embedding
    swapped = tokens.copy()
    for b, n in enumerate(lens):
        swapped[b, n:] = (np.arange(n, tokens.shape[1]) * 7 + b) % 60 + 1
    assert not np.array_equal(swapped, tokens)
    np.testing.assert_array_equal(np.asarray(text_embeddings(module, params, swapped, lens)), out)
    with pytest.raises(ValueError, match="text_len"):
        text_embeddings(module, params, tokens, np.zeros_like(lens))


def test_image_embedding_and_guidance_gradient(fx, text, guide):
    assert logit_scale_exp(json.loads(str(fx["clip_config"]))["logit_scale"]) == float(fx["clip_logit_scale_exp"])
    emb = text_embeddings(*text, fx["clip_text_tokens"], fx["clip_text_len"])
    x, t = nhwc(fx["clip_x"]), jnp.asarray(fx["clip_t"])
    s = float(fx["clip_guidance_scale"])
    z_img, g = guide(x, t, {CLIP_SCALE: jnp.full((4,), s), CLIP_TEXT_KEY: emb})
    assert rel_err(z_img, fx["clip_image_emb"]) <= 1e-5
    g = np.asarray(g).transpose(0, 3, 1, 2)
    assert rel_err(g, fx["clip_grad"]) <= 1e-4
    # per-sample scales, same compiled program: scale 0 changes nothing, the others are unaffected
    g2 = np.asarray(guide(x, t, {CLIP_SCALE: jnp.asarray([s, 0.0, s, 0.0]), CLIP_TEXT_KEY: emb})[1]).transpose(0, 3, 1, 2)
    assert not np.any(g2[1::2])
    np.testing.assert_allclose(g2[0::2], g[0::2], rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError, match=CLIP_TEXT_KEY):
        clip_guide(image_embedding_fn(lambda *a: None, None))(x, t, {CLIP_SCALE: jnp.ones(4)})


def released_keys(name):
    rows = [line.split("\t") for line in (GLIDE / "released_keys" / f"{name}.txt").read_text().splitlines()]
    return {k: tuple(int(n) for n in s.strip("()").split(",") if n.strip()) for k, s in rows}


@pytest.mark.parametrize("kind,name", [("clip-image", "clip-image-enc"), ("clip-text", "clip-text-enc")])
def test_released_layouts(kind, name):
    released = json.loads((GLIDE / "released_keys" / "released.json").read_text())[name]
    config = {k: released["options"][k] for k in CLIP_CONFIG}
    assert config == CLIP_CONFIG
    module = create_clip_encoder(kind, **encoder_kwargs(kind, config))
    shapes = expected_clip_shapes(module)
    expected = released_keys(name)
    assert list(shapes.items()) == list(expected.items())  # keys, shapes and state_dict order
    # the layout is read from jax.eval_shape of the module's init (abstract_clip_params)
    n = sum(int(np.prod(shape)) for shape in shapes.values())
    assert n == released["n_params"] and len(shapes) == released["n_tensors"]


def test_fixture_key_lists_and_round_trip(fx, image, text):
    for which, (module, params) in (("image", image), ("text", text)):
        listed = [line.split("\t")[0] for line in (GLIDE / f"glide_tiny_a.clip_{which}.txt").read_text().splitlines()]
        back = to_glide_clip(params, module)
        assert list(back) == listed
        for k, v in back.items():
            np.testing.assert_array_equal(v, fx[f"clip_{which}/{k}"])


def test_strict_conversion_errors(fx):
    kw = json.loads(str(fx["clip_image_kwargs"]))
    sd = state_dict(fx, "image")
    missing = dict(sd)
    del missing["blocks.block_1.f_attn.f_k.w"]
    with pytest.raises(ValueError, match=r"missing key 'blocks\.block_1\.f_attn\.f_k\.w'"):
        from_glide_clip(missing, "clip-image", **kw)
    extra = {**sd, "blocks.block_1.f_attn.f_k.b": np.zeros(32, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected key 'blocks\.block_1\.f_attn\.f_k\.b'"):
        from_glide_clip(extra, "clip-image", **kw)
    with pytest.raises(ValueError, match=r"'blocks\.input\.w_t' has shape \(1000, 32\).*n_timesteps"):
        from_glide_clip(sd, "clip-image", **{**kw, "n_timestep": 999})
    with pytest.raises(ValueError, match="n_xf_blocks_image: the checkpoint has 2 blocks, these flags give 3"):
        from_glide_clip(sd, "clip-image", **{**kw, "n_xf_blocks": 3})
    with pytest.raises(ValueError, match="clip-text"):
        from_glide_clip(sd, "clip-text", **json.loads(str(fx["clip_text_kwargs"])))
    with pytest.raises(ValueError, match="did you mean 'clip-image'"):
        from_glide_clip(sd, "clip_image")
    with pytest.raises(ValueError, match="unknown glide CLIP config flag --n_embed"):
        clip_config("--n_embed 5")


def test_convert_command_and_loader(fx, tmp_path, text):
    cfg = json.loads(str(fx["clip_config"]))
    npz = tmp_path / "text-enc.npz"
    np.savez(npz, **state_dict(fx, "text"))
    flags = " ".join(f"--{k} {v}" for k, v in cfg.items() if k in ("n_vocab", "max_text_len", "n_embd",
                                                                  "n_head_text", "n_xf_blocks_text",
                                                                  "n_head_state_text"))
    assert main(["--npz", str(npz), "--kind", "clip-text", "--flags", flags, "--out", str(tmp_path / "out")]) == 0
    module, params, config = load_converted(tmp_path / "out")
    assert module == text[0] and config["source"] == "glide" and config["clip"]["logit_scale"] == 100.0
    assert config["diffusion"] == {"diffusion_steps": 1000, "noise_schedule": "squaredcos_cap_v2"}
    jax.tree.map(np.testing.assert_array_equal, params, text[1])
    with pytest.raises(SystemExit):  # ADM kinds still need their flags
        main(["--npz", str(npz), "--kind", "unet", "--out", str(tmp_path / "x")])
