"""unCLIP's (Karlo's) sampling: trajectory parity with diffusers' UnCLIPPipeline (prior -> text projection ->
decoder -> super-resolution) through the converter and load_model, and `sample.py --config.pipeline=unclip`
(jaxdiff.sample.unclip_run) end to end.

Fixture tests/fixtures/unclip_tiny_a.npz (copy of /work/shared/fixtures/cascade/; README section unclip_tiny_a):
diffusers 0.42.1 on tiny random models, every random draw recorded in call order (`pipeline/noises`). Prior: 5
steps, CFG 4; decoder: 5 steps, CFG 8; super-resolution 16 -> 64: 3 steps. Parity is max |ours - reference| /
max |reference|.

The final images cannot match to 1e-3 at every pixel: at t = 999 the decoder and the upsamplers derive x0 =
(x - sqrt(1 - abar) eps) / sqrt(abar) with 1 / sqrt(abar_999) = 2e4, and the few pixels not clipped to [-1, 1]
carry eps's float32 rounding, amplified, to the end. In diffusers itself a relative change of 1e-6 in the
decoder's image moves the final images by 7e-3 (max), and diffusers' own UnCLIPPipeline rebuilt from the
fixture's weights (transformers' text encoder for the empty caption) lands 1.1e-2 from the recorded images. So
the image test bounds the bulk (mean and 99th percentile) tightly and the worst pixel loosely; the image
embeddings (no such step: the prior predicts x0) meet 1e-4.
"""

import pathlib

import _cascade as C
import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def z(unclip_a):
    return unclip_a


def _rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _noises(z):
    """The recorded draws, in call order, each in our layout (NHWC for images)."""
    flat, out, pos = z["pipeline/noises"], [], 0
    for s in z["pipeline/noise_shapes"]:
        shape = tuple(int(d) for d in str(s).split(","))
        a = flat[pos:pos + int(np.prod(shape))].reshape(shape)
        pos += a.size
        out.append(np.moveaxis(a, 1, -1) if a.ndim == 4 else a)
    assert pos == flat.size
    return out


def _replay(draws, steps):
    """(x_T, step noises [steps, ...]) of one stage: its first draw, then one a step (none at the last)."""
    x_T, rest = draws[0], draws[1:steps]
    return jnp.asarray(x_T), jnp.asarray(np.stack(list(rest) + [np.zeros_like(x_T)]))


@pytest.fixture(scope="module")
def karlo(z, tmp_path_factory):
    """The fixture as a Karlo pipeline folder, and every part converted by `python -m jaxdiff.convert`."""
    from jaxdiff.convert.__main__ import main as convert

    root = tmp_path_factory.mktemp("unclip")
    folder = C.write_karlo_folder(root / "karlo", z)
    conv = root / "converted"
    for sub in (*C.KARLO_PARTS, "text_encoder"):
        source = "transformers" if sub == "text_encoder" else "diffusers"
        assert convert(["--source", source, str(folder / sub), "--out", str(conv / sub)]) == 0
    return dict(root=root, folder=folder, converted=conv)


