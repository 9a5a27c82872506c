"""unCLIP in the guidance sweep (`jaxdiff.sample.unclip_toy`, `jaxdiff.eval.sweep`'s unCLIP rows): tiny randomly
initialised prior, decoder and CLIP text tower whose workdirs hold only config.json (the resolved training configs),
sampled by the real stage samplers inside `run_sweep` beside stubbed GLIDE rows and metrics; bad workdirs refused
before any weight is read."""

import json
import os

import numpy as np
import pytest

try:
    import _training_helpers as H
    import _unclip_worker as W
except ImportError:  # tests/ imported as a package
    from tests import _training_helpers as H
    from tests import _unclip_worker as W
from jaxdiff.eval import report, sweep
from jaxdiff.sample import toy_clip, unclip_toy
from jaxdiff.train import config as train_config


def _write(d, cfg: dict) -> str:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(d)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """config.json-only workdirs (text model, prior, decoder, CLIP) and the random networks they describe."""
    import jax
    import jax.numpy as jnp

    root = tmp_path_factory.mktemp("unclip_sweep")
    data_dir = H.captioned_data_dir(tmp_path_factory)
    clip_cfg = train_config.resolve_config(W.clip_config(str(data_dir)))
    _, info = train_config.open_dataset(clip_cfg)
    vocab = train_config.vocabulary(clip_cfg, info)
    clip_dir = _write(root / "clip", dict(clip_cfg.to_dict(), text={"vocab": vocab}))
    flags = dict(clip_cfg.model)
    text_module = train_config.create_model(clip_cfg).text_encoder(parent=None)
    tokens = jnp.zeros((1, flags["max_text_len"]), jnp.int32)
    clip_params = text_module.init(jax.random.key(0), tokens, jnp.array([2]))["params"]
    clip = toy_clip.ClipText(text_module, clip_params, {"model": flags}, toy_clip.word_tokenizer(vocab, clip_dir),
                             flags["max_text_len"])
    dirs, nets = {"clip": clip_dir}, {}
    for task in ("unclip_prior", "unclip_decoder"):
        c = W.unclip_config(task, str(data_dir), clip_dir)
        c.diffusion.num_timesteps = 1000  # unCLIP's schedule
        resolved = train_config.resolve_config(c)
        name = task.split("_")[1]
        dirs[name] = _write(root / name, resolved.to_dict())
        nets[name] = (train_config.create_model(resolved), resolved.to_dict())
    prior, pcfg = nets["prior"]
    x, t = jnp.zeros((1, 32)), jnp.zeros((1,), jnp.int32)
    p_params = prior.init(jax.random.key(1), x, t, x, jnp.zeros((1, 6, 32)), jnp.ones((1, 6), bool))["params"]
    dec, dcfg = nets["decoder"]
    d_params = dec.init(jax.random.key(2), jnp.zeros((1, 8, 8, 1)), t, x, x, jnp.zeros((1, 6, 32)),
                        jnp.ones((1, 6), bool))["params"]
    toy = unclip_toy.ToyUnclip((prior, p_params, pcfg), (dec.text_proj(parent=None), d_params["text_proj"], dcfg),
                               (dec.decoder(parent=None), d_params["decoder"], dcfg), clip)
    dirs["model"] = _write(root / "model", {"model": {"kind": "text2im", "text_ctx": 6, "image_size": 8},
                                            "data": {"name": "digits_text", "data_dir": str(data_dir)}})
    return {"root": root, "dirs": dirs, "toy": toy}


def _config(tiny, out, **over):
    d = tiny["dirs"]
    c = sweep.default_config("digits_text")
    c.update(dict(dict(model=d["model"], eval_classifier="unused", eval_clip="unused", unclip_prior=d["prior"],
                       unclip_decoder=d["decoder"], unclip_clip=d["clip"], cfg_scales=(3.0,), clip_scales=(),
                       unclip_prior_scales=(1.0, 4.0), unclip_decoder_scales=(1.0, 3.0), unclip_steps=(2, 3),
                       steps=(3,), num_samples=6, batch_size=3, grid_max=4, out=str(out)), **over))
    return c


def _stubbed(monkeypatch, tiny, loaded: list):
    """Everything but the unCLIP sampling stubbed: the text model, GLIDE's sampler, the metrics."""
    from jaxdiff import checkpoints
    from jaxdiff.sample import runner

    mcfg = json.loads((tiny["root"] / "model" / "config.json").read_text())

    def load_model(path, **kw):
        loaded.append(path)
        return None, None, mcfg

    def run(c, **kw):
        rng = np.random.default_rng(len(loaded))
        return {"images": rng.integers(0, 256, (int(c.sample.num_samples), 8, 8, 1), np.uint8), "grid": None}

    def load_workdirs(*dirs, **kw):
        loaded.append(dirs)
        return tiny["toy"]

    monkeypatch.setattr(checkpoints, "load_model", load_model)
    monkeypatch.setattr(runner, "run", run)
    monkeypatch.setattr(unclip_toy, "load_workdirs", load_workdirs)
    monkeypatch.setattr(sweep, "_classifier_metrics", lambda cfg, m: lambda res: {
        "fid": float(res["images"].mean()), "precision": 0.5, "recall": float(res["images"].std() / 128),
        "accuracy": 0.1})
    monkeypatch.setattr(sweep.evaluation, "clip_scorer", lambda path: lambda images, captions: float(images.mean()))


