"""The evaluation command, the guidance sweep and its report, end to end on tiny trained models."""

import json
import math
import os

import numpy as np
import pytest

from jaxdiff.eval import __main__ as eval_cli
from jaxdiff.eval import evaluation, report, sweep
from jaxdiff.train import config as train_config
from jaxdiff.train import loop as training


def load_config(filename):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / filename
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _tiny(task, **train):
    c = train_config.default_config(task)
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(), channel_mult=(1,),
                   num_head_channels=32, resblock_updown=False)
    if task == "classifier":
        c.model.pool = "adaptive"
    c.diffusion.num_timesteps = 50
    c.train.update(batch_size=32, steps=4, warmup_steps=1, log_every=2, checkpoint_every=4, keep=1,
                   sample_every=0, async_checkpointing=False, **train)
    return c


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    dirs = {}
    for name, cfg in [("model", _tiny("diffusion")), ("classifier", _tiny("classifier"))]:
        dirs[name] = str(root / name)
        training.train(cfg, dirs[name])
    # one classifier serves as guide and as feature extractor: the sweep treats them independently
    dirs["eval_classifier"] = dirs["classifier"]
    dirs["root"] = root
    return dirs


def _sweep_config(workdirs, out, **over):
    c = load_config("sweep_digits.py")
    c.model, c.classifier, c.eval_classifier = workdirs["model"], workdirs["classifier"], workdirs["eval_classifier"]
    c.out = str(out)
    c.cache_dir = str(workdirs["root"] / "refcache")
    c.update(dict(steps=(3,), classifier_scales=(2.0,), cfg_scales=(0.0, 3.0), num_samples=40, batch_size=20,
                  grid_max=8), **over)
    return c


def test_sweep_writes_table_plots_and_grids_and_matches_evaluate(workdirs, tmp_path):
    cfg = _sweep_config(workdirs, tmp_path / "report")
    rows = sweep.run_sweep(cfg)
    assert [(r["guidance"], r["scale"]) for r in rows][1:] == [("classifier", 2.0), ("cfg", 0.0), ("cfg", 3.0)]
    assert rows[0]["guidance"] == "none" and math.isnan(rows[0]["scale"])
    out = tmp_path / "report"
    for f in ("results.md", "results.json", "fid_vs_is.png", "precision_vs_recall.png", "accuracy_vs_scale.png"):
        assert (out / f).stat().st_size > 0, f
    table = json.loads((out / "results.json").read_text())
    assert len(table) == 4 and all(r["num_samples"] == 40 for r in table)
    for r in rows:
        assert (out / r["grid"]).exists()
        assert r["fid"] >= 0 and 1.0 <= r["inception_score"] <= 10.0
        for k in ("precision", "recall", "density", "coverage", "accuracy"):
            assert np.isfinite(r[k]), k
    assert "| guidance | scale |" in (out / "results.md").read_text()

    # the evaluate command on one setting's samples gives the sweep's numbers
    npz = out / "settings" / sweep.setting_name(rows[2]) / "samples.npz"
    res = evaluation.evaluate_npz(str(npz), classifier_dir=workdirs["eval_classifier"],
                                  cache_dir=str(workdirs["root"] / "refcache"))
    for k in ("fid", "inception_score", "precision", "recall", "accuracy"):
        assert res[k] == pytest.approx(rows[2][k], rel=1e-6, abs=1e-9), k
    assert res["extractor_fingerprint"] == rows[2]["extractor_fingerprint"]


def test_sweep_refuses_fewer_samples_than_feature_dims_before_sampling(workdirs, tmp_path):
    cfg = _sweep_config(workdirs, tmp_path / "report", num_samples=8, batch_size=8)
    with pytest.raises(ValueError, match=r"config.num_samples\) have N = 8 samples of dimension D = \d+"):
        sweep.run_sweep(cfg)
    assert not (tmp_path / "report").exists()


def test_evaluate_cli_refuses_bad_samples(workdirs, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, np.zeros((50, 8, 8, 1), np.float32), np.zeros(50, np.int64))
    with pytest.raises(ValueError, match="uint8"):
        eval_cli.main(["--samples", str(bad), "--classifier", workdirs["eval_classifier"]])
    np.savez(bad, np.zeros((50, 8, 8, 1), np.uint8), np.full(50, 12, np.int64))
    with pytest.raises(ValueError, match="12"):
        eval_cli.main(["--samples", str(bad), "--classifier", workdirs["eval_classifier"]])
    np.savez(bad, np.zeros((5, 8, 8, 1), np.uint8), np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="at least"):
        eval_cli.main(["--samples", str(bad), "--classifier", workdirs["eval_classifier"],
                         "--cache_dir", str(workdirs["root"] / "refcache")])
    with pytest.raises(ValueError, match="'model' model; the evaluation extractor must be a classifier|"
                                         "must be a classifier"):
        evaluation.extractor_from_workdir(workdirs["model"])


