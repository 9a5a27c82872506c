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
fixture's weights (transformers' text encoder for the empty caption) lands 1.1e-2 from the recorded images.
Ours with the decoder's weights each multiplied by (1 + 6e-8 N(0, 1)), one float32 rounding's worth, lands
(five draws, 2026-12-04) at a mean of 1.3e-5 to 1.25e-4, a 99th percentile of 2.1e-4 to 2.5e-3 and a max of
0.03 to 0.35 (unperturbed now: 9e-6, 1.3e-4, 0.019; 4.3e-5, 8.3e-4, 0.12 before the shared CFG input). So the image test bounds the mean at 3e-4 and the 99th
percentile at 5e-3, about twice the largest of those draws (a wrong variance, schedule or guidance moves the
mean by 1e-2 or more), and the worst pixel at 0.6 of the range; the image embeddings (no such step: the prior
predicts x0) meet 1e-4.
"""

import os
import pathlib
import shutil
import sys

import _cascade as C
import _training_helpers as H
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
    assert d.mean() <= 3e-4 and np.quantile(d, 0.99) <= 5e-3 and d.max() <= 0.6


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


def test_bicubic_antialias_upsample():
    """torch's F.interpolate(mode="bicubic", align_corners=False, antialias=True), 3x3 -> 5x5 (values recorded
    from torch 2.13): a = -0.5 and the weights renormalised at the borders, unlike plain bicubic."""
    from jaxdiff.sample.unclip import upsample_bicubic

    x = jnp.asarray([[0.0, 1.0, 0.5], [2.0, 3.0, -1.0], [0.25, -0.5, 1.0]]).reshape(1, 3, 3, 1)
    ref = [[-0.226415, 0.210363, 0.849057, 0.740707, 0.595408],
           [0.698465, 1.246464, 1.858209, 0.624944, -0.264644],
           [1.924528, 2.529851, 3.0, 0.447761, -1.301887],
           [0.963637, 0.931819, 0.817164, 0.430719, 0.187131],
           [0.184496, -0.277211, -0.764151, 0.439736, 1.295479]]
    np.testing.assert_allclose(np.asarray(upsample_bicubic(x, (5, 5)))[0, ..., 0], ref, atol=2e-6)


# --- sample.py --config.pipeline=unclip ------------------------------------------------------------------

N = 8
PROMPTS = "a red cube|the dark sky|"  # three prompts cycled over the samples; the last is the empty caption
SETTINGS = [f"--config.sample.num_samples={N}", "--config.sample.grid_max=4", "--config.unclip.steps=3,3,2",
            "--config.unclip.scales=4,6", "--config.sample.progress=False"]
KILL_AFTER = 5  # on 8 devices (batches of 4) the prior and the decoder write 2 shards each; the killed run dies after
# the super-resolution's first (having compiled every stage: the rerun finds them in the compilation cache)


def _start(k, name, devices, extra=(), kill=0):
    # XLA's default optimisation, as tests/test_if_sampling.py (the 1- and 8-device programs must round alike)
    env = H.env(devices=devices, opt0=False, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAXDIFF_TEST_KILL_AFTER_SHARDS=str(kill))
    cmd = [sys.executable, str(HERE / "_sample_worker.py"), "--config", str(ROOT / "configs" / "sample.py"),
           f"--jax_cache_dir={k['root'] / 'xla'}", "--config.pipeline=unclip", f"--config.unclip.folder={k['folder']}",
           f"--config.unclip.super_res_last={k['converted'] / 'super_res_last'}",
           f"--config.text_encoder={k['converted'] / 'text_encoder'}", f"--config.out={k['root'] / name}",
           *SETTINGS, *extra]
    return C.launch(cmd, env, k["root"] / f"{name}.{kill}.log")


def _wait(proc, timeout=400):
    return C.finish(proc, timeout)


@pytest.fixture(scope="module")
def runs(karlo):
    """1 device (batches of 1); 8 devices (batches of 4, padded: one sample a device, as on 1 device), killed (-9)
    in the super-resolution stage, then rerun; image variations from three of the 1-device run's embeddings."""
    k = karlo
    one = _start(k, "one", 1, [f"--config.prompts={PROMPTS}", "--config.sample.batch_size=1"])
    killed = _start(k, "eight", 8, [f"--config.prompts={PROMPTS}", "--config.sample.batch_size=4"], kill=KILL_AFTER)
    logs = {"one": _wait(one), "killed": _wait(killed)}
    k["after_kill"] = {s: sorted(os.listdir(k["root"] / "eight" / s)) for s in ("prior", "decoder", "super_res")}
    resumed = _start(k, "eight", 8, [f"--config.prompts={PROMPTS}", "--config.sample.batch_size=4"])
    assert logs["one"][0] == 0, logs["one"][1][-4000:]
    with np.load(k["root"] / "one" / "prior" / "embeddings.npz") as f:
        np.savez(k["root"] / "embeds.npz", image_embeds=f["arr_0"][:3])
    variations = _start(k, "variations", 1, [f"--config.unclip.image_embeddings={k['root'] / 'embeds.npz'}",
                                             "--config.sample.batch_size=1"])
    logs.update(resumed=_wait(resumed), variations=_wait(variations))
    C.assert_all_exited_ok(logs, ("resumed", "variations"))
    k["logs"] = logs
    return k


