"""The IF tasks ("if_text2im", "if_superres") through train() on digits_text: frozen text-encoder states
computed once and cached, loss falling, bitwise resume after SIGKILL, and configs refused before compiling.

The runs happen in `_if_worker.py` subprocesses (LLVM -O0, the session's persistent compilation cache): stage I
on the text tower of a tiny CLIP trained there, stage II on a tiny T5 encoder (tests/fixtures/if_tiny_a.npz's
random T5 written as a transformers folder, with a sentencepiece model trained here on the captions). The
other tests compile nothing."""

import functools
import json
import os
import signal

import numpy as np
import pytest

try:
    import _if_worker as W
    import _training_helpers as H
except ImportError:  # tests/ imported as a package
    from tests import _if_worker as W
    from tests import _training_helpers as H
from jaxdiff import checkpoints
from jaxdiff.data import sources as data_sources
from jaxdiff.train import config as train_config
from jaxdiff.train import text_states

FIXTURE = H.REPO / "tests" / "fixtures" / "if_tiny_a.npz"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return H.captioned_data_dir(tmp_path_factory)


def _write_t5(folder, data_dir):
    """A transformers T5 encoder folder (config.json, model.safetensors) of the fixture's T5, and a sentencepiece
    model with T5's special ids trained on the digits captions (64 pieces: the T5 has 100 embeddings)."""
    import safetensors.numpy
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    with np.load(FIXTURE) as z:
        (folder / "config.json").write_text(str(z["t5_config"]))
        safetensors.numpy.save_file({k[3:]: z[k] for k in z.files if k.startswith("t5/")},
                                    str(folder / "model.safetensors"))
    source, _ = data_sources.make_source("digits_text", "train", str(data_dir))
    (folder / "corpus.txt").write_text("\n".join(text_states.caption_set(source)[1:]))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"), vocab_size=64,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)


@pytest.fixture(scope="module")
def root(data_dir, tmp_path_factory):
    r = tmp_path_factory.mktemp("if_runs")
    _write_t5(r / "t5", data_dir)
    return r


def _workers(modes, data_dir, root, cache) -> dict:
    return H.run_workers("_if_worker.py", modes, data_dir, root, cache)


@pytest.fixture(scope="module")
def runs(root, data_dir, tmp_path_factory):
    """stage1 and stage2 side by side (each ends SIGKILLed in its second run), then both resumes."""
    cache = tmp_path_factory.getbasetemp() / "xla_cache"
    cache.mkdir(exist_ok=True)
    for m, (code, err) in _workers(("stage1", "stage2"), data_dir, root, cache).items():
        assert code == -signal.SIGKILL, f"{m}: exit {code}\n{err[-6000:]}"
    killed = {n: H.complete_steps(root / n) for n in ("if1", "if2")}
    states = {p: p.stat().st_mtime_ns for p in root.rglob("states.npy")}
    for m, (code, err) in _workers(("resume1", "resume2"), data_dir, root, cache).items():
        assert code == 0, f"{m}: exit {code}\n{err[-6000:]}"
    reports = {m: json.loads((root / f"{m}.json").read_text()) for m in ("stage1", "stage2", "resume1", "resume2")}
    return {"root": root, "data_dir": data_dir, "killed": killed, "states_mtime": states, **reports}


def test_loss_falls_and_resume_after_sigkill_is_bitwise(runs):
    root = runs["root"]
    for name in ("if1", "if2"):
        losses = H.losses(root / f"{name}_ref")
        assert sorted(losses) == list(range(2, W.STEPS + 1, 2)), losses
        mse = {m["step"]: m["mse"] for m in H.read_metrics(root / f"{name}_ref") if "mse" in m}
        assert np.isfinite(list(losses.values())).all() and losses[W.STEPS] < losses[2], (name, losses)
        assert mse[W.STEPS] < 0.5 * mse[2], (name, mse)  # the hybrid loss's VLB term is noisy at batch 16
        # killed after step 6 with checkpoint 4 complete; the rerun resumed from 4 and finished
        assert runs["killed"][name] == [W.CHECKPOINT_EVERY], runs["killed"]
        assert runs["stage1" if name == "if1" else "stage2"][name]["killed_at"] == W.KILL_AT
        H.assert_resumed_as_reference(root / name, root / f"{name}_ref", W.STEPS, [4, 8])


