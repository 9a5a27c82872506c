"""diffusers' UNet2DModel (unCLIP's super-resolution subset): parity with diffusers 0.42.1 through the folder
path, and the config's and converter's errors.

Fixture: tests/fixtures/unclip_tiny_a.npz (a copy of /work/shared/fixtures/cascade/unclip_tiny_a.npz):
`super_res_config` (the two upsamplers' config.json, as a JSON string), `super_res_first/<key>` and
`super_res_last/<key>` (PyTorch layouts), inputs `super_res_x` [2, 6, 64, 64] (noisy image, then the
upsampled low-resolution image) and `super_res_t`, outputs `super_res_first_out`, `super_res_last_out`.
"""


import _cascade as C
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert.diffusers import (
    load_diffusers_unet,
    unet2d_config,
    unet2d_params_from_state_dict,
)
from jaxdiff.models.unet2d import UNet2DConfig, UNet2DModel


def sr_config(z):
    return C.config_of(z, "super_res_config")


def write_folder(path, config, sd):
    return C.write_diffusers_folder(path, "UNet2DModel", config, sd)


def test_super_res_parity(tmp_path, unclip_a):
    """Both upsamplers (one compile: same config, two parameter sets)."""
    z = unclip_a
    loaded = {p: load_diffusers_unet(write_folder(tmp_path / p, sr_config(z), C.state_dict(z, p)))
              for p in ("super_res_first", "super_res_last")}
    module = loaded["super_res_first"][0]
    assert isinstance(module, UNet2DModel) and loaded["super_res_last"][0] == module
    fn = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))
    x, t = jnp.asarray(np.moveaxis(z["super_res_x"], 1, -1)), jnp.asarray(z["super_res_t"])
    for prefix, (_, params, _) in loaded.items():
        out = np.moveaxis(np.asarray(fn(params, x, t), np.float64), -1, 1)
        ref = z[prefix + "_out"].astype(np.float64)
        assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) <= C.TOL, prefix


def test_round_trip_and_class_guess(unclip_a):
    cfg = sr_config(unclip_a)  # no _class_name: UNet2DModel's own fields make it one
    assert isinstance(unet2d_config(cfg), UNet2DConfig)
    sd = C.state_dict(unclip_a, "super_res_first")
    C.assert_round_trip(sd, cfg)


def test_missing_key(tmp_path, unclip_a):
    sd = C.state_dict(unclip_a, "super_res_first")
    del sd["mid_block.attentions.0.to_k.bias"]
    with pytest.raises(ValueError, match="missing key 'mid_block.attentions.0.to_k.bias' \\(64,\\)"):
        load_diffusers_unet(write_folder(tmp_path / "sr", sr_config(unclip_a), sd))
    # add_attention false: the mid block's attention keys are unexpected
    with pytest.raises(ValueError, match="unexpected key 'mid_block.attentions.0.group_norm.weight'"):
        unet2d_params_from_state_dict(C.state_dict(unclip_a, "super_res_first"),
                                      {**sr_config(unclip_a), "add_attention": False})
