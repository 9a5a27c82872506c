"""diffusers' UNet2DModel (unCLIP's super-resolution subset): parity with diffusers 0.42.1 through the folder
path, and the config's and converter's errors.

Fixture: tests/fixtures/unclip_tiny_a.npz (a copy of /work/shared/fixtures/cascade/unclip_tiny_a.npz):
`super_res_config` (the two upsamplers' config.json, as a JSON string), `super_res_first/<key>` and
`super_res_last/<key>` (PyTorch layouts), inputs `super_res_x` [2, 6, 64, 64] (noisy image, then the
upsampled low-resolution image) and `super_res_t`, outputs `super_res_first_out`, `super_res_last_out`.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert.diffusers import (
    expected_unet2d_shapes,
    load_diffusers_unet,
    unet2d_config,
    unet2d_params_from_state_dict,
    unet2d_state_dict_from_params,
)
from jaxdiff.models.unet2d import UNet2DConfig, UNet2DModel, unet2d_model_config

TOL = 1e-4  # max |ours - reference| / max |reference|


def state_dict(z, prefix):
    return {k[len(prefix) + 1:]: v for k, v in z.items() if k.startswith(prefix + "/")}


def sr_config(z):
    return json.loads(str(z["super_res_config"]))


def write_folder(path, config, sd):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "_diffusers_version": "0.42.1",
                                                  **config}))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "diffusion_pytorch_model.safetensors"))
    return path


def test_super_res_parity(tmp_path, unclip_a):
    """Both upsamplers (one compile: same config, two parameter sets)."""
    z = unclip_a
    loaded = {p: load_diffusers_unet(write_folder(tmp_path / p, sr_config(z), state_dict(z, p)))
              for p in ("super_res_first", "super_res_last")}
    module = loaded["super_res_first"][0]
    assert isinstance(module, UNet2DModel) and loaded["super_res_last"][0] == module
    fn = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))
    x, t = jnp.asarray(np.moveaxis(z["super_res_x"], 1, -1)), jnp.asarray(z["super_res_t"])
    for prefix, (_, params, _) in loaded.items():
        out = np.moveaxis(np.asarray(fn(params, x, t), np.float64), -1, 1)
        ref = z[prefix + "_out"].astype(np.float64)
        assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) <= TOL, prefix


def test_round_trip_and_class_guess(unclip_a):
    cfg = sr_config(unclip_a)  # no _class_name: UNet2DModel's own fields make it one
    assert isinstance(unet2d_config(cfg), UNet2DConfig)
    sd = state_dict(unclip_a, "super_res_first")
    assert expected_unet2d_shapes(cfg) == {k: v.shape for k, v in sd.items()}
    back = unet2d_state_dict_from_params(unet2d_params_from_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize("field,value,words", [
    ("down_block_types", ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
     ["down_block_types", "'AttnDownBlock2D' is not in the subset", "ResnetDownsampleBlock2D"]),
    ("up_block_types", ["UpBlock2D", "ResnetUpsampleBlock2D"], ["up_block_types", "ResnetUpsampleBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DCrossAttn", ["mid_block_type", "'UNetMidBlock2D'"]),
    ("time_embedding_type", "fourier", ["time_embedding_type", "'positional'"]),
    ("num_class_embeds", 10, ["num_class_embeds", "None"]),
    ("class_embed_type", "projection", ["class_embed_type", "'timestep'"]),
    ("resnet_time_scale_shift", "spatial", ["resnet_time_scale_shift", "'scale_shift'"]),
    ("norm_num_groups", 24, ["norm_num_groups=24", "does not divide"]),
    ("layers_per_block", [1, 1], ["layers_per_block", "a positive integer"]),
    ("cross_attention_dim", 32, ["'cross_attention_dim' is not a UNet2DModel argument"]),
])
def test_config_outside_subset(unclip_a, field, value, words):
    with pytest.raises(ValueError) as e:
        unet2d_model_config({**sr_config(unclip_a), field: value})
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_key(tmp_path, unclip_a):
    sd = state_dict(unclip_a, "super_res_first")
    del sd["mid_block.attentions.0.to_k.bias"]
    with pytest.raises(ValueError, match="missing key 'mid_block.attentions.0.to_k.bias' \\(64,\\)"):
        load_diffusers_unet(write_folder(tmp_path / "sr", sr_config(unclip_a), sd))
    # add_attention false: the mid block's attention keys are unexpected
    with pytest.raises(ValueError, match="unexpected key 'mid_block.attentions.0.group_norm.weight'"):
        unet2d_params_from_state_dict(state_dict(unclip_a, "super_res_first"),
                                      {**sr_config(unclip_a), "add_attention": False})