def test_text_states_computed_once_and_reused(runs):
    root = runs["root"]
    # stage I: one cache (text_encoder.cache_dir) shared by its runs: computed by the first run only
    assert runs["stage1"] == {"if1_ref": {"computed": 1}, "if1": {"computed": 0, "killed_at": W.KILL_AT}}
    entries = list((root / "text_cache").iterdir())
    assert len(entries) == 1 and (entries[0] / text_states.META_FILE).exists()
    # stage II: the default cache, W/text_states: once per workdir (the killed run's workdir is another one)
    assert runs["stage2"] == {"if2_ref": {"computed": 1}, "if2": {"computed": 1, "killed_at": W.KILL_AT}}
    # the resumed runs read their caches; nothing was rewritten
    assert runs["resume1"] == {"if1": {"computed": 0}} and runs["resume2"] == {"if2": {"computed": 0}}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("states.npy")} == runs["states_mtime"]
    assert len(runs["states_mtime"]) == 3  # text_cache, if2_ref/text_states, if2/text_states
    meta = json.loads((entries[0] / text_states.META_FILE).read_text())
    source, _ = data_sources.make_source("digits_text", "train", str(runs["data_dir"]))
    cached = text_states.read_entry(entries[0], meta["key"])
    assert cached.captions == tuple(text_states.caption_set(source)) and cached.captions[0] == ""
    assert cached.states.shape == (len(cached.captions), 6, 32) and meta["encoder"]["kind"] == "clip"
    # the empty caption is the end token alone; a caption's mask covers its words and the end token
    assert cached.mask[0].tolist() == [True] + [False] * 5
    row = cached.index["a four"]
    assert cached.mask[row].tolist() == [True, True, True, False, False, False]
    t5 = json.loads(next((root / "if2" / "text_states").iterdir()).joinpath(text_states.META_FILE).read_text())
    assert t5["encoder"]["kind"] == "t5" and t5["shape"][1:] == [77, 32]


def test_resolved_configs_and_load_model(runs):
    from jaxdiff.models.unet2d_condition import UNet2DConditionModel

    root = runs["root"]
    one = json.loads((root / "if1" / "config.json").read_text())
    assert one["model"]["kind"] == "unet2d_condition" and one["model"]["in_channels"] == 1
    assert (one["model"]["out_channels"], one["model"]["encoder_hid_dim"], one["model"]["cross_attention_dim"]) == (2, 32, 32)
    assert one["model"]["class_embed_type"] is None and one["text_encoder"]["width"] == 32
    assert one["text_encoder"]["max_length"] == 6 and one["diffusion"]["p_uncond"] == 0.1
    two = json.loads((root / "if2" / "config.json").read_text())
    assert (two["model"]["in_channels"], two["model"]["class_embed_type"], two["model"]["sample_size"]) == (2, "timestep", 16)
    assert two["superres"] == {"low_res": 8, "max_level": 100} and two["text_encoder"]["max_length"] == 77
    module, params, cfg = checkpoints.load_model(str(root / "if2"))
    assert isinstance(module, UNet2DConditionModel) and cfg["step"] == W.STEPS
    assert module.config.class_embed_type == "timestep" and "class_embedding" in params