def test_pipeline_writes_each_stage(runs):
    captions = np.array(["a red cube", "the dark sky", ""] * N)[:N]
    out = runs["root"] / "one"
    embeds, caps = C.load_samples(out / "prior" / "embeddings.npz")
    assert embeds.shape == (N, 32) and embeds.dtype == np.float32 and sorted(os.listdir(out / "prior")) == [
        "embeddings.npz"]
    np.testing.assert_array_equal(caps, captions)
    assert not np.array_equal(embeds[0], embeds[3])
    for stage, size in (("decoder", 16), ("super_res", 64)):
        assert sorted(os.listdir(out / stage)) == ["grid.png", "samples.npz"]  # shards merged, then deleted
        images, caps = C.load_samples(out / stage / "samples.npz")
        assert images.shape == (N, size, size, 3) and images.dtype == np.uint8 and images.std() > 5
        np.testing.assert_array_equal(caps, captions)
        assert f"wrote {out / stage / 'samples.npz'} ({N} images) and {out / stage / 'grid.png'}" in \
            runs["logs"]["one"][1]


def test_same_bytes_on_1_and_8_devices_and_after_kill_9(runs):
    rc, log = runs["logs"]["killed"]
    assert rc == -9, log[-3000:]
    assert runs["after_kill"] == {"prior": ["embeddings.npz"], "decoder": ["grid.png", "samples.npz"],
                                  "super_res": ["shards"]}  # killed in the last stage
    resumed = runs["logs"]["resumed"][1]
    for stage, name in (("prior", "embeddings.npz"), ("decoder", "samples.npz")):
        assert f"{stage}/{name} already holds these settings' {N} samples: nothing to do" in resumed, resumed[-3000:]
    assert "sampled 1 of 2 batches, 1 were already in its shards/" in resumed, resumed[-3000:]
    for stage, name in (("prior", "embeddings.npz"), ("decoder", "samples.npz"), ("super_res", "samples.npz")):
        one, eight = (C.load_samples(runs["root"] / run / stage / name) for run in ("one", "eight"))
        assert one[0].tobytes() == eight[0].tobytes() and np.array_equal(one[1], eight[1]), stage


def test_image_variations(runs):
    out = runs["root"] / "variations"
    assert sorted(os.listdir(out)) == ["decoder", "super_res"]  # no prior
    images, caps = C.load_samples(out / "super_res" / "samples.npz")
    assert images.shape == (N, 64, 64, 3) and images.std() > 5 and set(caps) == {""}
    small, _ = C.load_samples(out / "decoder" / "samples.npz")
    assert not np.array_equal(small[0], small[3])  # the same embedding (row 0), other noise


# --- bad input: one error line, nothing loaded or compiled ----------------------------------------------

def test_bad_input_one_error_line_before_anything_compiles(karlo, tmp_path, monkeypatch, capsys):
    from jaxdiff.diffusion import samplers
    from jaxdiff.sample import runner, unclip_run
    from jaxdiff.util import cli

    def never(*a, **k):
        raise AssertionError("weights were loaded or a program was built")

    for name in ("load_part", "encode_text"):
        monkeypatch.setattr(unclip_run, name, never)
    monkeypatch.setattr(samplers, "make_sampler", never)
    folder = karlo["folder"]
    no_text = tmp_path / "no-text-encoder"
    shutil.copytree(folder, no_text, ignore=shutil.ignore_patterns("text_encoder"))
    wide_prior = C.changed_copy(folder / "prior", tmp_path / "wide-prior", clip_embed_dim=48)
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((2, 48), np.float32))
    base = dict(pipeline="unclip", prompts=PROMPTS)
    cases = [
        (dict(folder=str(no_text)), "config.prompts needs a CLIP text encoder"),
        (dict(prompts="", image_embeddings=str(wide)),
         f"config.unclip.image_embeddings='{wide}' holds embeddings of width 48; the decoder "
         f"({folder / 'text_proj'}) takes CLIP image embeddings of width 32"),
        (dict(prior=str(wide_prior)),
         f"the prior ({wide_prior}) makes CLIP image embeddings of width 48 (clip_embed_dim), but the text_proj "
         f"({folder / 'text_proj'}) takes clip_embeddings_dim=32"),
        (dict(image_embeddings=str(wide)), "give config.prompts (text to image) or config.unclip.image_embeddings"),
        (dict(steps="1,3,2"), "config.unclip.steps: the prior has 1 steps; allowed: 2..1000"),
        (dict(pipeline=""), "config.prompts applies to config.pipeline=if only"),
    ]
    for keys, message in cases:
        cfg = runner.default_config()
        cfg.unclip.folder, cfg.out = str(folder), str(tmp_path / "out")
        for k, v in {**base, **keys}.items():
            if k in ("pipeline", "prompts"):
                setattr(cfg, k, v)
            else:
                setattr(cfg.unclip, k, v)
        assert cli.report_errors(lambda cfg=cfg: runner.run(cfg, shards=True), "sample.py") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sample.py: error: ") and message in err[0], (message, err)
    assert not (tmp_path / "out").exists()
