"""The FID Inception-v3 (jaxdiff.eval.inception, jaxdiff.models.inception) against torch-fidelity's outputs
with seeded random weights (tests/fixtures/inception_a.npz), the resize against an independent numpy
reference, strict weight conversion, and the converted file's round trip.

The network is compiled twice in all: once on 14 preprocessed fixture images of every size and mode
together, once through feature_fn (uint8 in) for the two 299x299 images in tf1 mode, a program the
round trip reuses."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inception import FIXTURE, seeded_state_dict

from jaxdiff.convert import inception as convert_inception
from jaxdiff.eval import inception
from jaxdiff.models.inception import InceptionV3
from jaxdiff.util import cpu

SIZES = (32, 64, 299)
TF1_ARRAYS = ("pool3", "logits", "logits_unbiased", "spatial")
END_TO_END = (299, "tf1")  # the case run through feature_fn (the round trip reuses its compiled program)


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def state_dict(fx):
    return seeded_state_dict(fx["keys"], fx["shapes"], int(fx["seed"]))


@pytest.fixture(scope="module")
def params(state_dict):
    return convert_inception.params_from_state_dict(state_dict)


@pytest.fixture(scope="module")
def run(fx, params):
    """{(size, mode): (network input, outputs)} for every case: (299, "tf1") through feature_fn (uint8
    in, the public path), the others preprocessed and then run through the network in one call."""
    cases, inputs = [], []
    for s in SIZES:
        for mode in inception.MODES:
            cases.append((s, mode))
            inputs.append(cpu.jit(inception.preprocess, static_argnums=1)(fx[f"s{s}/images"], mode))
    net = cpu.jit(lambda p, x: InceptionV3().apply({"params": p}, x))
    rest = [i for i, c in enumerate(cases) if c != END_TO_END]
    out = jax.device_get(net(params, jnp.concatenate([inputs[i] for i in rest])))
    result, start = {}, 0
    for i in rest:
        n = inputs[i].shape[0]
        result[cases[i]] = (np.asarray(inputs[i]), {k: v[start:start + n] for k, v in out.items()})
        start += n
    s, mode = END_TO_END
    out = jax.device_get(inception.feature_fn(params, mode)(params, fx[f"s{s}/images"]))
    result[END_TO_END] = (np.asarray(inputs[cases.index(END_TO_END)]), out)
    return result


def _rel(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("size", SIZES)
def test_parity_tf1(run, fx, size):
    _, out = run[(size, "tf1")]
    errs = {k: _rel(out[k], fx[f"s{size}/tf1/{k}"]) for k in TF1_ARRAYS}
    assert all(e <= 1e-4 for e in errs.values()), errs


@pytest.mark.parametrize("size", SIZES)
def test_parity_pytorch_fid(run, fx, size):
    _, out = run[(size, "pytorch_fid")]
    assert _rel(out["pool3"], fx[f"s{size}/pytorch_fid/pool3"]) <= 1e-4


@pytest.mark.parametrize("size", SIZES)
def test_resized_images_match_fixture(run, fx, size):
    # on the 0-255 scale: tf1's reference is before (x - 128) / 128, pytorch_fid's after 2 (x / 255) - 1
    x_tf1 = run[(size, "tf1")][0][0] * 128.0 + 128.0
    assert np.abs(x_tf1 - fx[f"s{size}/tf1/resized"][0]).max() <= 1e-3
    x_pt = run[(size, "pytorch_fid")][0][0]
    assert np.abs(x_pt - fx[f"s{size}/pytorch_fid/resized"][0]).max() * 127.5 <= 1e-3


# ------------------------------------------------------------------------------------------------
# The resize against an independent numpy reference (gathers of the four neighbours, float64)


def _reference_resize(img: np.ndarray, mode: str, float32_coords: bool) -> np.ndarray:
    """Bilinear resize of one [H, W, C] image to 299x299 on the 0-255 scale, straight from the formulas:
    tf1 src = dst * in / out; pytorch_fid src = max((dst + 0.5) * in / out - 0.5, 0); neighbours
    floor(src) and floor(src) + 1, clamped to the last pixel. With float32_coords, src is rounded
    as TensorFlow 1 / PyTorch compute it (float32 scale in / out, float32 products)."""

    def coords(n_in):
        if float32_coords:
            dst, scale, half = np.arange(299, dtype=np.float32), np.float32(n_in) / np.float32(299), np.float32(0.5)
            src = dst * scale if mode == "tf1" else np.maximum(scale * (dst + half) - half, np.float32(0))
            src = src.astype(np.float64)
        else:
            dst = np.arange(299, dtype=np.float64)
            src = dst * n_in / 299 if mode == "tf1" else np.maximum((dst + 0.5) * n_in / 299 - 0.5, 0.0)
        lo = np.floor(src).astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    x = img.astype(np.float64)
    (y0, y1, ty), (x0, x1, tx) = coords(x.shape[0]), coords(x.shape[1])
    top = x[y0][:, x0] * (1 - tx)[None, :, None] + x[y0][:, x1] * tx[None, :, None]
    bottom = x[y1][:, x0] * (1 - tx)[None, :, None] + x[y1][:, x1] * tx[None, :, None]
    return top * (1 - ty)[:, None, None] + bottom * ty[:, None, None]


@pytest.mark.parametrize("mode", inception.MODES)
@pytest.mark.parametrize("shape", [(17, 23), (400, 400), (350, 150)])
def test_resize_against_numpy_reference(mode, shape):
    img = np.random.default_rng(sum(shape)).integers(0, 256, (1, *shape, 3), dtype=np.uint8)
    x = np.asarray(inception.preprocess(jnp.asarray(img), mode))[0].astype(np.float64)
    got = x * 128.0 + 128.0 if mode == "tf1" else (x + 1.0) * 127.5
    assert got.shape == (299, 299, 3)
    # the implementations' own coordinate rounding: to float32 round-off of the interpolation
    assert np.abs(got - _reference_resize(img[0], mode, float32_coords=True)).max() <= 1e-3
    # the float64 formula: the float32 coordinates are at most a few ulps of max(H, W) away
    bound = 255.0 * 4 * max(shape) * 2.0**-24 + 1e-3
    assert np.abs(got - _reference_resize(img[0], mode, float32_coords=False)).max() <= bound


def test_resize_identity_and_matrix_rows():
    for mode in inception.MODES:
        np.testing.assert_array_equal(inception.resize_matrix(299, 299, mode), np.eye(299))
        for n in (1, 5, 64, 512):
            w = inception.resize_matrix(n, 299, mode)
            np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
            assert (w >= 0).all() and (np.count_nonzero(w, axis=1) <= 2).all()


# ------------------------------------------------------------------------------------------------
# Refused input


@pytest.mark.parametrize("bad, match", [
    (np.zeros((1, 32, 32, 3), np.float32), "uint8"),
    (np.zeros((1, 3, 32, 32), np.uint8), "channels first"),
    (np.zeros((1, 32, 32, 1), np.uint8), "3 channels"),
    (np.zeros((32, 32, 3), np.uint8), "3 dimensions"),
    ([[0]], "uint8 array"),
])
def test_bad_images_refused(params, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        inception.feature_fn(params)(params, bad)


def test_bad_mode_refused():
    with pytest.raises(ValueError, match="pytorch_fid"):
        inception.feature_fn(mode="tf2")


def test_strict_conversion_errors(state_dict):
    bad = dict(state_dict)
    del bad["Mixed_6b.branch7x7_2.conv.weight"]
    bad["Mixed_8a.branch1x1.conv.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(ValueError) as e:
        convert_inception.params_from_state_dict(bad)
    msg = str(e.value)
    assert "1 missing, 1 unexpected, 1 wrongly shaped" in msg
    assert "missing key 'Mixed_6b.branch7x7_2.conv.weight' (128, 128, 1, 7)" in msg
    assert "unexpected key 'Mixed_8a.branch1x1.conv.weight'" in msg
    assert "'fc.weight' has shape (1000, 2048), the model needs (1008, 2048)" in msg
    # num_batches_tracked of a layer that does not exist is unexpected too
    with pytest.raises(ValueError, match="unexpected key 'Mixed_9.bn.num_batches_tracked'"):
        convert_inception.params_from_state_dict({**state_dict, "Mixed_9.bn.num_batches_tracked": np.zeros((), np.int64)})
    with pytest.raises(ValueError, match="'fc.bias' has dtype int64"):
        convert_inception.params_from_state_dict({**state_dict, "fc.bias": np.zeros(1008, np.int64)})


def test_params_checked_before_compiling(params):
    broken = {k: v for k, v in params.items() if k != "Conv2d_1a_3x3"}
    broken["fc"] = {**params["fc"], "bias": jnp.zeros(10)}
    with pytest.raises(ValueError, match="missing key 'Conv2d_1a_3x3/kernel'") as e:
        inception.feature_fn(broken)
    assert "'fc/bias' has shape (10,), the model needs (1008,)" in str(e.value)


def test_expected_keys_are_the_fixtures(fx):
    expected = convert_inception.expected_state_dict_shapes()
    listed = {str(k): tuple(int(s) for s in str(v).split(",") if s) for k, v in zip(fx["keys"], fx["shapes"])}
    assert expected == {k: v for k, v in listed.items() if not k.endswith("num_batches_tracked")}


# ------------------------------------------------------------------------------------------------
# Converted file


def test_convert_command_round_trip(tmp_path, fx, state_dict, params, run, capsys):
    src = tmp_path / "inception_sd.npz"  # the state_dict as .npz: the command without torch
    np.savez(src, **state_dict)
    out = tmp_path / "inception_fid.npz"
    assert convert_inception.main(["convert", "--pth", str(src), "--out", str(out)]) == 0
    assert convert_inception.main(["convert", "--pth", str(src), "--out", str(out)]) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err

    fp = convert_inception.fingerprint(params)
    assert fp == convert_inception.fingerprint(params) and len(fp) == 64
    with np.load(out) as z:
        assert str(z["fingerprint"]) == fp and str(z["format"]) == convert_inception.FORMAT
    loaded = convert_inception.load_params(out)
    assert convert_inception.fingerprint(loaded) == fp
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)

    s, mode = END_TO_END
    got = jax.device_get(inception.feature_fn(loaded, mode)(loaded, fx[f"s{s}/images"]))
    _, ref = run[END_TO_END]
    for k in TF1_ARRAYS:
        assert got[k].shape == ref[k].shape and got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], ref[k])

    with np.load(out) as z:  # a modified weight is caught by the fingerprint
        arrays = {k: z[k] for k in z.files}
    arrays["params/fc/bias"] = arrays["params/fc/bias"] + 1.0
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(ValueError, match="fingerprint"):
        convert_inception.load_params(tmp_path / "tampered.npz")


def test_convert_pth_without_torch(tmp_path, monkeypatch, capsys):
    pth = tmp_path / "weights.pth"
    pth.write_bytes(b"not read")
    monkeypatch.setattr(convert_inception, "_torch_available", lambda: False)
    assert convert_inception.main(["convert", "--pth", str(pth), "--out", str(tmp_path / "o.npz")]) == 2
    assert "needs PyTorch" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_evaluator_command(tmp_path, params, capsys, monkeypatch):
    """`python -m jaxdiff.eval adm REF SAMPLES --inception W` prints and writes the evaluator's
    numbers. The weights file is real (seeded); the network is replaced by a cheap stand-in so the
    command's plumbing is tested without running Inception at 299 (its parity is tested above)."""
    import subprocess
    import sys

    import _fake_features as F

    from jaxdiff.eval import __main__ as eval_cli
    from jaxdiff.eval import adm as adm_eval

    fake = F.make_params((16, 16, 3))
    monkeypatch.setattr(inception, "pure_feature_fn", lambda mode="tf1": lambda p, images: F.feature_fn(fake, images))
    weights = tmp_path / "inception.npz"
    convert_inception.save_params(weights, params)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "samples.npz", rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    args = ["adm", str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--inception", str(weights),
            "--batch_size", "4", "--out", str(tmp_path / "m.json")]
    assert eval_cli.main(args) == 0
    printed = capsys.readouterr().out
    for name in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"):
        assert name in printed
    got = json.loads((tmp_path / "m.json").read_text())
    direct = adm_eval.evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", inception.pure_feature_fn(), None,
                               mode="tf1", batch_size=4, progress=False)
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert got[key] == pytest.approx(direct[key], rel=1e-6), key
    bad = subprocess.run([sys.executable, "-m", "jaxdiff.eval", "adm", str(tmp_path / "nope.npz"),
                          str(tmp_path / "samples.npz"), "--inception", str(weights)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