@pytest.mark.parametrize("over, message", [
    (dict(steps=()), "steps must be a non-empty list"),
    (dict(cfg_scales=(float("nan"),)), "cfg_scales must be finite"),
    (dict(classifier=""), "no noisy classifier workdir"),
    (dict(num_samples=1), "num_samples must be >= 2"),
    (dict(eval_classifier=""), "needs 'eval_classifier'"),
])
def test_sweep_refuses_bad_config_before_loading(over, message, tmp_path):
    c = load_config("sweep_digits.py")
    c.update(dict(model="/nonexistent", classifier="/nonexistent", eval_classifier="/nonexistent",
                  out=str(tmp_path)))
    c.update(over)
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(c)


def test_report_curves_start_from_the_unguided_row(tmp_path):
    nan = float("nan")
    rows = [dict(guidance="none", scale=nan, sampler="ddim", steps=25, fid=3.0, inception_score=5.0),
            dict(guidance="cfg", scale=3.0, sampler="ddim", steps=25, fid=2.0, inception_score=7.0),
            dict(guidance="classifier", scale=1.0, sampler="ddim", steps=25, fid=2.5, inception_score=6.0)]
    series = dict(((k[0], tuple(r["scale"] for r in rs)) for k, rs in report._series(rows)))
    assert series == {"cfg": (1.0, 3.0), "classifier": (0.0, 1.0)}
    md = report.markdown_table(rows)
    assert md.splitlines()[0] == "| guidance | scale | sampler | steps | FID | IS |"
    assert "| cfg | 3 | ddim | 25 | 2 | 7 |" in md
    paths = report.write_plots(rows, str(tmp_path))
    assert all(os.path.getsize(p) > 1000 for p in paths)


@pytest.fixture
def toy_guide():
    """A toy log-density guide registered in one call (pulls every pixel towards +0.9)."""
    from jaxdiff.diffusion import guidance

    guidance.register_log_density("toy", lambda x, t, cond: -((x - 0.9) ** 2).sum(axis=(1, 2, 3)))
    yield "toy"
    del guidance.GUIDES["toy"]


def test_a_registered_guide_is_swept_by_name(workdirs, toy_guide, tmp_path):
    cfg = _sweep_config(workdirs, tmp_path / "report", classifier_scales=(), cfg_scales=())
    cfg.toy_scales = (0.0, 20.0)
    rows = sweep.run_sweep(cfg)
    assert [(r["guidance"], r["scale"]) for r in rows] == [("none", rows[0]["scale"]), ("toy", 0.0), ("toy", 20.0)]
    means = [np.load(tmp_path / "report" / "settings" / sweep.setting_name(r) / "samples.npz")["arr_0"].mean()
             for r in rows]
    assert means[1] == pytest.approx(means[0], abs=1e-6)  # scale 0 changes nothing
    assert means[2] > means[1] + 5  # guided towards bright pixels
    assert dict(((k[0], tuple(r["scale"] for r in rs)) for k, rs in report._series(rows)))["toy"] == (0.0, 0.0, 20.0)


def test_readme_quickstart_runs(workdirs, tmp_path, monkeypatch, capsys):
    """The README's Python quickstart, executed as written against trained runs/digits/ directories."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Quickstart.*?```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    runs = tmp_path / "runs" / "digits"
    runs.mkdir(parents=True)
    (runs / "model").symlink_to(workdirs["model"])
    (runs / "eval_classifier").symlink_to(workdirs["eval_classifier"])
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'fid'" in printed and "'accuracy'" in printed


def test_sweep_with_inception_metrics(tmp_path, monkeypatch):
    """extractor='inception': the evaluator's metrics per setting against a reference batch (RGB models).
    The weights file is real (seeded); the network is a cheap stand-in (its parity: test_inception.py)."""
    import _fake_features as F
    import _inception
    import _tiny

    from jaxdiff.convert import converted
    from jaxdiff.convert import inception as convert_inception
    from jaxdiff.eval import inception

    m, p = _tiny.unet()
    converted.save_converted(tmp_path / "model", p, "unet", dict(_tiny.UNET_FLAGS),
                           dict(noise_schedule="cosine", diffusion_steps=100, learn_sigma=True))
    convert_inception.save_params(tmp_path / "inception.npz", convert_inception.params_from_state_dict(_inception.fixture_state_dict()))
    fake = F.make_params((8, 8, 3))
    monkeypatch.setattr(inception, "pure_feature_fn", lambda mode="tf1": lambda p_, x: F.feature_fn(fake, x))
    np.savez(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8))
    c = load_config("sweep_digits.py")
    c.update(dict(model=str(tmp_path / "model"), out=str(tmp_path / "report"), extractor="inception",
                  inception=str(tmp_path / "inception.npz"), reference_batch=str(tmp_path / "ref.npz"),
                  classifier_scales=(), cfg_scales=(2.0,), steps=(2,), num_samples=12, batch_size=12, grid_max=4))
    rows = sweep.run_sweep(c)
    assert [r["guidance"] for r in rows] == ["none", "cfg"]
    for r in rows:
        for k in ("fid", "sfid", "inception_score", "precision", "recall"):
            assert np.isfinite(r[k]), k
    assert "| sFID |" in (tmp_path / "report" / "results.md").read_text()
    c.update(dict(inception=""))
    with pytest.raises(ValueError, match="needs 'inception'"):
        sweep.run_sweep(c)
