"""Training by text: the "text2im" and "clip" tasks through train(), caption batches, the text sweep.

The runs (tiny models, a few steps) happen in one subprocess, `_text_worker.py`, compiled at LLVM -O0
with a persistent cache; the other tests need no compilation."""

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

try:
    import _training_helpers as H
except ImportError:  # tests/ imported as a package
    from tests import _training_helpers as H
from jaxdiff.data import batching, captions, transforms
from jaxdiff.data import order as data_order
from jaxdiff.data import sources as data_sources
from jaxdiff.data.tokenizers import WordTokenizer
from jaxdiff.eval import sweep
from jaxdiff.sample import runner
from jaxdiff.train import config as train_config
from jaxdiff.train import inputs as train_inputs
from jaxdiff.train import losses

VOCAB = list(captions.vocabulary("digits"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return H.captioned_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("text_runs")
    cache = tmp_path_factory.getbasetemp() / "xla_cache"
    cache.mkdir(exist_ok=True)
    H.run([sys.executable, str(H.HELPER.parent / "_text_worker.py"), str(data_dir), str(root), str(root / "rows.json")],
          H.env(cache), timeout=600)
    return root, json.loads((root / "rows.json").read_text())


def _config(task, data_dir, **model):
    c = train_config.default_config(task)
    c.data.update(name="digits_text", data_dir=str(data_dir))
    c.model.update(model)
    return c


# --- the runs ----------------------------------------------------------------------------------

def test_text_tasks_write_vocabulary_and_resume_bitwise(runs):
    root, _ = runs
    text = json.loads((root / "text" / "config.json").read_text())
    assert text["text"]["vocab"] == VOCAB and text["model"]["n_vocab"] == len(VOCAB) + 1
    assert text["model"]["kind"] == "text2im" and text["diffusion"]["p_uncond"] == 0.2
    clip = json.loads((root / "clip" / "config.json").read_text())
    assert clip["model"]["kind"] == "clip" and clip["model"]["n_timesteps"] == 50 and clip["text"]["vocab"] == VOCAB
    # resumed from step 2: the uninterrupted run's state (parameters, EMA, optimiser)
    assert H.complete_steps(root / "text") == [2, 4] and H.complete_steps(root / "resumed") == [2, 4]
    H.assert_trees_equal(H.load_tree(root / "text", 4), H.load_tree(root / "resumed", 4))
    last = [m for m in H.read_metrics(root / "clip") if "loss" in m][-1]
    assert np.isfinite(last["loss"]) and 0 < last["logit_scale"] <= 100 and 0 <= last["accuracy"] <= 1
    zero_shot = [m for m in H.read_metrics(root / "clip") if "eval_acc_t0" in m][-1]
    assert {k for k in zero_shot if k.startswith("eval_acc_t")} == {f"eval_acc_t{t}" for t in (0, 5, 12, 25, 37, 49)}


def test_text_sweep_rows_captions_and_report(runs):
    root, rows = runs
    assert [(r["guidance"], r["scale"]) for r in rows][1:] == [("cfg", 0.0), ("cfg", 3.0), ("clip", 2.0)]
    for r in rows:
        assert 0 <= r["attribute_accuracy"] <= 1 and -100 <= r["clip_score"] <= 100, r
        assert {f"attribute_accuracy/{a}" for a in ("thickness", "width", "slant")} <= set(r)
        assert np.isfinite(r["fid"]) and 0 <= r["accuracy"] <= 1 and np.isfinite(r["recall"])
    model_cfg = json.loads((root / "text" / "config.json").read_text())
    prompts = sweep.text_prompts(model_cfg, "test", 40, 0)
    with np.load(root / "report" / "settings" / sweep.setting_name(rows[3]) / "samples.npz") as f:
        assert list(f["captions"]) == prompts["captions"] and f["arr_0"].shape == (40, 8, 8, 1)
    # the captions' requested bins are the test examples' named attributes
    parsed = np.stack([captions.parse_caption("digits", c)[1] for c in prompts["captions"]])
    np.testing.assert_array_equal(parsed, prompts["requested"])
    table = (root / "report" / "results.md").read_text()
    assert "| attribute acc | thickness | width | slant | eval-CLIP score |" in table
    for f in ("attribute_accuracy_vs_scale.png", "clip_score_vs_scale.png", "fid_vs_clip_score.png",
              "precision_vs_recall.png"):
        assert (root / "report" / f).stat().st_size > 0, f
    # a trained CLIP's workdir gives either encoder to a guide
    module, params, cfg = runner.load(str(root / "clip"), net="clip_text")
    assert cfg["model"]["kind"] == "clip-text" and set(params) == {"input", "output", "block_0"}


# --- batches, tokens and bad input (no compilation) ----------------------------------------------

def test_caption_batches_carry_text_and_leave_images_byte_identical(data_dir):
    source, _ = data_sources.make_source("digits_text", "train", str(data_dir))
    kw = dict(global_batch_size=12, seed=3, num_steps=2, start_position=5, prefetch=0)
    plain = list(batching.batches(source, **kw))
    texts = list(batching.batches(source, text=True, workers=3, **kw))
    for step, ((im, lb), (im2, lb2, text)) in enumerate(zip(plain, texts)):
        assert im.tobytes() == im2.tobytes() and np.array_equal(lb, lb2)
        idx = data_order.global_batch_indices(step, global_batch_size=12, num_examples=len(source), seed=3,
                                        position=5 + 12 * step)
        want = source.gather_text(idx)
        assert set(text) == {"caption", "attributes", "named"}
        for k in want:
            np.testing.assert_array_equal(text[k], want[k])
    digits, _ = data_sources.make_source("digits", "train", str(data_dir))
    with pytest.raises(ValueError, match="has no captions; captioned datasets: digits_text, fashion_mnist_text"):
        batching.batches(digits, global_batch_size=4, seed=0, text=True)


def test_caption_tokens_truncate_and_refuse_unknown_words(data_dir):
    text = train_config.resolve_config(_config("text2im", data_dir, text_ctx=2))
    tokens = train_inputs.caption_tokens(text)(["a thick wide slanted seven", ""])
    ids = [VOCAB.index(w) for w in ("a", "thick")]
    np.testing.assert_array_equal(tokens["tokens"], [ids, [len(VOCAB)] * 2])  # truncated; empty = all padding
    np.testing.assert_array_equal(tokens["mask"], [[True, True], [False, False]])
    clip = train_config.resolve_config(_config("clip", data_dir, max_text_len=3))
    tokens = train_inputs.caption_tokens(clip)(["a thick wide slanted seven", "a two"])
    np.testing.assert_array_equal(tokens["tokens"][0], ids + [len(VOCAB)])  # the first 2 words and the end id
    np.testing.assert_array_equal(tokens["lengths"], [3, 3])
    with pytest.raises(ValueError, match="word 'purple' .* is not in the vocabulary \\(the vocabulary of digits_text"):
        train_inputs.caption_tokens(text)(["a purple seven"])
    model_cfg = {**text.to_dict(), "model": {**text.model.to_dict()}}
    cfg = runner.default_config()
    cfg.sample.update(captions="a thin two|a purple seven", num_samples=2, batch_size=2)
    with pytest.raises(ValueError, match="'purple'"):
        runner.validate(cfg, model_cfg)


@pytest.mark.parametrize("task,data_name,message", [
    ("text2im", "digits", "config.task='text2im' needs a captioned dataset, and config.data.name='digits' has no "
                          "captions; allowed: digits_text, fashion_mnist_text"),
    ("clip", "digits_text", "config.model.n_vocab is derived"),
])
def test_text_configs_refused(data_dir, task, data_name, message):
    c = _config(task, data_dir)
    c.data.name = data_name
    if task == "clip":
        c.model.n_vocab = 5
    with pytest.raises(train_config.ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
        train_config.resolve_config(c)


def test_contrastive_loss_is_clip_infonce_with_shared_captions():
    rng = np.random.default_rng(0)
    z_img, z_txt = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    tokens = np.array([[1, 2], [3, 4], [1, 2], [5, 6]])
    loss, acc = losses.contrastive_loss(jnp.asarray(z_img), jnp.asarray(z_txt), jnp.float32(10.0), jnp.asarray(tokens))
    unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)
    logits = 10.0 * unit(z_img) @ unit(z_txt).T
    same = (tokens[:, None] == tokens[None]).all(-1)
    target = same / same.sum(1, keepdims=True)  # rows 0 and 2 share a caption: half each

    def xent(lg):
        lg = lg - lg.max(1, keepdims=True)
        return -(target * (lg - np.log(np.exp(lg).sum(1, keepdims=True)))).sum(1).mean()

    np.testing.assert_allclose(float(loss), 0.5 * (xent(logits) + xent(logits.T)), rtol=1e-5)
    assert float(acc) == np.mean(same[np.arange(4), logits.argmax(1)])


def test_caption_dropout_is_the_empty_caption(data_dir):
    resolved = train_config.resolve_config(_config("text2im", data_dir, text_ctx=4))
    tokens = train_inputs.caption_tokens(resolved)(["a thin two", "a seven"])
    out = losses.condition_dropout(resolved)({k: jnp.asarray(v) for k, v in tokens.items()},
                                               jnp.asarray([False, True]))
    empty_tokens, empty_mask = WordTokenizer(VOCAB).tokens_and_mask([""], 4)
    np.testing.assert_array_equal(out["tokens"], np.concatenate([tokens["tokens"][:1], empty_tokens]))
    np.testing.assert_array_equal(out["mask"], np.concatenate([tokens["mask"][:1], empty_mask]))


def test_clip_image_encoder_reads_grayscale_as_rgb():
    import jax

    from jaxdiff.models.clip import ClipImageEncoder

    enc = ClipImageEncoder(image_size=8, patch_size=4, n_embd=8, n_head=1, n_xf_blocks=1, n_head_state=8, n_timestep=10)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1, maxval=1)
    t = jnp.array([0, 9])

    @jax.jit
    def both(x, t):
        params = enc.init(jax.random.key(1), x, t)
        return enc.apply(params, x, t), enc.apply(params, jnp.repeat(x, 3, axis=3), t)

    gray, rgb = both(x, t)
    np.testing.assert_array_equal(gray, rgb)


@pytest.mark.parametrize("name", ["digits_text", "digits_clip", "digits_clip:eval", "fashion_mnist_text",
                                  "fashion_mnist_clip", "fashion_mnist_clip:eval"])
def test_text_configs_resolve_and_read_whole_captions(data_dir, name):
    import importlib.util

    file, *variant = name.split(":")
    spec = importlib.util.spec_from_file_location(file, H.REPO / "configs" / f"{file}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(*variant)
    assert bool(cfg.train.noised) == (cfg.task == "text2im" or not variant)
    base = cfg.data.name[: -len("_text")]
    if base == "digits":
        cfg.data.data_dir = str(data_dir)
        info = None
    else:  # Fashion-MNIST's shape and caption metadata, without preparing 70,000 images
        info = data_sources.DataInfo(name=cfg.data.name, split="train", num_examples=60000, image_shape=(28, 28, 1),
                             num_classes=10, class_names=tuple(map(str, range(10))), random_flip=False,
                             resize_mode="pad", pad_value=0, data_dir="/unused", caption_key="caption",
                             captions={"scheme": base, "vocabulary": list(captions.vocabulary(base))})
    r = train_config.resolve_config(cfg, info)
    s = captions.scheme(base)
    longest = 1 + len(s.attributes) + max(len(w.split()) for w in s.class_words)  # "a" + attributes + class
    room = r.model.text_ctx if r.task == "text2im" else r.model.max_text_len - 1  # CLIP keeps one for the end id
    assert longest <= room, (name, longest, room)
    assert r.data.image_size == (8 if base == "digits" else 32)


def test_clip_scorer_is_the_mean_clean_cosine_times_100(runs):
    from jaxdiff import checkpoints
    from jaxdiff.eval import evaluation

    root, _ = runs
    module, params, cfg = checkpoints.load_model(str(root / "clip"))
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    caps = ["a seven", "a thick two", "a one", "a slanted nine", "a zero"]
    tokens, lengths = WordTokenizer(list(cfg["text"]["vocab"])).tokens_and_lengths(caps, cfg["model"]["max_text_len"])
    x, t = transforms.to_model_range(images), jnp.zeros((5,), jnp.int32)
    z_img = np.asarray(module.apply({"params": params}, x, t, method="encode_image"), np.float64)
    z_txt = np.asarray(module.apply({"params": params}, tokens, lengths, method="encode_text"), np.float64)
    unit = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)  # noqa: E731
    expected = 100 * np.mean(np.sum(unit(z_img) * unit(z_txt), axis=-1))
    score = evaluation.clip_scorer(str(root / "clip"), batch_size=2)  # batches of 2, 2, 1
    assert score(images, caps) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert score(images, caps[::-1]) != pytest.approx(expected, rel=1e-5, abs=1e-4)  # the captions count
