"""DeepFloyd IF's sampling: trajectory parity with diffusers' IFPipeline / IFSuperResolutionPipeline through
the sampler and guide registries, and `sample.py --config.pipeline=if` (jaxdiff.sample.cascade) end to end.

Fixture tests/fixtures/if_tiny_a.npz (copy of /work/shared/fixtures/cascade/if_tiny_a.npz; its README, section
if_tiny_a): diffusers 0.42.1 on tiny random models, every random draw recorded. Stage I: 5 steps (timesteps
800..0, "leading"), CFG 7 on t5_out rows [0, 1] with the empty caption (row 2) as negative, dynamic
thresholding 0.95 / 1.5, learned-range variance; noises [0] = x_T, [k] = step k's. Stage II: stage I's images
upsampled (bilinear, aligned corners) to 32x32, noised to level 250 with noises[1], 4 steps (750..0).

Parity is max |ours - reference| / max |reference| (mean: the mean of |ours - reference| over that).
Stage II is held to the issue's 1e-3 (3.4e-4 here). Stage I is not, because its trajectory amplifies float32
rounding (CFG 7 on random weights: a 1e-6 relative change of the U-Net's output moves the result by ~4e-4)
so far that 1e-3 is below float32's own spread (tools run 2026-12-04 on this CPU): diffusers 0.42.1 itself,
float32, replaying the same noises here lands 1.08e-3 from the fixture (1.13e-3 on one thread), its float64
run 1.39e-3; jaxdiff with every weight multiplied by (1 + 6e-8 N(0, 1)), one rounding's worth, lands
1.07e-3 to 1.54e-3 at the largest element and 1.25e-4 to 1.56e-4 on average (five draws), stage II 2.8e-4 to
3.6e-4. Unperturbed (2026-12-05): 1.3e-3 and 1.27e-4 as this test compiles it (XLA -O0, tests/conftest.py),
9.8e-4 and 1.21e-4 at XLA's default optimisation, as sample.py compiles it: inside 1e-3 there, by the same
lottery. So stage I is held to 2e-3 at the largest element and 3e-4 on average: a wrong schedule, variance
or guidance moves the result by 1e-2 or more.
"""

import json
import os
import pathlib
import sys

import _cascade as C
import _training_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TOL = 1e-3          # stage II
TOL_STAGE1 = 2e-3   # stage I, max (module doc)
MEAN_STAGE1 = 3e-4  # stage I, mean


@pytest.fixture(scope="module")
def ref(if_a):
    return if_a


def _nhwc(a):
    return jnp.asarray(np.moveaxis(np.asarray(a), -3, -1))


def _rel_err(out_nhwc, ref_nchw) -> float:
    out = np.moveaxis(np.asarray(out_nhwc, np.float64), -1, 1)
    return float(np.abs(out - ref_nchw).max() / np.abs(ref_nchw).max())


def _mean_err(out_nhwc, ref_nchw) -> float:
    out = np.moveaxis(np.asarray(out_nhwc, np.float64), -1, 1)
    return float(np.abs(out - ref_nchw).mean() / np.abs(ref_nchw).max())


def _stage(ref, index):
    from jaxdiff.convert.diffusers import unet2d_config, unet2d_module, unet2d_params_from_state_dict
    from jaxdiff.sample.cascade import Stage

    prefix = f"unet{index + 1}"
    cfg = unet2d_config(json.loads(str(ref[prefix + "_config"])))
    steps = int(ref[f"stage{index + 1}/steps"])
    stage = Stage(index, "", cfg, cfg.sample_size, 3, True, steps, float(ref["stage1/guidance_scale"]))
    return stage, unet2d_module(cfg), unet2d_params_from_state_dict(C.state_dict(ref, prefix), cfg)


