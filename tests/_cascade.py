"""Helpers for the cascade fixtures (conftest.py's `if_a` and `unclip_a`: diffusers' DeepFloyd IF and unCLIP
pipelines on tiny random configurations, PyTorch layouts) and the model folders tests write from them."""

import json

import numpy as np

TOL = 1e-4  # max |ours - reference| / max |reference|


def state_dict(z, prefix):
    """The state_dict stored under `prefix/` in a fixture."""
    return {k[len(prefix) + 1:]: v for k, v in z.items() if k.startswith(prefix + "/")}


def config_of(z, key):
    """A config.json stored as a JSON string under `key` (e.g. "unet1_config")."""
    return json.loads(str(z[key]))


def write_diffusers_folder(path, class_name, config, sd):
    """A diffusers model folder: config.json + diffusion_pytorch_model.safetensors."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1",
                                                  **config}))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "diffusion_pytorch_model.safetensors"))
    return path


def assert_round_trip(sd, cfg):
    """A diffusers state_dict has the shapes the converter expects, and state_dict -> params -> state_dict
    gives it back, key for key."""
    from jaxdiff.convert import diffusers

    assert diffusers.expected_unet2d_shapes(cfg) == {k: v.shape for k, v in sd.items()}
    back = diffusers.unet2d_state_dict_from_params(diffusers.unet2d_params_from_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def assert_refused(check, config, words):
    """check(config) raises ValueError whose message holds every one of `words`."""
    import pytest

    with pytest.raises(ValueError) as e:
        check(config)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


KARLO_PARTS = {  # subfolder: (fixture prefix, diffusers class, config key)
    "prior": ("prior", "PriorTransformer", "prior_config"),
    "text_proj": ("text_proj", "UnCLIPTextProjModel", "text_proj_config"),
    "decoder": ("decoder", "UNet2DConditionModel", "decoder_config"),
    "super_res_first": ("super_res_first", "UNet2DModel", "super_res_config"),
    "super_res_last": ("super_res_last", "UNet2DModel", "super_res_config"),
}
TINY_WORDS = ("a", "red", "cube", "the", "dark", "sky", "photo", "of", "cat")


def write_clip_text_folder(path, z, **changes):
    """The fixture's CLIPTextModelWithProjection as a transformers folder (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["CLIPTextModelWithProjection"], **config_of(z, "clip_text_config"), **changes}
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict(z, "clip_text").items()},
              str(path / "model.safetensors"))
    return path


def write_clip_tokenizer(path, words=TINY_WORDS):
    """A tiny CLIP BPE tokenizer folder (merges.txt with its #version header, vocab.json): byte symbols, the
    merges spelling `words`, the two special tokens; ids < 600 (the fixture's CLIP has 1000)."""
    from jaxdiff.data.tokenizers import ClipTokenizer

    merges = []
    for w in words:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        while len(syms) > 1:
            pair = (syms[0], syms[1])
            if pair not in merges:
                merges.append(pair)
            syms = ["".join(pair)] + syms[2:]
    path.mkdir(parents=True, exist_ok=True)
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = ClipTokenizer(merges)
    (path / "vocab.json").write_text(json.dumps(tok.encoder))
    return path


def write_karlo_folder(root, z):
    """The fixture's unCLIP models as a Karlo pipeline folder: prior/, text_proj/, decoder/, super_res_first/,
    super_res_last/ (diffusers folders), text_encoder/ (transformers), tokenizer/ (a tiny CLIP BPE)."""
    for sub, (prefix, cls, key) in KARLO_PARTS.items():
        write_diffusers_folder(root / sub, cls, config_of(z, key), state_dict(z, prefix))
    write_clip_text_folder(root / "text_encoder", z)
    write_clip_tokenizer(root / "tokenizer")
    return root


def launch(cmd: list, env: dict, log):
    """Start `cmd` with its output in the file `log`: (process, log) for `finish`."""
    import subprocess

    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), log


def finish(proc, timeout: float):
    """(exit status, log text) of a `launch`ed process, killed if it outlives `timeout` seconds."""
    p, log = proc
    try:
        p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, log.read_text()


def assert_all_exited_ok(logs: dict, names) -> None:
    """Each of `names` (keys of `logs`: name -> (exit status, log text) from `finish`) exited with status 0."""
    for name in names:
        rc, log = logs[name]
        assert rc == 0, f"{name}: exit {rc}\n{log[-4000:]}"


def changed_copy(src, dst, **changes):
    """A copy of model folder `src` at `dst` whose config.json has `changes`."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def load_samples(path):
    """(images, captions) of a samples.npz / embeddings.npz the pipelines write."""
    with np.load(path) as z:
        return z["arr_0"], z["captions"]
