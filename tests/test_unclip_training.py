"""The unCLIP tasks ("unclip_prior", "unclip_decoder") through train() on digits_text: the frozen CLIP's image
embeddings, text embeddings and token states computed once and cached, loss falling, bitwise resume after
SIGKILL, the workdirs loadable per network (`checkpoints.load_unclip`), and configs refused before compiling.

The runs happen in `_unclip_worker.py` subprocesses (LLVM -O0, the session's persistent compilation cache), the
prior's and the decoder's side by side, each on a tiny clean CLIP it trains first (2 steps)."""

import json
import signal

import numpy as np
import pytest

try:
    import _training_helpers as H
    import _unclip_worker as W
except ImportError:  # tests/ imported as a package
    from tests import _training_helpers as H
    from tests import _unclip_worker as W
from jaxdiff import checkpoints
from jaxdiff.data import sources as data_sources
from jaxdiff.train import config as train_config
from jaxdiff.train import image_embeddings, text_states

NETS = ("prior", "decoder")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return H.captioned_data_dir(tmp_path_factory)


def _workers(modes, data_dir, root, cache) -> dict:
    return H.run_workers("_unclip_worker.py", modes, data_dir, root, cache)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """prior and decoder side by side (each ends SIGKILLed in its second run), then both resumes."""
    root = tmp_path_factory.mktemp("unclip_runs")
    cache = tmp_path_factory.getbasetemp() / "xla_cache"
    cache.mkdir(exist_ok=True)
    for m, (code, err) in _workers(NETS, data_dir, root, cache).items():
        assert code == -signal.SIGKILL, f"{m}: exit {code}\n{err[-6000:]}"
    killed = {n: H.complete_steps(root / n) for n in NETS}
    cached = {p: p.stat().st_mtime_ns for p in root.rglob("*.npy")}
    for m, (code, err) in _workers([f"resume_{n}" for n in NETS], data_dir, root, cache).items():
        assert code == 0, f"{m}: exit {code}\n{err[-6000:]}"
    reports = {m: json.loads((root / f"{m}.json").read_text()) for m in NETS + ("resume_prior", "resume_decoder")}
    return {"root": root, "data_dir": data_dir, "killed": killed, "cached_mtime": cached, **reports}


def test_loss_falls_and_resume_after_sigkill_is_bitwise(runs):
    root = runs["root"]
    for name in NETS:
        losses = H.losses(root / f"{name}_ref")
        assert sorted(losses) == list(range(2, W.STEPS + 1, 2)), losses
        assert np.isfinite(list(losses.values())).all() and losses[W.STEPS] < 0.8 * losses[2], (name, losses)
        # killed after step 6 with checkpoint 4 complete; the rerun resumed from 4 and finished
        assert runs["killed"][name] == [W.CHECKPOINT_EVERY], runs["killed"]
        assert runs[name][name]["killed_at"] == W.KILL_AT
        H.assert_resumed_as_reference(root / name, root / f"{name}_ref", W.STEPS, [4, 8])


def test_clip_embeddings_computed_once_and_reused(runs):
    import jax.numpy as jnp

    root = runs["root"]
    # prior: one cache (text_encoder.cache_dir) shared by its runs; decoder: W/text_states, once per workdir
    assert runs["prior"] == {"prior_ref": {"texts": 1, "images": 1},
                             "prior": {"texts": 0, "images": 0, "killed_at": W.KILL_AT}}
    assert runs["decoder"] == {"decoder_ref": {"texts": 1, "images": 1},
                               "decoder": {"texts": 1, "images": 1, "killed_at": W.KILL_AT}}
    assert runs["resume_prior"] == {"prior": {"texts": 0, "images": 0}}
    assert runs["resume_decoder"] == {"decoder": {"texts": 0, "images": 0}}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.npy")} == runs["cached_mtime"]  # nothing rewritten
    entries = sorted((root / "cache_prior").iterdir())
    assert len(entries) == 2 and all((e / text_states.META_FILE).exists() for e in entries)
    img_dir = next(e for e in entries if e.name.startswith("image_"))
    txt_dir = next(e for e in entries if not e.name.startswith("image_"))
    images = image_embeddings.read_entry(img_dir)
    texts = text_states.read_entry(txt_dir)
    source, _ = data_sources.make_source("digits_text", "train", str(runs["data_dir"]))
    assert images.table.shape == (len(source), 32) and texts.embeds.shape == (len(texts.captions), 32)
    assert texts.states.shape == (len(texts.captions), 6, 32) and texts.captions[0] == ""
    # the cache holds what the CLIP computes: its image tower at t = 0 on the stored images, its text tower
    img_mod, img_params, _ = checkpoints.load_model(str(root / "clip_prior"), kind="clip-image")
    x = image_embeddings.split_images(source, 8)[:5]
    want = img_mod.apply({"params": img_params}, jnp.asarray(x), jnp.zeros((5,), jnp.int32))
    np.testing.assert_allclose(images.gather(np.arange(5)), want, rtol=1e-5, atol=1e-5)
    txt_mod, txt_params, cfg = checkpoints.load_model(str(root / "clip_prior"), kind="clip-text")
    from jaxdiff.data.tokenizers import WordTokenizer

    tokens, lengths = WordTokenizer(cfg["text"]["vocab"]).tokens_and_lengths(["", "a four"], 6)
    emb, states = txt_mod.apply({"params": txt_params}, tokens, lengths, return_states=True)
    got = texts.gather(["", "a four"])
    np.testing.assert_allclose(got["text_emb"], emb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["states"], states, rtol=1e-5, atol=1e-5)
    assert got["mask"][1].tolist() == [True, True, True, False, False, False]
    # the IF tasks' entries (no text embeddings) have other keys: one encoder, two entries
    assert json.loads((txt_dir / text_states.META_FILE).read_text())["embeddings"] is True
    # the prior normalises with the split's statistics, frozen parameters of the prior
    mean, std = images.stats()
    for ema in (False, True):
        _, params, _ = checkpoints.load_model(str(root / "prior"), ema=ema)
        np.testing.assert_array_equal(params["clip_mean"][0], mean)
        np.testing.assert_array_equal(params["clip_std"][0], std)


