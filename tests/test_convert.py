"""guided-diffusion checkpoint conversion: flags, released layouts, round trips, errors, command line."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdiff.convert.__main__ import main
from jaxdiff.convert.common import load_state_dict
from jaxdiff.convert.converted import load_converted
from jaxdiff.convert.guided_diffusion import (
    abstract_params,
    expected_state_dict_shapes,
    flags_from_args,
    from_guided_diffusion,
    parse_gd_flags,
    to_guided_diffusion,
)
from jaxdiff.models import create_model

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
RELEASED = json.loads((FIXTURES / "released_keys" / "released.json").read_text())
REPO = pathlib.Path(__file__).resolve().parents[1]

from _adm import CLASSIFIER_FLAGS as CLF_FLAGS  # the architecture of adm_tiny_a.npz
from _adm import UNET_FLAGS


def kind_of(name):
    return "classifier" if "classifier" in name else "superres" if "upsampler" in name else "unet"


@pytest.fixture(scope="module")
def unet_sd(adm):
    return {k[5:]: adm[k] for k in adm if k.startswith("unet/")}


@pytest.fixture(scope="module")
def clf_sd(adm):
    return {k[11:]: adm[k] for k in adm if k.startswith("classifier/")}


def random_state_dict(module, seed=0):
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract_params(module)
    )
    return params, to_guided_diffusion(params, module)


# ------------------------------------------------------------------------------------------------
# guided-diffusion command-line flags
# ------------------------------------------------------------------------------------------------


def test_flags_from_args_64x64_model():
    model, diffusion = flags_from_args(RELEASED["64x64_diffusion"]["flags"], "unet")
    assert model == dict(
        image_size=64, in_channels=3, model_channels=192, out_channels=6, num_res_blocks=3,
        attention_resolutions=(2, 4, 8), dropout=0.1, channel_mult=(1, 2, 3, 4), num_classes=1000,
        use_checkpoint=False, use_fp16=True, num_heads=4, num_head_channels=64, num_heads_upsample=-1,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
    )
    assert diffusion == dict(
        learn_sigma=True, diffusion_steps=1000, noise_schedule="cosine", timestep_respacing="", use_kl=False,
        predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False,
    )


def test_flags_from_args_512_uncond_classifier_and_upsampler():
    m512, _ = flags_from_args(RELEASED["512x512_diffusion"]["flags"])
    assert m512["channel_mult"] == (0.5, 1, 1, 2, 2, 4, 4) and m512["attention_resolutions"] == (16, 32, 64)
    assert m512["use_fp16"] is False
    unc, d = flags_from_args(RELEASED["256x256_diffusion_uncond"]["flags"], "unet")
    assert unc["num_classes"] is None and unc["channel_mult"] == (1, 1, 2, 2, 4, 4)
    assert d["noise_schedule"] == "linear"
    clf, d = flags_from_args(RELEASED["64x64_classifier"]["flags"], "classifier")
    assert clf == dict(
        image_size=64, in_channels=3, model_channels=128, out_channels=1000, num_res_blocks=4,
        attention_resolutions=(2, 4, 8), channel_mult=(1, 2, 3, 4), use_fp16=False, num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True, pool="attention",
    )
    assert d["learn_sigma"] is False
    assert flags_from_args(RELEASED["64x64_classifier"]["flags"])[0] == clf  # kind inferred
    sr, d = flags_from_args(RELEASED["64_256_upsampler"]["flags"], "superres")
    assert sr == dict(
        image_size=256, in_channels=3, model_channels=192, out_channels=6, num_res_blocks=2,
        attention_resolutions=(8, 16, 32), dropout=0.0, channel_mult=(1, 1, 2, 2, 4, 4), num_classes=1000,
        use_checkpoint=False, num_heads=4, num_head_channels=-1, num_heads_upsample=-1,
        use_scale_shift_norm=True, resblock_updown=True, use_fp16=True,
    )
    assert flags_from_args(RELEASED["64_256_upsampler"]["flags"])[0] == sr


def test_flags_from_args_defaults_and_errors():
    # script_util's parser defaults when a flag is absent
    model, diffusion = flags_from_args("--image_size 128 --timestep_respacing ddim25 --use_ddim True", "unet")
    assert model["model_channels"] == 128 and model["num_heads"] == 4 and model["attention_resolutions"] == (8, 16)
    assert model["channel_mult"] == (1, 1, 2, 3, 4) and model["out_channels"] == 3
    assert model["use_scale_shift_norm"] is True and model["resblock_updown"] is False
    assert diffusion["timestep_respacing"] == "ddim25"
    assert parse_gd_flags("--classifier_scale 10.0")["classifier_scale"] == 10.0
    m, _ = flags_from_args("--image_size=32 --channel_mult 1,2,2 --num_channels 64 --attention_resolutions 16")
    assert m["channel_mult"] == (1, 2, 2) and m["attention_resolutions"] == (2,)
    with pytest.raises(ValueError, match="unknown guided-diffusion flag --num_channel.*--num_channels"):
        flags_from_args("--num_channel 128")
    with pytest.raises(ValueError, match="unsupported image size: 32"):
        flags_from_args("--image_size 32")
    with pytest.raises(ValueError, match="boolean"):
        flags_from_args("--class_cond maybe")
    with pytest.raises(ValueError, match="needs a value"):
        flags_from_args("--class_cond --image_size 64")
    with pytest.raises(ValueError, match="unknown model kind"):
        flags_from_args("--image_size 64", "decoder")


# ------------------------------------------------------------------------------------------------
# Released checkpoints: exact key/shape listings, tensor and parameter counts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_layouts(name):
    info = RELEASED[name]
    kind = kind_of(name)
    model_flags, _ = flags_from_args(info["flags"], kind)
    module = create_model(kind, **model_flags)
    expected = expected_state_dict_shapes(module, kind)
    listing = {}
    for line in (FIXTURES / "released_keys" / f"{name}.txt").read_text().splitlines():
        key, shape = line.split("\t")
        listing[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert list(expected.items()) == list(listing.items())  # same keys, shapes and state_dict order
    assert len(expected) == info["tensors"]
    assert sum(int(np.prod(s)) for s in expected.values()) == info["parameters"]


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


def test_fixture_round_trip(unet_sd, clf_sd):
    for sd, kind, flags in ((unet_sd, "unet", UNET_FLAGS), (clf_sd, "classifier", CLF_FLAGS)):
        module, params = from_guided_diffusion(sd, kind, **flags)
        back = to_guided_diffusion(params, module)
        assert list(back) == list(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize(
    "kind, flags",
    [
        ("unet", dict(num_heads=4, num_head_channels=-1, use_new_attention_order=True)),
        ("unet", dict(use_scale_shift_norm=False, resblock_updown=False, out_channels=3, num_classes=None)),
        ("unet", dict(conv_resample=False, resblock_updown=False, num_heads=2, num_head_channels=-1,
                      num_heads_upsample=4, null_label=True)),
        ("superres", dict(num_classes=None, attention_resolutions=(4,))),
        ("classifier", dict(model_channels=64, channel_mult=(0.5, 1, 2), pool="attention", out_channels=7)),
        ("classifier", dict(pool="adaptive", out_channels=7, num_heads=2, num_head_channels=-1)),
        ("classifier", dict(pool="spatial", out_channels=7, resblock_updown=False)),
        ("classifier", dict(pool="spatial_v2", out_channels=7, use_scale_shift_norm=False)),
    ],
)
def test_round_trip_other_flags(kind, flags):
    base = UNET_FLAGS if kind != "classifier" else {**CLF_FLAGS}
    flags = {**base, **flags}
    module = create_model(kind, **flags)
    params, sd = random_state_dict(module)
    assert {k: v.shape for k, v in sd.items()} == expected_state_dict_shapes(module)
    module2, params2 = from_guided_diffusion(sd, kind, **flags)
    assert module2 == module
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


# ------------------------------------------------------------------------------------------------
# Errors name the key and the flag that most likely differs
# ------------------------------------------------------------------------------------------------


def _err(sd, kind, **flags):
    with pytest.raises(ValueError) as info:
        from_guided_diffusion(sd, kind, **flags)
    return str(info.value)


def test_missing_unexpected_and_misshaped_keys(unet_sd):
    sd = dict(unet_sd)
    del sd["input_blocks.1.0.emb_layers.1.bias"]
    msg = _err(sd, "unet", **UNET_FLAGS)
    assert "missing key 'input_blocks.1.0.emb_layers.1.bias'" in msg
    sd = dict(unet_sd, **{"extra.weight": np.zeros(3, np.float32)})
    assert "unexpected key 'extra.weight'" in _err(sd, "unet", **UNET_FLAGS)
    sd = dict(unet_sd, **{"out.2.bias": np.zeros(5, np.float32)})
    msg = _err(sd, "unet", **UNET_FLAGS)
    assert "'out.2.bias' has shape (5,), the model needs (6,)" in msg and "out_channels / learn_sigma" in msg


@pytest.mark.parametrize(
    "changes, key, flag",
    [
        (dict(num_classes=None), "label_emb.weight", "num_classes (class_cond True)"),
        (dict(num_classes=1000), "label_emb.weight", "num_classes"),
        (dict(null_label=True), "label_emb.weight", "null_label"),
        (dict(use_scale_shift_norm=False), "emb_layers.1.weight", "use_scale_shift_norm"),
        (dict(resblock_updown=False), "input_blocks.3.0.", "resblock_updown"),
        (dict(num_res_blocks=1), "blocks", "num_res_blocks / channel_mult"),
        (dict(channel_mult=(1, 2, 2, 2)), "blocks", "num_res_blocks / channel_mult"),
        (dict(attention_resolutions=(4,)), "input_blocks.4.1", "attention_resolutions"),
        (dict(out_channels=3), "out.2.weight", "learn_sigma"),
        (dict(model_channels=64), "time_embed.0.weight", "model_channels"),
    ],
)
def test_unet_mismatch_hints(unet_sd, changes, key, flag):
    msg = _err(unet_sd, "unet", **{**UNET_FLAGS, **changes})
    line = next(ln for ln in msg.splitlines()[1:] if key in ln)
    assert "likely flag: " in line and flag in line, msg
    assert flag in msg.splitlines()[0]  # the summary names it too


def test_classifier_and_superres_hints(unet_sd, clf_sd):
    msg = _err(clf_sd, "classifier", **{**CLF_FLAGS, "pool": "adaptive"})
    assert "likely flag: pool" in msg
    msg = _err(clf_sd, "classifier", **{**CLF_FLAGS, "out_channels": 1000})
    assert "out.2.c_proj.weight" in msg and "out_channels (number of classes)" in msg
    msg = _err(clf_sd, "classifier", **{**CLF_FLAGS, "image_size": 64})
    assert "positional_embedding" in msg and "image_size" in msg
    msg = _err(unet_sd, "superres", **UNET_FLAGS)
    assert "input_blocks.0.0.weight" in msg and "in_channels" in msg and "superres" in msg
    with pytest.raises(ValueError, match="unknown model kind"):
        from_guided_diffusion(unet_sd, "encoder", **UNET_FLAGS)


# ------------------------------------------------------------------------------------------------
# Files and the command line
# ------------------------------------------------------------------------------------------------

CLI_FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 16 "
             "--learn_sigma True --num_head_channels 16 --resblock_updown True --noise_schedule cosine "
             "--timestep_respacing 250")


@pytest.fixture(scope="module")
def cli_npz(tmp_path_factory):
    model_flags, _ = flags_from_args(CLI_FLAGS, "unet")
    params, sd = random_state_dict(create_model("unet", **model_flags), seed=3)
    path = tmp_path_factory.mktemp("sd") / "model.npz"
    np.savez(path, **sd)
    return path, params


def test_command_line_converts_and_loads(tmp_path, cli_npz):
    npz, params = cli_npz
    out = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdiff.convert", "--npz", str(npz), "--kind", "unet", "--flags", CLI_FLAGS,
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "unet" and config["source"] == "guided-diffusion"
    assert config["model"]["attention_resolutions"] == [2] and config["model"]["out_channels"] == 6
    assert config["diffusion"]["noise_schedule"] == "cosine" and config["diffusion"]["timestep_respacing"] == "250"
    module, loaded, cfg = load_converted(out)
    assert cfg == config and module == create_model("unet", **flags_from_args(CLI_FLAGS, "unet")[0])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, params)
    module16, _, cfg16 = load_converted(out, dtype="bfloat16")
    assert module16.dtype == "bfloat16" and cfg16 == config


def test_command_line_refuses_overwrite_and_writes_atomically(tmp_path, cli_npz, capsys):
    npz, _ = cli_npz
    out = tmp_path / "ckpt"
    args = ["--npz", str(npz), "--kind", "unet", "--flags", CLI_FLAGS, "--out", str(out)]
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(args) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(args + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no ckpt.tmp / ckpt.old left
    # a failing conversion (flags that do not fit the checkpoint) leaves nothing behind
    bad = tmp_path / "bad"
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        main(["--npz", str(npz), "--kind", "unet", "--flags", CLI_FLAGS + " --use_scale_shift_norm False",
              "--out", str(bad)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_state_dict_sources(tmp_path, cli_npz):
    npz, _ = cli_npz
    sd = load_state_dict(npz)
    assert load_state_dict(sd).keys() == sd.keys()
    # safetensors (the safetensors library with numpy; no torch): equal to the .npz, read lazily, and as shards
    import safetensors.numpy

    st = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(sd, str(st))
    lazy = load_state_dict(st)
    assert sorted(lazy) == sorted(sd) and all(lazy.shape(k) == sd[k].shape for k in sd)
    assert all(np.array_equal(lazy[k], sd[k]) and lazy[k].dtype == sd[k].dtype for k in sd)
    keys = sorted(sd)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, ks in shards.items():
        safetensors.numpy.save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    sharded = load_state_dict(index)
    assert sorted(sharded) == keys and all(np.array_equal(sharded[k], sd[k]) for k in sd)
    # the converter reads either the same
    model_flags, _ = flags_from_args(CLI_FLAGS, "unet")
    _, from_st = from_guided_diffusion(st, "unet", **model_flags)
    _, from_npz = from_guided_diffusion(npz, "unet", **model_flags)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), from_st, from_npz)
    assert main(["--safetensors", str(st), "--kind", "unet", "--flags", CLI_FLAGS, "--out", str(tmp_path / "o")]) == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_converted(tmp_path / "o")[1], from_npz)
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"not a real checkpoint")
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs PyTorch"):
            load_state_dict(pt)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pt)
        back = load_state_dict(pt)
        assert list(back) == list(sd)
        assert all(np.array_equal(back[k], sd[k]) for k in sd)
