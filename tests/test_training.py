"""Training: config validation, derived values, losses, schedules, NaN detection, CLI errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    import _training_helpers as H
except ImportError:  # tests/ imported as a package
    from tests import _training_helpers as H
from jaxdiff.diffusion import schedules
from jaxdiff.train import config as train_config
from jaxdiff.train import losses
from jaxdiff.train import state as train_state


@pytest.fixture(scope="module")
def sess(tmp_path_factory):
    return H.session(tmp_path_factory)


def _digits_info():
    from jaxdiff.data.sources import DataInfo

    return DataInfo(name="digits", split="train", num_examples=1438, image_shape=(8, 8, 1), num_classes=10,
                    class_names=tuple(map(str, range(10))), random_flip=False, resize_mode="resize",
                    pad_value=0, data_dir="/unused")


def _tiny_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_config", H.TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture()
def tiny(sess):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_config", H.TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.data.data_dir = str(sess["data_dir"])
    return cfg


# --- bad input ---------------------------------------------------------------------------------

BAD = [
    (lambda c: setattr(c, "task", "regression"), r"config.task='regression' is not a task; allowed: diffusion, classifier"),
    (lambda c: setattr(c.diffusion, "prediction", "score"), r"prediction='score' is not a prediction target; allowed: eps, x0, v"),
    (lambda c: setattr(c.diffusion, "p_uncond", 1.0), r"p_uncond=1.0 is outside \[0, 1\)"),
    (lambda c: setattr(c.diffusion, "p_uncond", -0.1), r"p_uncond=-0.1 is outside \[0, 1\)"),
    (lambda c: setattr(c.diffusion, "schedule", "sigmoid"), r"schedule='sigmoid'; allowed: linear, cosine"),
    (lambda c: setattr(c.data, "name", "no_such_dataset"), r"unknown dataset 'no_such_dataset'"),
    (lambda c: setattr(c.data, "data_dir", "/no/such/dir"), r"data_dir='/no/such/dir' does not exist"),
    (lambda c: setattr(c.model, "channel_mult", (1, 1, 1, 1, 1)),
     r"cannot build a 'unet' for 'digits' images of size 8x8x1: image_size=8 cannot be halved 4 times"),
    (lambda c: setattr(c.model, "attention_resolutions", (4,)), r"attention_resolutions contains 4"),
    (lambda c: setattr(c.model, "dtype", "float16"), r"dtype='float16'; allowed: float32, bfloat16"),
    (lambda c: setattr(c.train, "batch_size", 0), r"batch_size=0: expected a positive integer"),
    (lambda c: setattr(c.train, "ema_decay", 1.0), r"ema_decay=1.0: expected a number in \[0, 1\)"),
    (lambda c: setattr(c.train, "lr_schedule", "step"), r"lr_schedule='step'; allowed: constant, linear, cosine"),
    (lambda c: setattr(c.train, "lr", float("nan")), r"lr=nan: expected a positive finite number"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_is_refused_with_value_and_allowed(tiny, mutate, message):
    mutate(tiny)
    with pytest.raises(train_config.ConfigError, match=message):
        train_config.resolve_config(tiny)


def test_derived_values_are_refused_in_config(tiny):
    tiny.model.num_classes = 10
    with pytest.raises(train_config.ConfigError, match="config.model.num_classes is derived"):
        train_config.resolve_config(tiny)


def test_batch_size_the_devices_cannot_share(tiny, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda *a: 3)
    with pytest.raises(train_config.ConfigError, match=r"batch_size=16 cannot be shared by the 3 devices .*multiple of 3"):
        train_config.resolve_config(tiny)


def test_cli_reports_bad_input_without_traceback(sess, tmp_path):
    p = H.run(H.train_cmd(tmp_path / "w", sess["data_dir"], "--config.diffusion.p_uncond=1.5"),
              H.env(sess["cache"]), check=False)
    assert p.returncode == 1
    assert "train.py: error: config.diffusion.p_uncond=1.5 is outside [0, 1)" in p.stderr
    assert "Traceback" not in p.stderr


# --- derived values, resolved config ------------------------------------------------------------

def test_resolved_config_derives_from_dataset_and_task(tiny, sess):
    r = train_config.resolve_config(tiny)
    assert r.model.kind == "unet" and r.model.image_size == 8 and r.model.in_channels == 1
    assert r.model.out_channels == 2  # learned sigma doubles the channels
    assert r.model.num_classes == 10 and r.model.null_label is True
    tiny.diffusion.learned_sigma = False
    tiny.diffusion.p_uncond = 0.0
    r = train_config.resolve_config(tiny)
    assert r.model.out_channels == 1 and r.model.null_label is False
    tiny.task = "classifier"
    r = train_config.resolve_config(tiny)
    assert r.model.kind == "classifier" and r.model.out_channels == 10 and "num_classes" not in r.model
    # the reference workdir has the resolved config: sampling needs only the workdir
    saved = json.loads((sess["ref"] / "config.json").read_text())
    assert saved["model"]["kind"] == "unet" and saved["model"]["out_channels"] == 2
    assert saved["diffusion"]["schedule"] == "cosine" and saved["diffusion"]["num_timesteps"] == 100


def _load_config(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, H.REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize("name", ["digits", "digits_classifier", "digits_eval_classifier", "tiny"])
def test_digits_configs_resolve(sess, name):
    cfg = _load_config(name)
    cfg.data.data_dir = str(sess["data_dir"])
    r = train_config.resolve_config(cfg)
    assert r.model.image_size == 8 and r.data.num_classes == 10


@pytest.mark.parametrize("name", ["fashion_mnist", "fashion_mnist_classifier", "fashion_mnist_eval_classifier"])
def test_fashion_mnist_configs_resolve(name):
    from jaxdiff.data.sources import DataInfo

    info = DataInfo(name="fashion_mnist", split="train", num_examples=60000, image_shape=(28, 28, 1),
                    num_classes=10, class_names=tuple(map(str, range(10))), random_flip=True,
                    resize_mode="pad", pad_value=0, data_dir="/unused")
    r = train_config.resolve_config(_load_config(name), info)
    assert r.model.image_size == 32 and r.model.in_channels == 1


# --- schedules and EMA ---------------------------------------------------------------------------

def test_learning_rate_warmup_and_decay():
    t = _tiny_config().train
    t.update(lr=1.0, warmup_steps=4, steps=14)
    f = train_state.learning_rate_fn(t)
    np.testing.assert_allclose([float(f(s)) for s in (0, 3, 4, 13)], [0.25, 1.0, 1.0, 1.0])
    t.lr_schedule = "linear"
    f = train_state.learning_rate_fn(t)
    np.testing.assert_allclose([float(f(s)) for s in (0, 4, 9, 14)], [0.25, 1.0, 0.5, 0.0], atol=1e-6)
    t.lr_schedule = "cosine"
    f = train_state.learning_rate_fn(t)
    np.testing.assert_allclose([float(f(s)) for s in (4, 9, 14)], [1.0, 0.5, 0.0], atol=1e-6)


def test_ema_update_and_warmup():
    tiny = _tiny_config()
    tiny.train.ema_decay = 0.999
    assert float(train_state.ema_decay_at(tiny.train, 0)) == pytest.approx(0.1)
    assert float(train_state.ema_decay_at(tiny.train, 10 ** 6)) == pytest.approx(0.999)
    tiny.train.ema_warmup = False
    assert float(train_state.ema_decay_at(tiny.train, 0)) == pytest.approx(0.999)
    e = train_state.ema_update({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, 0.75)
    np.testing.assert_allclose(e["w"], 0.25)


# --- losses with a stub network --------------------------------------------------------------------

class _Recorder:
    """A stand-in for a Flax module: records what the loss feeds it."""

    def __init__(self, out_channels):
        self.out_channels = out_channels
        self.seen = {}

    def apply(self, variables, x, t, y=None, train=False, rngs=None):
        assert train is True
        self.seen.update(x=x, t=t, **({} if y is None else {"y": y}))
        w = variables["params"]["w"]
        if y is None:  # classifier: logits
            return jnp.broadcast_to(jnp.mean(x, axis=(1, 2, 3))[:, None] * w, (x.shape[0], 10))
        return jnp.broadcast_to(x[..., :1] * w, x.shape[:-1] + (self.out_channels,))


def _run(loss_fn, model, params, images, labels):
    """Jit the loss; return what the stub saw from inside the same trace."""

    def f(p, x, y):
        loss, metrics = loss_fn(p, x, y, jax.random.key(0))
        return loss, metrics, dict(model.seen)

    return jax.jit(f)(params, images, labels)


def test_diffusion_loss_drops_labels_and_draws_uniform_t():
    r = train_config.resolve_config(_tiny_config(), _digits_info())
    r.diffusion.p_uncond = 0.5
    sched = schedules.make_schedule("cosine", 100)
    model = _Recorder(2)
    loss_fn = losses.diffusion_loss_fn(r, model, sched)
    images = jnp.zeros((4096, 8, 8, 1))
    labels = jnp.full((4096,), 3, jnp.int32)
    loss, metrics, seen = _run(loss_fn, model, {"w": jnp.float32(0.5)}, images, labels)
    y, t = np.asarray(seen["y"]), np.asarray(seen["t"])
    assert set(np.unique(y)) == {3, 10} and abs(np.mean(y == 10) - 0.5) < 0.03
    assert t.min() == 0 and t.max() == 99 and abs(t.mean() - 49.5) < 3
    assert set(metrics) == {"loss", "mse", "vb"} and np.isfinite(float(loss))


def test_classifier_loss_noised_and_clean():
    tiny = _tiny_config()
    tiny.task = "classifier"
    r = train_config.resolve_config(tiny, _digits_info())
    sched = schedules.make_schedule("cosine", 100)
    images = jnp.full((256, 8, 8, 1), 0.5)
    labels = jnp.zeros((256,), jnp.int32)
    model = _Recorder(10)
    loss, metrics, seen = _run(losses.classifier_loss_fn(r, model, sched), model, {"w": jnp.float32(1.0)},
                               images, labels)
    assert np.asarray(seen["t"]).max() > 50 and not np.allclose(seen["x"], images)
    assert set(metrics) == {"loss", "accuracy"}
    r.train.noised = False
    _, _, seen = _run(losses.classifier_loss_fn(r, model, sched), model, {"w": jnp.float32(1.0)}, images, labels)
    assert np.all(np.asarray(seen["t"]) == 0)
    np.testing.assert_array_equal(seen["x"], images)


# --- non-finite loss ----------------------------------------------------------------------------------

def test_nan_loss_stops_training_and_keeps_last_checkpoint(sess, tmp_path):
    """A NaN batch at step 13 (logs every 5, checkpoints every 10): the run stops at the log
    boundary 15 with an error naming step 13; checkpoint 10 is intact and nothing later exists.
    The run also writes the periodic sample grid (sample_every=10) before the NaN."""
    work = tmp_path / "w"
    p = H.run(H.train_cmd(work, sess["data_dir"], "--config.train.sample_every=10"),
              H.env(sess["cache"], JAXDIFF_TEST_NAN_AT_STEP=13), check=False)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "non-finite loss or gradient at training step 13 (detected at step 15" in p.stderr
    assert "the last good checkpoint is step 10" in p.stderr
    assert "Traceback" not in p.stderr
    assert H.complete_steps(work) == [10]
    assert [m["step"] for m in H.read_metrics(work)] == [5, 10]
    got = H.load_tree(work, 10)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(got))
    H.assert_trees_equal(got, H.load_tree(sess["ref"], 10))
    grid = work / "samples" / "step_0000010.png"
    assert grid.exists()
    from PIL import Image

    with Image.open(grid) as im:
        assert im.size[0] > 0 and im.size[1] > 0