def test_workdirs_load_per_network(runs):
    import jax
    import jax.numpy as jnp

    from jaxdiff.models.prior import PriorTransformer, post_process_latents
    from jaxdiff.models.unclip_text_proj import UnCLIPTextProjModel, decoder_attention_mask
    from jaxdiff.models.unet2d_condition import UNet2DConditionModel

    root = runs["root"]
    prior = checkpoints.load_unclip(str(root / "prior"))
    module, params, cfg = prior["prior"]
    assert isinstance(module, PriorTransformer) and cfg["step"] == W.STEPS
    assert cfg["scheduler"]["prediction_type"] == "sample" and cfg["scheduler"]["beta_schedule"] == "squaredcos_cap_v2"
    on_disk = json.loads((root / "prior" / "prior" / "config.json").read_text())
    assert on_disk["_class_name"] == "PriorTransformer" and (on_disk["embedding_dim"], on_disk["num_embeddings"]) == (32, 6)
    x = jax.eval_shape(lambda p: post_process_latents(p, module.apply(
        {"params": p}, jnp.zeros((2, 32)), jnp.array([5, 7]), jnp.zeros((2, 32)), jnp.zeros((2, 6, 32)),
        jnp.ones((2, 6), bool))), params)
    assert x.shape == (2, 32)
    dec = checkpoints.load_unclip(str(root / "decoder"))
    (tp_mod, tp_params, tp_cfg), (dec_mod, dec_params, dec_cfg) = dec["text_proj"], dec["decoder"]
    assert isinstance(tp_mod, UnCLIPTextProjModel) and isinstance(dec_mod, UNet2DConditionModel)
    assert "learned_classifier_free_guidance_embeddings" in tp_params and "conv_in" in dec_params
    assert dec_cfg["model"]["class_embed_type"] == "identity" and tp_cfg["model"]["time_embed_dim"] == 128
    assert dec_cfg["scheduler"]["variance_type"] == "learned_range"
    for folder, cls in (("text_proj", "UnCLIPTextProjModel"), ("decoder", "UNet2DConditionModel"),
                        ("decoder_scheduler", "UnCLIPScheduler")):
        assert json.loads((root / "decoder" / folder / "config.json").read_text())["_class_name"] == cls

    def sample_step(tp, dp):  # as diffusers' UnCLIPPipeline calls them (traced only: shapes)
        hidden, temb = tp_mod.apply({"params": tp}, jnp.zeros((2, 32)), jnp.zeros((2, 32)), jnp.zeros((2, 6, 32)))
        return dec_mod.apply({"params": dp}, jnp.zeros((2, 8, 8, 1)), jnp.array([3, 9]), hidden, class_labels=temb,
                             attention_mask=decoder_attention_mask(jnp.ones((2, 6), bool), 4))

    assert jax.eval_shape(sample_step, tp_params, dec_params).shape == (2, 8, 8, 2)


