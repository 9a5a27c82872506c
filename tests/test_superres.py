"""guided-diffusion's SuperResModel (the released upsamplers' class) and two-stage sampling from our commands."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from _adm import nchw, nhwc, state_dict

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def superres():
    with np.load(ROOT / "tests" / "fixtures" / "adm_superres_a.npz") as f:
        ref = {k: f[k] for k in f.files}
    flags = json.loads(str(ref["kwargs"]))
    flags = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}
    from jaxdiff.convert.guided_diffusion import from_guided_diffusion

    module, params = from_guided_diffusion(state_dict(ref, "superres"), "superres", **flags)
    return ref, flags, module, params


def test_superres_matches_guided_diffusion(superres):
    ref, _, module, params = superres
    out = module.apply({"params": params}, nhwc(ref["x"]), jnp.asarray(ref["t"]), low_res=nhwc(ref["low_res"]),
                       y=jnp.asarray(ref["y"]))
    err = np.abs(nchw(out) - ref["out"]).max() / np.abs(ref["out"]).max()
    assert err <= 1e-4, err


def test_sample_py_upsamples_low_res_samples(superres, tmp_path):
    """ADM-G+U's second stage from our command: a converted upsampler and --config.low_res -> 4x larger."""
    _, flags, _, params = superres
    from jaxdiff.convert import converted

    converted.save_converted(tmp_path / "upsampler", params, "superres", flags,
                           dict(noise_schedule="linear", diffusion_steps=1000, learn_sigma=True))
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    np.savez(tmp_path / "low.npz", low, labels)
    out = tmp_path / "up"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--config", str(ROOT / "configs" / "sample.py"),
           f"--config.model={tmp_path / 'upsampler'}", f"--config.low_res={tmp_path / 'low.npz'}",
           f"--config.out={out}", "--config.sample.sampler=ddpm", "--config.sample.steps=2",
           "--config.sample.batch_size=3"]
    bad = subprocess.run(cmd + ["--config.sample.num_samples=6"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "sample.num_samples=6 but config.low_res holds 5 images" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and not out.exists()
    ok = subprocess.run(cmd + ["--config.sample.num_samples=5", "--config.dtype=float32"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert " I1" not in ok.stderr and "INFO" not in ok.stderr  # no orbax INFO lines on the console
    with np.load(out / "samples.npz") as f:
        images, got_labels = f["arr_0"], f["arr_1"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 1
    np.testing.assert_array_equal(got_labels, labels)


def test_converted_flags_that_would_change_samples_are_refused(tmp_path, superres):
    _, flags, _, _ = superres
    from jaxdiff.sample import runner

    low = (np.zeros((2, 8, 8, 3), np.float32), np.array([1, 2]))
    cfg = runner.default_config()
    cfg.model, cfg.out = "upsampler", str(tmp_path / "out")
    cfg.sample.update(steps=10, num_samples=2)
    diffusion = dict(schedule="linear", num_timesteps=1000, learned_sigma=True)  # as load_model names them
    model_cfg = {"model": dict(flags, kind="superres"), "diffusion": dict(diffusion, timestep_respacing="250")}
    with pytest.raises(ValueError, match="converted with --timestep_respacing 250.*sample.respacing=250"):
        runner.validate(cfg, model_cfg, low_res=low)
    cfg.sample.respacing = "250"
    runner.validate(cfg, model_cfg, low_res=low)  # honoured when asked for
    model_cfg["diffusion"] = dict(diffusion, rescale_timesteps=True)
    with pytest.raises(ValueError, match="--rescale_timesteps True .* not supported"):
        runner.validate(cfg, model_cfg, low_res=low)


def test_fp16_checkpoint_samples_in_float32_on_request(tmp_path):
    import _tiny

    from jaxdiff import checkpoints
    from jaxdiff.convert import converted

    m, p = _tiny.unet()
    converted.save_converted(tmp_path / "m", p, "unet", dict(_tiny.UNET_FLAGS, use_fp16=True),
                           dict(noise_schedule="cosine", diffusion_steps=100, learn_sigma=True))
    assert checkpoints.load_model(str(tmp_path / "m"))[0].dtype is None  # use_fp16: bfloat16 compute
    from jaxdiff.models.layers import compute_dtype

    assert compute_dtype(checkpoints.load_model(str(tmp_path / "m"))[0]) == jnp.bfloat16
    assert compute_dtype(checkpoints.load_model(str(tmp_path / "m"), dtype="float32")[0]) == jnp.float32
