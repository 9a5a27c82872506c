"""jaxdiff.sample and sample.py: validation before any compile, the evaluator's npz layout, the command line."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import _tiny
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cli():
    from jaxdiff.sample import runner

    return runner


@pytest.fixture(scope="module")
def tiny_models():
    m, p = _tiny.unet()
    c, cp = _tiny.classifier()
    return (m, p, _tiny.unet_config()), (c, cp, _tiny.classifier_config())


def _config(tmp_path, **sample):
    cfg = _load_module("sample_config", ROOT / "configs" / "sample.py").get_config()
    cfg.out = str(tmp_path / "out")
    cfg.sample.update(dict(steps=3, num_samples=6, batch_size=3, progress=False), **sample)
    return cfg


BAD = [
    (dict(classes="1,7"), "label 7 in classes='1,7' is outside the classes: allowed 0..2"),
    (dict(classes="a,b"), "expected 'all' or a comma-separated list"),
    (dict(guidance="cfg", _model=dict(null_label=False)), "needs a model with a null label"),
    (dict(guidance="classifier", _classifier=dict(out_channels=5)), "classifier has 5 classes but the model has num_classes=3"),
    (dict(guidance="both", _no_classifier=True), "needs a classifier"),
    (dict(steps=101), "sample.steps=101 is more than the schedule's 100 diffusion steps"),
    (dict(sampler="euler"), "unknown sampler 'euler'; allowed: ddpm, ddim, dpmpp2m"),
    (dict(guidance="cfg", scale=float("nan")), "sample.scale=nan is not allowed"),
    (dict(guidance="classifier", classifier_scale=float("inf")), "sample.classifier_scale=inf is not allowed"),
    (dict(guidance="nope"), "unknown guidance kind 'nope'"),
    (dict(eta=-1.0), "sample.eta=-1.0 must be >= 0"),
    (dict(respacing="ddim30"), "cannot take exactly 30 steps"),
    (dict(num_samples=0), "sample.num_samples=0 must be a positive integer"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_settings_fail_before_any_compile(cli, tiny_models, tmp_path, monkeypatch, overrides, message):
    from jaxdiff.diffusion import samplers

    def no_compile(*a, **k):
        raise AssertionError("a sampler was built before validation finished")

    monkeypatch.setattr(samplers, "make_sampler", no_compile)
    (m, p, mcfg), (c, cp, ccfg) = tiny_models
    overrides = dict(overrides)
    if "_model" in overrides:
        mcfg = _tiny.unet_config(**overrides.pop("_model"))
    if "_classifier" in overrides:
        ccfg = _tiny.classifier_config(**overrides.pop("_classifier"))
    classifier = None if overrides.pop("_no_classifier", False) else (c, cp, ccfg)
    cfg = _config(tmp_path, **overrides)
    with pytest.raises(ValueError) as e:
        cli.run(cfg, model=(m, p, mcfg), classifier=classifier)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_labels_balanced_and_parsed(cli):
    np.testing.assert_array_equal(cli.balanced_labels(cli.parse_classes("all", 3), 7), [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(cli.balanced_labels(cli.parse_classes("2,0", 3), 5), [2, 0, 2, 0, 2])
    assert cli.parse_classes("all", None) is None
    with pytest.raises(ValueError, match="unconditional"):
        cli.parse_classes("1", None)


def test_command_line(tmp_path):
    """The whole path: load_model on converted directories, flags, guidance "both", npz + grid."""
    from jaxdiff.convert import converted

    m, p = _tiny.unet()
    c, cp = _tiny.classifier()
    converted.save_converted(tmp_path / "model", p, "unet", dict(_tiny.UNET_FLAGS),
                           dict(noise_schedule="cosine", diffusion_steps=100, learn_sigma=True))
    converted.save_converted(tmp_path / "classifier", cp, "classifier", dict(_tiny.CLASSIFIER_FLAGS))
    out = tmp_path / "out"
    base = [sys.executable, str(ROOT / "sample.py"), "--config", str(ROOT / "configs" / "sample.py"),
            f"--config.model={tmp_path / 'model'}", f"--config.classifier={tmp_path / 'classifier'}",
            f"--config.out={out}", "--config.sample.guidance=both"]
    bad = subprocess.run(base + ["--config.sample.classes=0,3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "label 3 in classes='0,3' is outside the classes" in bad.stderr, bad.stderr
    assert not out.exists()
    ok = subprocess.run(base + ["--config.sample.sampler=ddim", "--config.sample.steps=3", "--config.sample.eta=0.5",
                                "--config.sample.scale=2", "--config.sample.classifier_scale=1.5",
                                "--config.sample.cfg_rescale=0.3", "--config.sample.classes=0,2",
                                "--config.sample.num_samples=6", "--config.sample.batch_size=3",
                                "--config.sample.grid_max=4"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        imgs, labels = f["arr_0"], f["arr_1"]
    assert imgs.dtype == np.uint8 and imgs.shape == (6, 8, 8, 3) and imgs.std() > 1
    np.testing.assert_array_equal(labels, [0, 2, 0, 2, 0, 2])
    assert sorted(os.listdir(out)) == ["grid.png", "samples.npz"]  # written atomically, no temporaries left
    assert os.path.getsize(out / "grid.png") > 0


def test_registered_guide_and_sampler_are_accepted_by_name(tmp_path):
    """A guide and a sampler registered by a user module: sample.py takes them by name, no other edit."""
    from jaxdiff.convert import converted

    m, p = _tiny.unet()
    converted.save_converted(tmp_path / "model", p, "unet", dict(_tiny.UNET_FLAGS),
                           dict(noise_schedule="cosine", diffusion_steps=100, learn_sigma=True))
    (tmp_path / "my_guides.py").write_text(
        "from jaxdiff.diffusion import guidance, samplers\n"
        "guidance.register_log_density('bright', lambda x, t, cond: x.sum(axis=(1, 2, 3)))\n"
        "samplers.register_sampler(samplers.SAMPLERS['ddim']._replace(name='my_ddim'))\n")
    outs = {}
    for scale in (0.0, 3.0):
        out = tmp_path / f"out{scale:g}"
        p = subprocess.run(
            [sys.executable, str(ROOT / "sample.py"), "--config", f"{ROOT / 'configs' / 'sample.py'}:my_guides",
             f"--config.model={tmp_path / 'model'}", f"--config.out={out}", "--config.sample.guidance=bright",
             f"--config.sample.bright_scale={scale}", "--config.sample.sampler=my_ddim", "--config.sample.steps=3",
             "--config.sample.num_samples=4", "--config.sample.batch_size=4", "--config.sample.grid_max=0"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
        assert p.returncode == 0, p.stderr[-3000:]
        outs[scale] = np.load(out / "samples.npz")["arr_0"].astype(float)
    assert outs[3.0].mean() > outs[0.0].mean() + 5