@pytest.mark.parametrize("name", ["digits_unclip_prior", "digits_unclip_decoder"])
def test_shipped_configs_resolve(runs, name):
    """configs/digits_unclip_*.py with the tiny CLIP of the runs in place of runs/digits_unclip/clip."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, H.REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    assert cfg.text_encoder.path == "runs/digits_unclip/clip"
    cfg.text_encoder.path = str(runs["root"] / "clip_prior")
    cfg.data.data_dir = str(runs["data_dir"])
    resolved = train_config.resolve_config(cfg)
    assert resolved.model.kind == ("prior" if name.endswith("prior") else "unclip_decoder")
    assert resolved.text_encoder.embed_dim == 32


def test_clip_variants():
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_clip", H.REPO / "configs" / "digits_clip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    noised, ev, un = mod.get_config(), mod.get_config("eval"), mod.get_config("unclip")
    assert noised.train.noised and noised.seed == 0 and (ev.train.noised, ev.seed) == (False, 1)
    assert (un.train.noised, un.seed) == (False, 2)  # clean, and not the evaluation CLIP
    assert un.model.n_embd == un.model.n_head_text * un.model.n_head_state_text
    with pytest.raises(ValueError, match="allowed variants: noised, eval, unclip"):
        mod.get_config("clean")


# --- refused before anything compiles -------------------------------------------------------------------

def _refused(cfg, match, workdir):
    from jaxdiff.train import loop as training

    with pytest.raises(train_config.ConfigError, match=match):
        training.train(cfg, str(workdir))
    assert not workdir.exists()  # refused while resolving: nothing written, nothing compiled


@pytest.fixture(scope="module")
def fake_clips(tmp_path_factory):
    """config.json-only "clip" workdirs (resolving reads nothing else): one fit for unCLIP (n_embd = width 32),
    one whose embeddings (16) are narrower than its token states."""
    root = tmp_path_factory.mktemp("fake_clips")
    model = dict(kind="clip", image_size=8, patch_size=4, n_embd=32, n_head_image=1, n_xf_blocks_image=1,
                 n_vocab=30, max_text_len=6, n_head_text=1, n_xf_blocks_text=1, n_head_state_image=16,
                 n_head_state_text=32)
    out = {}
    for name, change in (("good", {}), ("narrow", {"n_embd": 16})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"model": dict(model, **change),
                                                             "text": {"vocab": ["a", "four"]}}))
        out[name] = root / name
    return out


@pytest.mark.parametrize("task, change, match", [
    ("unclip_prior", lambda c: c.diffusion.update(prediction="eps"), r"prediction='eps'.*allowed: x0"),
    ("unclip_prior", lambda c: c.diffusion.update(learned_sigma=True), r"learned_sigma=True.*allowed: False"),
    ("unclip_prior", lambda c: setattr(c.model, "embedding_dim", 64), r"config\.model\.embedding_dim is derived"),
    ("unclip_prior", lambda c: c.model.update(dropout=0.1), r"config\.model\.dropout=0\.1.*allowed: 0"),
    ("unclip_prior", lambda c: c.model.update(num_layers=0), r"num_layers.*0.*positive integer"),
    ("unclip_prior", lambda c: c.text_encoder.update(kind="t5"), r"config\.text_encoder\.kind='t5'; allowed: clip"),
    ("unclip_prior", lambda c: c.text_encoder.update(path=""), r"config\.text_encoder\.path='': set it"),
    ("unclip_prior", lambda c: c.data.update(augment=True), r"config\.data\.augment=True"),
    ("unclip_prior", lambda c: c.data.update(name="digits"), r"needs a captioned dataset"),
    ("unclip_prior", lambda c: c.diffusion.update(p_uncond=1.0), r"p_uncond=1\.0 is outside \[0, 1\)"),
    ("unclip_decoder", lambda c: c.diffusion.update(p_uncond_image=1.5), r"p_uncond_image=1\.5 is outside \[0, 1\)"),
    ("unclip_decoder", lambda c: setattr(c.model.decoder, "class_embed_type", None),
     r"config\.model\.decoder\.class_embed_type is derived"),
    ("unclip_decoder", lambda c: setattr(c.model.text_proj, "time_embed_dim", 64),
     r"config\.model\.text_proj\.time_embed_dim is derived"),
    ("unclip_decoder", lambda c: setattr(c.model, "foo", 1), r"config\.model\.foo is not a setting"),
    ("unclip_decoder", lambda c: c.model.decoder.update(norm_num_groups=24), r"config\.model\.decoder cannot build"),
    ("unclip_decoder", lambda c: c.train.update(sample_every=5), r"sample_every=5: training grids are not drawn"),
    ("unclip_decoder", lambda c: c.data.update(image_size=16), r"a CLIP of 8x8 images; config\.data gives 16x16"),
])
def test_bad_configs_refused(data_dir, fake_clips, tmp_path, task, change, match):
    cfg = W.unclip_config(task, data_dir, fake_clips["good"])
    change(cfg)
    _refused(cfg, match, tmp_path / "w")


def test_narrow_clip_refused(data_dir, fake_clips, tmp_path):
    for task in ("unclip_prior", "unclip_decoder"):
        cfg = W.unclip_config(task, data_dir, fake_clips["narrow"])
        _refused(cfg, r"embeddings are n_embd=16 wide but its token states 32.*configs/digits_clip\.py:unclip",
                 tmp_path / task)