@pytest.fixture(scope="module")
def trajectory(z, karlo):
    """Our pipeline on the fixture's prompts, every stage replaying the recorded noises."""
    from jaxdiff.checkpoints import load_model
    from jaxdiff.diffusion import guides
    from jaxdiff.diffusion.conditioning import PROMPT_KEY
    from jaxdiff.models.clip_text import encode_clip_text
    from jaxdiff.sample import unclip

    m = {k: load_model(str(karlo["converted"] / k)) for k in (*C.KARLO_PARTS, "text_encoder")}
    assert [m[k][2]["kind"] for k in ("prior", "text_proj", "text_encoder")] == ["prior", "unclip_text_proj",
                                                                                 "clip_text"]
    clip, cparams, _ = m["text_encoder"]
    tokens = np.concatenate([z["clip_tokens"], z["clip_uncond_tokens"]])  # the empty caption last
    out = encode_clip_text(clip, cparams, tokens)                       # no mask, as the pipeline runs it
    text = unclip.TextTable(out.text_embeds, out.last_hidden_state,
                            jnp.asarray(np.concatenate([z["clip_mask"], z["clip_uncond_mask"]])))
    draws = _noises(z)
    b, rows = 2, jnp.arange(2, dtype=jnp.int32)
    key, ids = jax.random.key(0), jnp.arange(b)
    steps = [int(z[f"pipeline/{s}_num_inference_steps"]) for s in ("prior", "decoder", "super_res")]

    prior, pparams, _ = m["prior"]
    fn, sched = unclip.prior_sampler(prior, b, steps[0])
    np.testing.assert_array_equal(np.asarray(sched.timestep_map)[::-1], [999, 749, 500, 250, 0])
    cond = {PROMPT_KEY: rows, guides.CFG_SCALE: jnp.full((b,), float(z["pipeline/prior_guidance_scale"]))}
    x = fn({"model": pparams, "text": text}, sched, cond, key, ids, 0.0, *_replay(draws[:5], steps[0]))
    embeds = unclip.post_process(pparams, x)

    (tp, tparams, _), (dec, dparams, _) = m["text_proj"], m["decoder"]
    fn, sched = unclip.decoder_sampler(tp, dec, b, steps[1])
    cond = {PROMPT_KEY: rows, unclip.IMAGE_EMBED_KEY: jnp.asarray(embeds),
            guides.CFG_SCALE: jnp.full((b,), float(z["pipeline/decoder_guidance_scale"]))}
    small = fn({"model": dparams, "text_proj": tparams, "text": text}, sched, cond, key, ids, 0.0,
               *_replay(draws[5:10], steps[1]))

    (first, fparams, _), (last, lparams, _) = m["super_res_first"], m["super_res_last"]
    fn, sched = unclip.super_res_sampler(first, last, steps[2])
    big = fn({"first": fparams, "last": lparams}, sched, {guides.LOW_RES_KEY: jnp.clip(small, -1, 1)}, key, ids,
             0.0, *_replay(draws[10:], steps[2]))
    return dict(embeds=embeds, images=np.clip(np.asarray(big) * 0.5 + 0.5, 0, 1))


def test_image_embeddings_parity(z, trajectory):
    err = _rel_err(trajectory["embeds"], z["pipeline/image_embeddings"])
    print(f"image embeddings: {err:.3g}")
    assert err <= 1e-4


def test_final_images_parity(z, trajectory):
    d = np.abs(trajectory["images"] - z["pipeline/images"]) / np.abs(z["pipeline/images"]).max()
    print(f"images: mean {d.mean():.3g}, 99th percentile {np.quantile(d, 0.99):.3g}, max {d.max():.3g}")
    assert d.mean() <= 1e-4 and np.quantile(d, 0.99) <= 1e-3 and d.max() <= 0.15


def test_unclip_spacing_and_last_step():
    """UnCLIPScheduler's timesteps (round(k * 999 / (N - 1)), descending); its last step returns x0 scaled by
    beta_0 / (1 - abar_0) in float32 (not exactly 1), which the schedule keeps."""
    from jaxdiff.diffusion.schedules import make_schedule, named_betas

    np.testing.assert_array_equal(make_schedule("cosine", 1000, "unclip3").timestep_map, [0, 500, 999])
    np.testing.assert_array_equal(make_schedule("cosine", 1000, "unclip7").timestep_map,
                                  [0, 166, 333, 500, 666, 832, 999])
    with pytest.raises(ValueError, match="allowed: 2..1000"):
        make_schedule("cosine", 1000, "unclip1")
    b = named_betas("cosine", 1000).astype(np.float32)
    coef = np.float32(b[0]) / (np.float32(1) - (np.float32(1) - b[0]))
    sched = make_schedule("cosine", 1000, "unclip5")
    assert float(sched.posterior_mean_coef1[0]) == float(coef) != 1.0
    assert float(sched.posterior_mean_coef2[0]) == 0.0