def _trajectory(ref, index):
    """Our sampler on the fixture's stage, replaying its recorded noises."""
    from jaxdiff.diffusion import conditioning, guides
    from jaxdiff.sample.cascade import stage_sampler

    stage, module, params = _stage(ref, index)
    rows = ref["stage1/prompt_rows"]
    states = jnp.asarray(ref["t5_out"][list(rows) + [int(ref["stage1/negative_row"])]])  # the empty caption last
    sampler_fn, sched = stage_sampler(module, stage, len(rows))
    np.testing.assert_array_equal(np.asarray(sched.timestep_map)[::-1], ref[f"stage{index + 1}/timesteps"])
    noises = _nhwc(ref[f"stage{index + 1}/noises"])
    cond = {conditioning.PROMPT_KEY: jnp.arange(len(rows), dtype=jnp.int32),
            guides.CFG_SCALE: jnp.full((len(rows),), stage.scale)}
    first = 1
    if index:
        cond[guides.LOW_RES_KEY] = _nhwc(ref["stage2/low_res"])
        cond[conditioning.NOISE_LEVEL_KEY] = jnp.full((len(rows),), int(ref["stage2/noise_level"]), jnp.int32)
        cond[conditioning.LOW_RES_NOISE_KEY] = noises[1]
        first = 2
    # loop step j (j = 0 at the highest t) takes the j-th recorded step noise; the last step (t = 0) adds none
    steps = jnp.concatenate([noises[first:], jnp.zeros_like(noises[:1])])
    assert steps.shape[0] == stage.steps
    return sampler_fn({"model": params, "text": states}, sched, cond, jax.random.key(0),
                      jnp.arange(len(rows)), 0.0, noises[0], steps)


def test_stage1_trajectory_parity(ref):
    out = _trajectory(ref, 0)
    err, mean = _rel_err(out, ref["stage1/images"]), _mean_err(out, ref["stage1/images"])
    print(f"stage I: {err:.3g} (mean {mean:.3g})")
    assert err <= TOL_STAGE1 and mean <= MEAN_STAGE1


def test_stage2_trajectory_parity(ref):
    err = _rel_err(_trajectory(ref, 1), ref["stage2/images"])
    print(f"stage II: {err:.3g}")
    assert err <= TOL


def test_leading_spacing_and_bilinear_align_corners():
    from jaxdiff.diffusion.conditioning import upsample_bilinear
    from jaxdiff.diffusion.schedules import make_schedule

    np.testing.assert_array_equal(make_schedule("cosine", 1000, "leading3").timestep_map, [0, 333, 666])
    with pytest.raises(ValueError, match="expected 'leadingN'"):
        make_schedule("cosine", 1000, "leadingx")
    x = jnp.arange(6.0).reshape(1, 2, 3, 1)  # align_corners: the corners stay, the rest interpolates linearly
    up = np.asarray(upsample_bilinear(x, (3, 5)))[0, ..., 0]
    np.testing.assert_allclose(up, [[0, 0.5, 1, 1.5, 2], [1.5, 2, 2.5, 3, 3.5], [3, 3.5, 4, 4.5, 5]], atol=1e-6)


def test_threshold_cap_keeps_defaults():
    from jaxdiff.diffusion import guides

    x0 = jnp.concatenate([jnp.full((1, 99), 4.0), jnp.zeros((1, 1))], axis=1)
    np.testing.assert_allclose(guides.dynamic_threshold(x0, 0.95)[0, 0], 1.0)   # s = 4, no cap
    np.testing.assert_allclose(guides.dynamic_threshold(x0, 0.95, 1.5)[0, 0], 1.0)  # clip to 1.5, / 1.5
    np.testing.assert_allclose(guides.dynamic_threshold(x0 / 8, 0.95, 1.5)[0, 0], 0.5)  # s = max(., 1) = 1
    with pytest.raises(ValueError, match="needs dynamic thresholding"):
        guides.make_x0_fn(dynamic_threshold_max=1.5)


# --- sample.py --config.pipeline=if ----------------------------------------------------------------------

N = 16
SETTINGS = [f"--config.sample.num_samples={N}", "--config.sample.grid_max=4", "--config.cascade.steps=3,2",
            "--config.cascade.scales=5,3", "--config.cascade.max_length=12", "--config.cascade.noise_level=100"]
PROMPTS = "a red cube|the dark sky|"  # three prompts cycled over the samples; the last is the empty caption
KILL_AFTER = 3  # on 8 devices (batches of 8) stage I writes 2 shards; the killed run dies after stage II's first


def _write_unet(path, config, sd):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config}))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "diffusion_pytorch_model.safetensors"))
    return path


def _write_t5(path, config, sd):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "model.safetensors"))
    return path


def _spiece(d, vocab_size):
    import sentencepiece as spm

    words = ["a", "the", "red", "blue", "cube", "sphere", "photo", "of", "cat", "dog", "dark", "sky", "on", "table"]
    rng = np.random.default_rng(0)
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(200)))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"),
                                   vocab_size=vocab_size, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return d / "spiece.model"


