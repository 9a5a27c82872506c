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
