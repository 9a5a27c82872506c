"""Text guidance through jaxdiff's own guides and samplers, against openai/glide-text2im's 10-step
trajectories (tests/fixtures/glide/glide_tiny_a.npz): classifier-free guidance over captions (ancestral
and DDIM) and CLIP guidance (ancestral), plus the classifier-free identities."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_glide import TINY_OPTIONS, max_rel_err, nhwc

from jaxdiff.convert.clip import from_glide_clip
from jaxdiff.convert.glide import from_glide
from jaxdiff.diffusion import guidance
from jaxdiff.diffusion import guides as G
from jaxdiff.diffusion import samplers as S
from jaxdiff.diffusion.schedules import make_schedule
from jaxdiff.util import cpu

GLIDE = pathlib.Path(__file__).parent / "fixtures" / "glide"
SHAPE = (16, 16, 3)


@pytest.fixture(scope="module")
def fx():
    with np.load(GLIDE / "glide_tiny_a.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def nets(fx):
    def sd(prefix):
        return {k[len(prefix):]: v for k, v in fx.items() if k.startswith(prefix)}

    unet = from_glide(sd("unet/"), TINY_OPTIONS)
    image = from_glide_clip(sd("clip_image/"), "clip-image", **json.loads(str(fx["clip_image_kwargs"])))
    text = from_glide_clip(sd("clip_text/"), "clip-text", **json.loads(str(fx["clip_text_kwargs"])))
    return {"model": unet, "clip_image": image, "clip_text": text}


@pytest.fixture(scope="module")
def sched(fx):
    s = make_schedule("cosine", 1000, "10")  # glide's "squaredcos_cap_v2", respaced to "10"
    np.testing.assert_array_equal(np.asarray(s.timestep_map), fx["r10/timestep_map"])
    return s


def _builder(nets, guides):
    module = nets["model"][0]

    def build(p):
        fns = {k: guidance.network_fn(nets[k][0], p[k], k.replace("_", "-")) for k in p if k != "model"}
        return guidance.build_guides(guides, G.unet_fn(module, p["model"]), fns=fns, uncond=G.caption_dropout,
                              learned_sigma=True, prepare=G.text_encoder(module, p["model"]))

    return build


def _params(nets, *names):
    return {k: nets[k][1] for k in ("model",) + names}


def _cfg_cond(fx, rows=slice(0, 2)):
    """Rows 0-1: captions 0 and 1; their unconditional input: the empty caption (rows 2-3)."""
    tok, mask = fx["cfg_tokens"], fx["cfg_mask"]
    return {"tokens": jnp.asarray(tok[rows]), "mask": jnp.asarray(mask[rows]),
            "null_tokens": jnp.asarray(tok[2:4]), "null_mask": jnp.asarray(mask[2:4]),
            G.CFG_SCALE: jnp.full((2,), float(fx["cfg_scale"]), jnp.float32)}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cfg_over_captions_matches_glide(fx, nets, sched, sampler):
    run = S.make_sampler(_builder(nets, "cfg"), S.SamplerSpec(sampler, learned_sigma=True), SHAPE)
    noises = jnp.moveaxis(jnp.asarray(fx["r10/cfg_noises"]), 2, -1)[:, :2]
    out = run(_params(nets), sched, _cfg_cond(fx), jax.random.key(0), np.arange(2),
              x_T=nhwc(fx["x_T"][:2]), noises=noises if sampler == "ddpm" else None)
    ref = fx["r10/cfg_sample" if sampler == "ddpm" else "r10/cfg_ddim"][:2]  # the notebook keeps rows 0-1
    err = max_rel_err(np.moveaxis(np.asarray(out), -1, 1), ref)
    assert err <= 1e-3, err


def test_clip_guided_ancestral_matches_glide(fx, nets, sched):
    run = S.make_sampler(_builder(nets, "clip"), S.SamplerSpec("ddpm", learned_sigma=True), SHAPE)
    shape = fx["r10/clip_noises"].shape
    noises = jnp.moveaxis(jnp.asarray(fx["r10/clip_noises"]), 2, -1)
    assert noises.shape == shape[:2] + SHAPE
    cond = {"tokens": jnp.asarray(fx["tokens"]), "mask": jnp.asarray(fx["mask"]),
            "clip_tokens": jnp.asarray(fx["clip_text_tokens"], jnp.int32),
            "clip_len": jnp.asarray(fx["clip_text_len"], jnp.int32),
            G.CLIP_SCALE: jnp.full((4,), float(fx["clip_guidance_scale"]), jnp.float32)}
    out = run(_params(nets, "clip_image", "clip_text"), sched, cond, jax.random.key(0), np.arange(4),
              x_T=nhwc(fx["x_T"]), noises=noises)
    err = max_rel_err(np.moveaxis(np.asarray(out), -1, 1), fx["r10/clip_sample"])
    assert err <= 1e-3, err


def test_cfg_identities_over_captions(fx, nets):
    """s = 1 is the conditional output, s = 0 the empty caption's (eps channels; the variance channels are
    the conditional model's)."""
    module, params = nets["model"]
    prepare = G.text_encoder(module, params)
    guided = G.classifier_free(G.unet_fn(module, params), uncond=G.caption_dropout, learned_sigma=True)
    plain = G.unet_fn(module, params)
    x, t = nhwc(fx["x"][:2]), jnp.asarray(fx["t"][:2])

    @cpu.jit
    def outs(s):
        cond = prepare(dict(_cfg_cond(fx), **{G.CFG_SCALE: jnp.full((2,), s)}))
        return guided(x, t, cond), plain(x, t, cond), plain(x, t, G.caption_dropout(cond))

    g1, cond_out, _ = outs(1.0)
    g0, _, uncond_out = outs(0.0)
    np.testing.assert_allclose(g1, cond_out, atol=1e-5)
    np.testing.assert_allclose(g0[..., :3], uncond_out[..., :3], atol=1e-5)
    np.testing.assert_allclose(g0[..., 3:], cond_out[..., 3:], atol=1e-6)