@pytest.fixture(scope="module")
def folders(ref, tmp_path_factory):
    """The fixture's stages as diffusers folders (stage I inside a pipeline folder, IF-I/unet), its T5 as a
    transformers folder (vocab_size 100), a sentencepiece model of 60 pieces trained here."""
    root = tmp_path_factory.mktemp("if")
    t5_config = json.loads(str(ref["t5_config"]))
    spm_path = _spiece(root, 60)
    from jaxdiff.data.t5_tokenizer import T5Tokenizer

    assert T5Tokenizer(spm_path).vocab_size <= t5_config["vocab_size"]
    f = dict(root=root, unet1=_write_unet(root / "IF-I" / "unet", json.loads(str(ref["unet1_config"])),
                                          C.state_dict(ref, "unet1")),
             unet2=_write_unet(root / "IF-II", json.loads(str(ref["unet2_config"])), C.state_dict(ref, "unet2")),
             t5=_write_t5(root / "text_encoder", t5_config, C.state_dict(ref, "t5")), spm=spm_path)
    # stage II and the text encoder as `python -m jaxdiff.convert` writes them: the pipeline reads both forms
    from jaxdiff.convert.__main__ import main as convert

    for key, source in (("unet2", "diffusers"), ("t5", "transformers")):
        f[key + "_converted"] = root / f"{key}-converted"
        assert convert(["--source", source, str(f[key]), "--out", str(f[key + "_converted"])]) == 0
    return f


def _start(f, name, devices, extra=(), kill=0, stages=None):
    # XLA's default optimisation (not the suite's usual -O0): at -O0 the CPU code of the 1- and 8-device
    # programs rounds differently in a few places
    env = H.env(devices=devices, opt0=False, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAXDIFF_TEST_KILL_AFTER_SHARDS=str(kill))
    stages = stages or f"{f['root'] / 'IF-I'},{f['unet2_converted']}"
    cmd = [sys.executable, str(HERE / "_sample_worker.py"), "--config", str(ROOT / "configs" / "sample.py"),
           f"--jax_cache_dir={f['root'] / 'xla'}", "--config.pipeline=if", f"--config.prompts={PROMPTS}",
           f"--config.stages={stages}", f"--config.text_encoder={f['t5_converted']}", f"--config.tokenizer={f['spm']}",
           f"--config.out={f['root'] / name}", *SETTINGS, *extra]
    return C.launch(cmd, env, f["root"] / f"{name}.{kill}.log")


def _wait(proc, timeout=300):
    return C.finish(proc, timeout)


@pytest.fixture(scope="module")
def runs(folders):
    """1 device (batches of 1); 8 devices (batches of 8: one sample a device, as on 1 device), killed (-9) in
    stage II, then rerun; stage I alone on 8 devices with the parameters split over 2 (mesh.fsdp=2)."""
    f = folders
    one = _start(f, "one", 1, ["--config.sample.batch_size=1"])
    killed = _start(f, "eight", 8, ["--config.sample.batch_size=8"], kill=KILL_AFTER)
    logs = {"one": _wait(one), "killed": _wait(killed)}
    f["after_kill"] = {stage: sorted(os.listdir(f["root"] / "eight" / stage)) for stage in ("stage1", "stage2")}
    resumed = _start(f, "eight", 8, ["--config.sample.batch_size=8"])
    fsdp = _start(f, "fsdp", 8, ["--config.sample.batch_size=8", "--config.mesh.fsdp=2", "--config.cascade.steps=3",
                                 "--config.cascade.scales=5"], stages=str(f["unet1"]))
    logs.update(resumed=_wait(resumed), fsdp=_wait(fsdp))
    C.assert_all_exited_ok(logs, ("one", "resumed", "fsdp"))
    f["logs"] = logs
    return f


def test_pipeline_writes_each_stage(runs):
    captions = np.array(["a red cube", "the dark sky", ""] * N)[:N]
    for stage, size in (("stage1", 16), ("stage2", 32)):
        out = runs["root"] / "one" / stage
        assert sorted(os.listdir(out)) == ["grid.png", "samples.npz"]  # shards merged, then deleted
        images, caps = C.load_samples(out / "samples.npz")
        assert images.shape == (N, size, size, 3) and images.dtype == np.uint8 and images.std() > 5
        np.testing.assert_array_equal(caps, captions)
        log = runs["logs"]["one"][1]
        assert f"wrote {out / 'samples.npz'} ({N} images) and {out / 'grid.png'}" in log, log[-2000:]