@pytest.mark.parametrize("name", ["digits_if", "digits_if_superres"])
def test_shipped_configs_resolve(runs, name):
    """configs/digits_if*.py with the tiny CLIP of the runs in place of runs/digits_text/clip."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, H.REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    assert cfg.text_encoder.kind == "clip" and cfg.text_encoder.path == "runs/digits_text/clip"
    cfg.text_encoder.path = str(runs["root"] / "clip")
    cfg.data.data_dir = str(runs["data_dir"])
    resolved = train_config.resolve_config(cfg)
    assert resolved.model.kind == "unet2d_condition" and resolved.model.encoder_hid_dim == 32
    assert resolved.data.image_size == (16 if name.endswith("superres") else 8)


# --- refused before anything compiles -------------------------------------------------------------------

def _refused(cfg, match, workdir):
    from jaxdiff.train import loop as training

    with pytest.raises(train_config.ConfigError, match=match):
        training.train(cfg, str(workdir))
    assert not workdir.exists()  # refused while resolving: nothing written, nothing compiled


@pytest.mark.parametrize("change, match", [
    (lambda c: c.model.update(down_block_types=("CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D")),
     r"config\.model cannot build a 'unet2d_condition'.*down_block_types"),
    (lambda c: c.model.update(addition_embed_type_num_heads=3), r"addition_embed_type_num_heads=3 does not divide"),
    (lambda c: c.model.update(norm_num_groups=24), r"norm_num_groups=24 does not divide"),
    (lambda c: setattr(c.model, "encoder_hid_dim", 32), r"config\.model\.encoder_hid_dim is derived"),
    (lambda c: setattr(c.model, "in_channels", 2), r"config\.model\.in_channels is derived"),
    (lambda c: c.model.update(block_out_channels=(32,) * 5, down_block_types=("ResnetDownsampleBlock2D",) * 5,
                              up_block_types=("ResnetUpsampleBlock2D",) * 5), r"image size must be a multiple of 16"),
    (lambda c: c.text_encoder.update(kind="bert"), r"config\.text_encoder\.kind='bert'; allowed: clip, t5"),
    (lambda c: c.text_encoder.update(path=""), r"config\.text_encoder\.path='': set it"),
    (lambda c: c.text_encoder.update(kind="clip"), r"is not a workdir of the 'clip' task"),
    (lambda c: c.text_encoder.update(tokenizer="/nonexistent"), r"no spiece\.model found"),
    (lambda c: c.train.update(sample_every=5), r"sample_every=5: training grids are not drawn"),
    (lambda c: c.diffusion.update(p_uncond=1.0), r"p_uncond=1\.0 is outside \[0, 1\)"),
    (lambda c: c.data.update(name="digits"), r"needs a captioned dataset"),
])
def test_bad_stage1_configs_refused(root, data_dir, tmp_path, change, match):
    cfg = W.if_config("if_text2im", data_dir, root)
    cfg.text_encoder.update(kind="t5", path=str(root / "t5"), cache_dir="")
    change(cfg)
    _refused(cfg, match, tmp_path / "w")


@pytest.mark.parametrize("change, match", [
    (lambda c: setattr(c.superres, "low_res", None), r"config\.superres\.low_res=None"),
    (lambda c: setattr(c.superres, "low_res", 5), r"low_res=5 must divide config\.data\.image_size=16"),
    (lambda c: setattr(c.superres, "max_level", 101), r"max_level=101: expected None .*num_timesteps=100"),
    (lambda c: setattr(c.model, "class_embed_type", None), r"config\.model\.class_embed_type is derived"),
    (lambda c: c.text_encoder.update(max_length=1), r"max_length=1: expected None or an integer >= 2"),
])
def test_bad_stage2_configs_refused(root, data_dir, tmp_path, change, match):
    cfg = W.if_config("if_superres", data_dir, root)
    change(cfg)
    _refused(cfg, match, tmp_path / "w")


# --- pieces ---------------------------------------------------------------------------------------------

def test_text_states_rows_gather_and_null(tmp_path):
    captions = ("", "a four", "a thin two")
    states = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    mask = np.array([[True, False], [True, True], [True, True]])
    text_states.write_entry(tmp_path / "e", "k" * 64, captions, states, mask, {"version": 1})
    ts = text_states.read_entry(tmp_path / "e", "k" * 64)
    assert text_states.read_entry(tmp_path / "e", "other") is None and not ts.computed
    out = ts.gather(["a thin two", "", "a thin two", "a four"])
    np.testing.assert_array_equal(out["states"], states[[2, 0, 2, 1]])
    np.testing.assert_array_equal(out["mask"], mask[[2, 0, 2, 1]])
    np.testing.assert_array_equal(ts.null()["states"], states[0])
    with pytest.raises(ValueError, match="caption 'a seven' has no cached text states"):
        ts.rows(["a seven"])
    os.remove(tmp_path / "e" / text_states.META_FILE)  # an entry without meta.json is incomplete
    assert text_states.read_entry(tmp_path / "e") is None


def test_low_res_input_and_align_corners():
    import jax.numpy as jnp

    from jaxdiff.models.layers import resize_bilinear_align_corners
    from jaxdiff.train.losses import low_res_input

    x = np.random.default_rng(0).normal(size=(2, 3, 4, 2)).astype(np.float32)
    y = np.asarray(resize_bilinear_align_corners(jnp.asarray(x), 5, 7))
    ry, rx = np.arange(5) * 2 / 4, np.arange(7) * 3 / 6  # torch's align_corners=True source coordinates
    want = np.stack([np.stack([np.stack([np.interp(rx, np.arange(4), row) for row in
                                         np.stack([np.interp(ry, np.arange(3), x[b, :, j, c]) for j in range(4)], 1)], 0)
                               for c in range(2)], -1) for b in range(2)])
    np.testing.assert_allclose(y, want, atol=1e-6)
    np.testing.assert_array_equal(y[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]])  # corners kept
    images = jnp.asarray(np.repeat(np.repeat(x[..., :1], 2, 1), 2, 2))  # [2, 6, 8, 1]
    low, up = low_res_input(images, 3)
    np.testing.assert_allclose(np.asarray(low), x[..., :1], atol=1e-6)
    assert up.shape == images.shape


def test_clip_text_states_match_the_embedding():
    import jax
    import jax.numpy as jnp

    from jaxdiff.models.clip import ClipTextEncoder

    enc = ClipTextEncoder(n_bpe_vocab=10, max_text_len=5, n_embd=8, n_head=2, n_xf_blocks=1, n_head_state=8)
    tokens = jnp.array([[3, 4, 9, 9, 9], [9, 9, 9, 9, 9]])
    lengths = jnp.array([3, 1])

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})  # one program, fast to compile
    def run(key):
        params = enc.init(key, tokens, lengths)
        emb2, states = enc.apply(params, tokens, lengths, return_states=True)
        other = enc.apply(params, tokens.at[0, 3:].set(0), lengths, return_states=True)[1]
        return params, enc.apply(params, tokens, lengths), emb2, states, other

    params, emb, emb2, states, other = run(jax.random.key(0))
    assert states.shape == (2, 5, 16)
    np.testing.assert_array_equal(emb, emb2)
    head = params["params"]["output"]["f"]["kernel"]
    np.testing.assert_allclose(states[jnp.arange(2), lengths - 1] @ head, emb, rtol=1e-5, atol=1e-6)
    # causal: the tokens after the end do not change the states up to it
    np.testing.assert_array_equal(other[0, :3], states[0, :3])