def test_sample_py_with_captions_cfg_and_clip(fx, nets, tmp_path):
    """sample.py on converted GLIDE-style models with captions: CFG over captions, then the clip guide;
    the captions are tokenized with the model's own word vocabulary and stored with the samples."""
    import subprocess
    import sys

    from jaxdiff.convert import converted
    from jaxdiff.sample import runner

    words = [f"w{i}" for i in range(63)]  # 63 words + the end id = the fixture's n_vocab 64
    dirs = {}
    for name, kind in (("model", nets["model"][0]), ("clip_image", "clip-image"), ("clip_text", "clip-text")):
        module, params = nets[name]
        flags = {f: getattr(module, f) for f in module.__dataclass_fields__ if f not in ("parent", "name")}
        kind = "text2im" if name == "model" else kind
        dirs[name] = converted.save_converted(tmp_path / name, params, kind, flags,
                                            dict(noise_schedule="cosine", diffusion_steps=1000, learn_sigma=True),
                                            source="glide")
        cfg = json.loads((dirs[name] / "config.json").read_text())
        cfg["text"] = {"vocab": words}
        (dirs[name] / "config.json").write_text(json.dumps(cfg))
    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(root / "sample.py"), "--config", str(root / "configs" / "sample.py"),
                        f"--config.model={dirs['model']}", f"--config.out={out}", "--config.sample.guidance=cfg",
                        "--config.sample.scale=3", "--config.sample.captions=w1 w2 w3|w40", "--config.sample.steps=3",
                        "--config.sample.num_samples=4", "--config.sample.batch_size=4"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 16, 16, 3) and "arr_1" not in f.files
        assert list(f["captions"]) == ["w1 w2 w3", "w40", "w1 w2 w3", "w40"]
    cfg = runner.default_config()
    cfg.update(dict(model=str(dirs["model"]), clip_image=str(dirs["clip_image"]), clip_text=str(dirs["clip_text"]),
                    out=str(tmp_path / "clip")))
    cfg.sample.update(guidance="clip", clip_scale=3.0, captions="w5 w6", steps=3, num_samples=2, batch_size=2,
                      sampler="ddpm", progress=False)
    res = runner.run(cfg)
    assert res["images"].shape == (2, 16, 16, 3)
    cfg.sample.captions = "w5 nope"
    with pytest.raises(ValueError, match="nope"):
        runner.run(cfg)
