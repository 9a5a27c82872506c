"""unCLIP's (Karlo's) models besides the U-Nets: transformers' CLIPTextModelWithProjection (models/clip_text.py,
convert/clip_text.py): parity through the folder path (config.json + safetensors
written into tmp_path), and the converters' and configs' errors.

Fixture: tests/fixtures/unclip_tiny_a.npz (copy of /work/shared/fixtures/cascade/, README there): PyTorch 2.13
CPU float32, transformers 5.23.0, diffusers 0.42.1, tiny random configurations with every parameter perturbed.
The text encoder was run as diffusers' UnCLIPPipeline runs it: on the token ids alone (no attention mask), so
the states at padding positions come from attending to the padding; `clip_mask` is what the prior and the
decoder get. One compile per model.
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert.clip_text import (
    POSITION_IDS_KEY,
    clip_text_params_from_state_dict,
    expected_clip_text_shapes,
    load_clip_text_folder,
)
from jaxdiff.models.clip_text import CLIPTextEncoder, clip_text_config_from_json, encode_clip_text, pooled_positions

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "unclip_tiny_a.npz"


@pytest.fixture(scope="module")
def z():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def state_dict(z, prefix):
    return {k[len(prefix) + 1:]: v for k, v in z.items() if k.startswith(prefix + "/")}


def config_of(z, prefix):
    return json.loads(str(z[prefix + "_config"]))


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def write_folder(path, config, sd, weights):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / weights))
    return path


def clip_folder(path, z, sd=None, **changes):
    config = {"architectures": ["CLIPTextModelWithProjection"], **config_of(z, "clip_text"), **changes}
    return write_folder(path, config, state_dict(z, "clip_text") if sd is None else sd, "model.safetensors")


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_out(z, tmp_path_factory):
    """The conditional and unconditional captions in one batch (one compile), without a mask as the pipeline
    runs the encoder, and with the mask (the same compiled function)."""
    module, params, cfg = load_clip_text_folder(clip_folder(tmp_path_factory.mktemp("clip") / "text_encoder", z))
    assert isinstance(module, CLIPTextEncoder) and cfg.with_projection and cfg.pools_at_largest_id
    tokens = np.concatenate([z["clip_tokens"], z["clip_uncond_tokens"]])
    mask = np.concatenate([z["clip_mask"], z["clip_uncond_mask"]])
    return encode_clip_text(module, params, tokens), encode_clip_text(module, params, tokens, mask), mask


def test_clip_text_parity(z, clip_out):
    out, _, _ = clip_out
    assert out.text_embeds.dtype == out.last_hidden_state.dtype == jnp.float32
    assert rel_err(out.text_embeds[:2], z["clip_text_embeds"]) <= 1e-5
    assert rel_err(out.last_hidden_state[:2], z["clip_last_hidden_state"]) <= 1e-5
    assert rel_err(out.text_embeds[2:], z["clip_uncond_text_embeds"]) <= 1e-5
    assert rel_err(out.last_hidden_state[2:], z["clip_uncond_last_hidden_state"]) <= 1e-5


def test_clip_text_mask_hides_only_padding(z, clip_out):
    """The mask changes the states at padding positions only (the attention is causal): the pooled end token
    and every real token are the same with and without it."""
    out, masked, mask = clip_out
    np.testing.assert_allclose(masked.text_embeds, out.text_embeds, rtol=0, atol=1e-6)
    real = np.asarray(masked.last_hidden_state)[mask]
    np.testing.assert_allclose(real, np.asarray(out.last_hidden_state)[mask], rtol=0, atol=1e-6)
    assert np.abs(np.asarray(masked.last_hidden_state)[~mask] - np.asarray(out.last_hidden_state)[~mask]).max() > 1e-2


def test_clip_pooled_position_rule(z):
    """eos_token_id 2 (the fixture's and OpenAI's configs): the position of the largest id; any other
    eos_token_id: its first position (0 when absent, as torch's argmax)."""
    tokens = jnp.asarray([[0, 7, 999, 1, 1], [0, 5, 999, 998, 999], [0, 3, 4, 5, 6]])
    legacy = clip_text_config_from_json(config_of(z, "clip_text"))
    assert pooled_positions(tokens, legacy).tolist() == [2, 2, 4]
    by_id = clip_text_config_from_json({**config_of(z, "clip_text"), "eos_token_id": 999})
    assert not by_id.pools_at_largest_id
    assert pooled_positions(tokens, by_id).tolist() == [2, 2, 0]
    plain = clip_text_config_from_json({**config_of(z, "clip_text"), "architectures": ["CLIPTextModel"]})
    assert not plain.with_projection and "text_projection.weight" not in expected_clip_text_shapes(plain)


@pytest.mark.parametrize("config,words", [
    ({"hidden_act": "tanh"}, ["hidden_act='tanh'", "quick_gelu"]),
    ({"model_type": "clip"}, ["model_type='clip'", "text_config"]),
    ({"architectures": ["CLIPModel"]}, ["architectures", "CLIPTextModelWithProjection"]),
    ({"num_attention_heads": 5}, ["hidden_size=32", "num_attention_heads=5"]),
    ({"rope_theta": 1e4}, ["unsupported field(s) rope_theta", "strict=False"]),
])
def test_clip_config_refused(z, tmp_path, config, words):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config_of(z, "clip_text"), **config}))
    with pytest.raises(ValueError) as e:
        load_clip_text_folder(folder)  # no weights file: the config is refused first
    for w in words + ["config.json"]:
        assert w in str(e.value), (w, str(e.value))


def test_clip_position_ids_buffer(z):
    """The position_ids buffer older transformers saved is accepted when it is 0 .. P - 1, refused otherwise."""
    cfg = clip_text_config_from_json(config_of(z, "clip_text"))
    sd = state_dict(z, "clip_text")
    clip_text_params_from_state_dict({**sd, POSITION_IDS_KEY: np.arange(10)[None]}, cfg)
    with pytest.raises(ValueError, match="position_ids"):
        clip_text_params_from_state_dict({**sd, POSITION_IDS_KEY: np.arange(1, 11)[None]}, cfg)