def test_unclip_rows_table_and_plots(tiny, tmp_path, monkeypatch):
    _stubbed(monkeypatch, tiny, [])
    out = tmp_path / "report"
    rows = sweep.run_sweep(_config(tiny, out))
    assert [(r["guidance"], r["scale"], r.get("prior_scale")) for r in rows][1:] == [
        ("cfg", 3.0, None), ("unclip_prior1", 1.0, 1.0), ("unclip_prior1", 3.0, 1.0), ("unclip_prior4", 1.0, 4.0),
        ("unclip_prior4", 3.0, 4.0)]
    for r in rows[2:]:
        assert r["sampler"] == "unclip" and r["steps"] == 3
        assert {"fid", "recall", "attribute_accuracy", "clip_score", "seconds", "grid"} <= set(r)
        with np.load(out / os.path.dirname(r["grid"]) / "samples.npz") as z:
            assert z["arr_0"].shape == (6, 8, 8, 1) and z["arr_0"].dtype == np.uint8 and len(z["captions"]) == 6
    assert rows[2]["grid"] == "settings/unclip_prior1_s1_unclip3/grid.png"
    assert "| prior scale |" in (out / "results.md").read_text()
    assert (out / "recall_vs_clip_score.png").stat().st_size > 0
    names = {n for n, _ in report._series(rows)}
    assert {("unclip_prior1", "unclip", 3), ("unclip_prior4", "unclip", 3), ("cfg", "ddpm", 3)} == names


def test_unclip_sample_is_batch_independent(tiny):
    caps = ["a four", "a thin seven", "a one"]
    kw = dict(prior_scale=4.0, decoder_scale=3.0, num_samples=4, steps=(2, 2), seed=3)
    a = unclip_toy.sample(tiny["toy"], caps, batch_size=4, **kw)
    b = unclip_toy.sample(tiny["toy"], caps, batch_size=3, **kw)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["embeddings"].shape == (4, 32) and a["captions"] == caps + caps[:1]


def _changed(src, dst, change) -> str:
    cfg = json.loads((src / "config.json").read_text())
    change(cfg)
    return _write(dst, cfg)


@pytest.mark.parametrize("which, change, match", [
    ("prior", None, r"config\.unclip_prior=.* is a 'unclip_decoder' workdir; expected a workdir of the 'unclip_prior'"),
    ("clip", lambda c: c["model"].update(n_embd=16), r"config\.unclip_prior=.* takes CLIP text embeddings of width 32"),
    ("clip", lambda c: c["model"].update(max_text_len=8), r"token states \[6, 32\], but the CLIP .* gives 32 and \[8, 32\]"),
    ("decoder", lambda c: c["model"]["text_proj"].update(clip_embeddings_dim=16),
     r"makes CLIP image embeddings of width 32, but config\.unclip_decoder=.* takes 16"),
    ("decoder", lambda c: c["diffusion"].update(num_timesteps=100), r"schedule of 100 steps; unCLIP samples"),
    ("decoder", lambda c: c["model"]["decoder"].update(sample_size=16), r"makes 16x16 images; .* make 8x8"),
    ("clip", lambda c: c.update(model=dict(c["model"], kind="text2im")), r"config\.unclip_clip=.* is not a workdir "
                                                                         r"of the 'clip' task"),
])
def test_bad_workdirs_refused_before_loading(tiny, tmp_path, monkeypatch, which, change, match):
    loaded = []
    _stubbed(monkeypatch, tiny, loaded)
    d = tiny["dirs"]
    bad = d["decoder"] if change is None else _changed(tiny["root"] / which, tmp_path / which, change)
    cfg = _config(tiny, tmp_path / "out", **{f"unclip_{which}": bad})
    with pytest.raises(ValueError, match=match):
        sweep.run_sweep(cfg)
    assert not loaded and not (tmp_path / "out").exists()


def test_sweep_config_refuses_half_an_unclip_sweep(tiny, tmp_path):
    with pytest.raises(ValueError, match="unclip_decoder_scales"):
        sweep.validate(_config(tiny, tmp_path, unclip_decoder_scales=()))
    with pytest.raises(ValueError, match=r"unCLIP decoder workdir \(config\.unclip_decoder\)"):
        sweep.validate(_config(tiny, tmp_path, unclip_decoder=""))
    with pytest.raises(ValueError, match="unclip_steps"):
        sweep.validate(_config(tiny, tmp_path, unclip_steps=(1, 50)))
