"""Helpers for the guided-diffusion fixture adm_tiny_a.npz (see tests/fixtures/README)."""

import jax.numpy as jnp
import numpy as np

UNET_FLAGS = dict(image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=2,
                  attention_resolutions=(2, 4), dropout=0.0, channel_mult=(1, 2, 2), num_classes=10,
                  num_heads=1, num_head_channels=16, num_heads_upsample=-1, use_scale_shift_norm=True,
                  resblock_updown=True, use_new_attention_order=False)
CLASSIFIER_FLAGS = dict(image_size=32, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
                        attention_resolutions=(2, 4), channel_mult=(1, 2, 2), num_head_channels=16,
                        use_scale_shift_norm=True, resblock_updown=True, pool="attention")


def state_dict(adm, prefix):
    return {k[len(prefix) + 1:]: v for k, v in adm.items() if k.startswith(prefix + "/")}


def nhwc(a):
    """NCHW (or [S, B, C, H, W]) numpy -> channels-last jnp."""
    a = np.asarray(a)
    return jnp.asarray(np.moveaxis(a, -3, -1))


def nchw(a):
    return np.moveaxis(np.asarray(a), -1, -3)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))