def test_same_images_on_1_and_8_devices_and_after_kill_9(runs):
    rc, log = runs["logs"]["killed"]
    assert rc == -9, log[-3000:]
    assert runs["after_kill"] == {"stage1": ["grid.png", "samples.npz"], "stage2": ["shards"]}  # killed in stage II
    resumed = runs["logs"]["resumed"][1]
    assert f"stage1/samples.npz already holds these settings' {N} samples: nothing to do" in resumed, resumed[-3000:]
    assert "sampled 1 of 2 batches, 1 were already in its shards/" in resumed, resumed[-3000:]
    for stage in ("stage1", "stage2"):
        one, eight = (C.load_samples(runs["root"] / run / stage / "samples.npz") for run in ("one", "eight"))
        assert one[0].tobytes() == eight[0].tobytes() and np.array_equal(one[1], eight[1]), stage


def test_fsdp_splits_parameters_and_matches(runs):
    """mesh.fsdp=2: the same samples up to float rounding (the partitioned program sums in another order)."""
    ref, _ = C.load_samples(runs["root"] / "one" / "stage1" / "samples.npz")
    images, _ = C.load_samples(runs["root"] / "fsdp" / "stage1" / "samples.npz")
    diff = np.abs(images.astype(int) - ref)
    print(f"fsdp=2: {np.count_nonzero(diff)} of {diff.size} uint8 values differ from 1 device's, max {diff.max()}")
    assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 100


# --- bad input: one error line, nothing loaded or compiled ----------------------------------------------

def _config(f, out, **keys):
    from jaxdiff.sample import runner

    cfg = runner.default_config()
    cfg.pipeline, cfg.prompts = "if", PROMPTS
    cfg.stages, cfg.text_encoder = f"{f['root'] / 'IF-I'},{f['unet2']}", str(f["t5"])
    cfg.tokenizer, cfg.out = str(f["spm"]), str(out)
    cfg.sample.update(num_samples=N, batch_size=8)
    for k, v in keys.items():
        setattr(cfg, k, v)
    return cfg


def test_bad_input_one_error_line_before_anything_compiles(folders, tmp_path, monkeypatch, capsys):
    from jaxdiff.diffusion import samplers
    from jaxdiff.sample import cascade, runner
    from jaxdiff.util import cli

    def never(*a, **k):
        raise AssertionError("weights were loaded or a program was built")

    for name in ("load_stage", "load_text_encoder", "encode_prompts"):
        monkeypatch.setattr(cascade, name, never)
    monkeypatch.setattr(samplers, "make_sampler", never)
    f = folders
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    wide2 = C.changed_copy(f["unet2"], tmp_path / "wide2", encoder_hid_dim=48)
    wide_t5 = C.changed_copy(f["t5"], tmp_path / "wide_t5", d_model=48)
    not_spm = tmp_path / "spiece.model"
    not_spm.write_text("hello 1\nworld 2\n")
    cases = [
        (dict(prompts=str(empty)), f"config.prompts='{empty}' is an empty file"),
        (dict(stages=f"{f['unet1']},{wide2}"),
         f"stage 2 ({wide2}) takes text states of width 48 (encoder_hid_dim), but stage 1 ({f['unet1']}) takes 32"),
        (dict(text_encoder=str(wide_t5)),
         f"stage 1 ({f['root'] / 'IF-I'}) takes text states of width 32 (encoder_hid_dim), but the T5 encoder "
         f"({wide_t5}) gives d_model=48"),
        (dict(tokenizer=str(not_spm)), f"T5 tokenizer: {not_spm} is not a sentencepiece model"),
    ]
    cases += [(dict(pipeline="imagen"), "config.pipeline='imagen'; allowed: '' (sample config.model), 'if'"),
              (dict(pipeline=""), "config.prompts applies to config.pipeline=if only")]
    for keys, message in cases:
        cfg = _config(f, tmp_path / "out", **keys)
        assert cli.report_errors(lambda cfg=cfg: runner.run(cfg, shards=True), "sample.py") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sample.py: error: ") and message in err[0], (message, err)
    assert not (tmp_path / "out").exists()
