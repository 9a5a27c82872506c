"""`python -m jaxdiff.convert --source diffusers|transformers FOLDER --out DIR` and `jaxdiff.load_model(DIR)`:
the fixtures' IF stage I / II U-Nets (`unet1`, `unet2`), unCLIP's decoder and first upsampler and the T5
encoder, written as released folders (config.json + safetensors), converted by the command (in process),
reopened by load_model and checked against the reference outputs (U-Nets <= 1e-4 relative, T5 <= 1e-5);
then bad input: one `error:` line, nothing written, nothing compiled.

Fixtures `if_a`, `unclip_a` (conftest.py): tests/fixtures/if_tiny_a.npz and unclip_tiny_a.npz, copies of
/work/shared/fixtures/cascade/, whose README describes them (PyTorch layouts, each model's config.json stored
as the JSON string `<name>_config`).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jaxdiff
from jaxdiff.convert.__main__ import main
from jaxdiff.models import t5
from jaxdiff.models.unet2d import UNet2DModel
from jaxdiff.models.unet2d_condition import UNet2DConditionModel
from jaxdiff.util import cli

PROG = "python -m jaxdiff.convert"
UNET_TOL, T5_TOL = 1e-4, 1e-5  # max |ours - reference| / max |reference|


def state_dict(z, prefix):
    return {k[len(prefix) + 1:]: np.ascontiguousarray(v) for k, v in z.items() if k.startswith(prefix + "/")}


def write_folder(path, config: dict, sd: dict, weights: str, shards: int = 1):
    """A released model folder: config.json and `weights` (safetensors), or `shards` files and the index."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        safetensors.numpy.save_file(sd, str(path / weights))
        return path
    stem = weights.split(".")[0]
    keys, weight_map = sorted(sd), {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        safetensors.numpy.save_file({k: sd[k] for k in keys[i::shards]}, str(path / name))
        weight_map.update({k: name for k in keys[i::shards]})
    (path / (weights + ".index.json")).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def diffusers_folder(path, z, prefix, config_key, cls, **kw):
    config = {"_class_name": cls, "_diffusers_version": "0.42.1", **json.loads(str(z[config_key]))}
    return write_folder(path, config, state_dict(z, prefix), kw.pop("weights", "diffusion_pytorch_model.safetensors"),
                        **kw), config


def convert(source, folder, out, *extra):
    assert main(["--source", source, str(folder), "--out", str(out), *extra]) == 0
    return jaxdiff.load_model(str(out))


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def nhwc(a):
    return jnp.asarray(np.moveaxis(np.asarray(a), 1, -1))


def unet_parity(module, params, z, x, t, ref, *args, **kw):
    """One jit of the module; the output (NHWC) against the reference (NCHW)."""
    fn = jax.jit(lambda p, x, t, a, k: module.apply({"params": p}, x, t, *a, **k))
    out = fn(params, nhwc(z[x]), jnp.asarray(z[t]), tuple(jnp.asarray(z[a]) for a in args),
             {k: jnp.asarray(z[v]) for k, v in kw.items()})
    return rel_err(np.moveaxis(np.asarray(out), -1, 1), z[ref])


def check_record(out, kind, source, config, params):
    written = json.loads((out / "config.json").read_text())
    assert written == {"kind": kind, "model": config, "source": source}
    assert {(type(a), a.dtype) for a in jax.tree_util.tree_leaves(params)} == {(np.ndarray, np.dtype(np.float32))}


# ------------------------------------------------------------------------------------------------
# Parity through the command and load_model
# ------------------------------------------------------------------------------------------------


def test_if_stage1_unet(tmp_path, if_a, capsys):
    folder, config = diffusers_folder(tmp_path / "unet", if_a, "unet1", "unet1_config", "UNet2DConditionModel")
    module, params, cfg = convert("diffusers", folder, tmp_path / "out")
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "unet2d_condition" and report["parameters"] == sum(
        v.size for v in state_dict(if_a, "unet1").values())
    assert isinstance(module, UNet2DConditionModel) and cfg["kind"] == "unet2d_condition"
    check_record(tmp_path / "out", "unet2d_condition", "diffusers", config, params)
    assert unet_parity(module, params, if_a, "unet1_x", "unet1_t", "unet1_out", "t5_out") <= UNET_TOL


def test_if_stage2_unet(tmp_path, if_a):
    folder, config = diffusers_folder(tmp_path / "unet", if_a, "unet2", "unet2_config", "UNet2DConditionModel")
    module, params, cfg = convert("diffusers", folder, tmp_path / "out")
    check_record(tmp_path / "out", "unet2d_condition", "diffusers", config, params)
    assert unet_parity(module, params, if_a, "unet2_x", "unet2_t", "unet2_out", "t5_out",
                       class_labels="unet2_noise_level") <= UNET_TOL


def test_unclip_decoder_sharded(tmp_path, unclip_a):
    """A sharded folder (diffusion_pytorch_model.safetensors.index.json and three shards)."""
    folder, config = diffusers_folder(tmp_path / "decoder", unclip_a, "decoder", "decoder_config",
                                      "UNet2DConditionModel", shards=3)
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    module, params, _ = convert("diffusers", folder, tmp_path / "out")
    check_record(tmp_path / "out", "unet2d_condition", "diffusers", config, params)
    assert unet_parity(module, params, unclip_a, "decoder_x", "decoder_t", "decoder_out", "text_proj_hidden_states",
                       class_labels="text_proj_time_embeddings", attention_mask="decoder_attention_mask") <= UNET_TOL


def test_unclip_super_res_variant(tmp_path, unclip_a):
    """A UNet2DModel folder whose weights are a variant (diffusion_pytorch_model.fp16.safetensors)."""
    folder, config = diffusers_folder(tmp_path / "super_res", unclip_a, "super_res_first", "super_res_config",
                                      "UNet2DModel", weights="diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(FileNotFoundError, match="no diffusers weights in"):
        main(["--source", "diffusers", str(folder), "--out", str(tmp_path / "plain")])
    module, params, cfg = convert("diffusers", folder, tmp_path / "out", "--variant", "fp16")
    assert isinstance(module, UNet2DModel) and cfg["kind"] == "unet2d"
    check_record(tmp_path / "out", "unet2d", "diffusers", config, params)
    assert unet_parity(module, params, unclip_a, "super_res_x", "super_res_t", "super_res_first_out") <= UNET_TOL


def test_t5_encoder(tmp_path, if_a):
    config = json.loads(str(if_a["t5_config"]))
    folder = write_folder(tmp_path / "text_encoder", config, state_dict(if_a, "t5"), "model.safetensors")
    module, params, cfg = convert("transformers", folder, tmp_path / "out")
    assert isinstance(module, t5.T5Encoder) and module.config == t5.t5_config_from_json(config)
    check_record(tmp_path / "out", "t5_encoder", "transformers", config, params)
    assert rel_err(t5.encode(module, params, if_a["t5_tokens"], if_a["t5_mask"]), if_a["t5_out"]) <= T5_TOL
    # dtype: the compute dtype of the reopened module (no compile here)
    module16, _, _ = jaxdiff.load_model(str(tmp_path / "out"), dtype="bfloat16")
    assert module16.dtype == jnp.bfloat16 and module16.param_dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# Bad input: one error line, before anything is written or compiled
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_compile():
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield
    jax.monitoring.unregister_event_duration_listener(listen)
    assert not compiles, "the command compiled before refusing its input"


def refused(capsys, tmp_path, *argv) -> str:
    """The command's stderr for `argv` run as `python -m jaxdiff.convert` does: exit 2, one `error:` line."""
    out = tmp_path / "out"
    assert cli.report_errors(lambda: main([*argv, "--out", str(out)]), PROG) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error: ") and err.count("error:") == 1, err
    assert not out.exists() and not out.with_name("out.tmp").exists()
    return err


def test_bad_folders(tmp_path, if_a, unclip_a, capsys, no_compile):
    # a missing folder
    err = refused(capsys, tmp_path, "--source", "diffusers", str(tmp_path / "nothing"))
    assert f"no folder {tmp_path / 'nothing'}" in err
    # a config outside the subset: the field named, before the weights are looked at
    cfg = {**json.loads(str(if_a["unet1_config"])), "class_embed_type": "projection"}
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.json").write_text(json.dumps(cfg))
    assert "config.json field class_embed_type='projection' is not supported" in refused(
        capsys, tmp_path, "--source", "diffusers", str(tmp_path / "badcfg"))
    t5_cfg = {**json.loads(str(if_a["t5_config"])), "feed_forward_proj": "gated-foo"}
    write_folder(tmp_path / "badt5", t5_cfg, state_dict(if_a, "t5"), "model.safetensors")
    assert "T5 config: feed_forward_proj='gated-foo' is not supported" in refused(
        capsys, tmp_path, "--source", "transformers", str(tmp_path / "badt5"))
    # a missing safetensors key, named with its shape
    sd = state_dict(unclip_a, "super_res_first")
    del sd["mid_block.attentions.0.to_k.bias"]
    write_folder(tmp_path / "sr", json.loads(str(unclip_a["super_res_config"])), sd,
                 "diffusion_pytorch_model.safetensors")
    err = refused(capsys, tmp_path, "--source", "diffusers", str(tmp_path / "sr"))
    assert "(1 missing, 0 unexpected, 0 wrongly shaped keys)" in err
    assert "missing key 'mid_block.attentions.0.to_k.bias' (64,)" in err
    sd = {k: v for k, v in state_dict(if_a, "t5").items() if k != "encoder.final_layer_norm.weight"}
    write_folder(tmp_path / "t5", json.loads(str(if_a["t5_config"])), sd, "model.safetensors")
    assert "missing keys: encoder.final_layer_norm.weight" in refused(
        capsys, tmp_path, "--source", "transformers", str(tmp_path / "t5"))
    # no weights: what was looked for and what the folder holds
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(str(if_a["unet1_config"]))
    err = refused(capsys, tmp_path, "--source", "diffusers", str(tmp_path / "empty"))
    assert "no diffusers weights in" in err and "the folder holds ['config.json']" in err
    # a transformers folder given as a diffusers one: its config is refused, naming the field
    assert "config.json field 'transformers_version' is not a UNet2DConditionModel argument" in refused(
        capsys, tmp_path, "--source", "diffusers", str(tmp_path / "t5"))


def test_folder_arguments(tmp_path, capsys):
    for argv, words in [
        (["--source", "diffusers", "--out", "o"], "takes a model FOLDER"),
        (["--source", "transformers", "f", "--npz", "x.npz", "--out", "o"], "no --pt / --npz / --safetensors"),
        (["--source", "diffusers", "f", "--flags", "--x 1", "--out", "o"], "--kind or --flags"),
        (["f", "--out", "o"], "is read with --source diffusers or --source transformers"),
        (["--npz", "x.npz", "--variant", "fp16", "--flags", "--image_size 8", "--out", "o"], "--variant is for"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert words in capsys.readouterr().err, argv
