"""unCLIP's (Karlo's) models besides the U-Nets: transformers' CLIPTextModelWithProjection (models/clip_text.py,
convert/clip_text.py), diffusers' PriorTransformer and UnCLIPTextProjModel (models/prior.py,
models/unclip_text_proj.py, convert/unclip.py): parity through the folder path (config.json + safetensors
written into tmp_path), and the converters' and configs' errors.

Fixture: tests/fixtures/unclip_tiny_a.npz (copy of /work/shared/fixtures/cascade/, README there): PyTorch 2.13
CPU float32, transformers 5.23.0, diffusers 0.42.1, tiny random configurations with every parameter perturbed.
The text encoder was run as diffusers' UnCLIPPipeline runs it: on the token ids alone (no attention mask), so
the states at padding positions come from attending to the padding; `clip_mask` is what the prior and the
decoder get. One compile per model.
"""

import json

import _cascade as C
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert.clip_text import (
    POSITION_IDS_KEY,
    clip_text_params_from_state_dict,
    clip_text_state_dict_from_params,
    expected_clip_text_shapes,
    load_clip_text_folder,
)
from jaxdiff.convert.unclip import (
    expected_prior_shapes,
    load_prior_folder,
    load_text_proj_folder,
    prior_params_from_state_dict,
    prior_state_dict_from_params,
    text_proj_params_from_state_dict,
    text_proj_state_dict_from_params,
)
from jaxdiff.models.clip_text import CLIPTextEncoder, clip_text_config_from_json, encode_clip_text, pooled_positions
from jaxdiff.models.prior import PriorTransformer, post_process_latents, prior_config
from jaxdiff.models.unclip_text_proj import (
    UnCLIPTextProjModel,
    decoder_attention_mask,
    null_image_embedding,
    text_proj_config,
)


@pytest.fixture(scope="module")
def z(unclip_a):
    return unclip_a


def state_dict(z, prefix):
    return C.state_dict(z, prefix)


def config_of(z, prefix):
    return C.config_of(z, prefix + "_config")


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


def diffusers_folder(path, z, prefix, cls, sd=None, **changes):
    config = {"_class_name": cls, "_diffusers_version": "0.42.1", **config_of(z, prefix), **changes}
    return write_folder(path, config, state_dict(z, prefix) if sd is None else sd,
                        "diffusion_pytorch_model.safetensors")


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


def test_prior_parity(tmp_path, z):
    assert not z["clip_mask"].all()  # the mask matters
    module, params, cfg = load_prior_folder(diffusers_folder(tmp_path / "prior", z, "prior", "PriorTransformer"))
    assert isinstance(module, PriorTransformer) and cfg.prd
    out = jax.jit(module.apply)({"params": params}, z["prior_x"], z["prior_t"], z["clip_text_embeds"],
                                z["clip_last_hidden_state"], z["clip_mask"])
    assert out.dtype == jnp.float32
    assert rel_err(out, z["prior_out"]) <= 1e-4
    assert rel_err(post_process_latents(params, out), z["prior_post_processed"]) <= 1e-4


def test_text_proj_parity_and_cfg(tmp_path, z):
    module, params, cfg = load_text_proj_folder(
        diffusers_folder(tmp_path / "text_proj", z, "text_proj", "UnCLIPTextProjModel"))
    assert isinstance(module, UnCLIPTextProjModel)
    apply = jax.jit(module.apply, static_argnums=4)
    args = (z["text_proj_image_embeddings"], z["clip_text_embeds"], z["clip_last_hidden_state"])
    hidden, time = apply({"params": params}, *args, False)
    assert rel_err(hidden, z["text_proj_hidden_states"]) <= 1e-5
    assert rel_err(time, z["text_proj_time_embeddings"]) <= 1e-5
    # the decoder's mask: True over the extra tokens, then the caption's
    np.testing.assert_array_equal(decoder_attention_mask(z["clip_mask"], cfg.clip_extra_context_tokens),
                                  z["decoder_attention_mask"])
    # CFG: the learned null image embedding goes with the first (unconditional) half
    null = null_image_embedding(params)
    np.testing.assert_array_equal(null, z["text_proj/learned_classifier_free_guidance_embeddings"])
    text2 = np.concatenate([z["clip_text_embeds"]] * 2)
    states2 = np.concatenate([z["clip_last_hidden_state"]] * 2)
    h_cfg, t_cfg = apply({"params": params}, args[0], text2, states2, True)
    h_null, t_null = apply({"params": params}, np.broadcast_to(null, args[0].shape), *args[1:], False)
    np.testing.assert_allclose(h_cfg, np.concatenate([h_null, hidden]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(t_cfg, np.concatenate([t_null, time]), rtol=0, atol=1e-6)


def test_state_dict_round_trips(z):
    """The inverse mappings give back each state_dict key for key (no compile: shapes by eval_shape)."""
    cases = [("clip_text", clip_text_config_from_json(config_of(z, "clip_text")), clip_text_params_from_state_dict,
              clip_text_state_dict_from_params),
             ("prior", prior_config(config_of(z, "prior")), prior_params_from_state_dict, prior_state_dict_from_params),
             ("text_proj", text_proj_config(config_of(z, "text_proj")), text_proj_params_from_state_dict,
              text_proj_state_dict_from_params)]
    for prefix, cfg, to_params, to_sd in cases:
        sd = state_dict(z, prefix)
        back = to_sd(to_params(sd, cfg), cfg)
        assert back.keys() == sd.keys(), prefix
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k], err_msg=f"{prefix}/{k}")


# ------------------------------------------------------------------------------------------------
# Errors: configs outside the subset name the field; state_dicts list every problem key
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,words", [
    ("encoder_hid_proj_type", None, ["encoder_hid_proj_type=None", "'linear'"]),
    ("norm_in_type", "batch", ["norm_in_type='batch'", "'layer'"]),
    ("added_emb_type", "sum", ["added_emb_type='sum'", "'prd'"]),
    ("additional_embeddings", 5, ["additional_embeddings=5", "allowed: 4"]),
    ("time_embed_act_fn", "tanh", ["time_embed_act_fn='tanh'", "'silu'"]),
    ("num_layerz", 2, ["'num_layerz'", "did you mean 'num_layers'"]),
    ("_class_name", "UnCLIPTextProjModel", ["_class_name", "PriorTransformer"]),
])
def test_prior_config_refused(z, field, value, words):
    with pytest.raises(ValueError) as e:
        prior_config({**config_of(z, "prior"), field: value})
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_prior_supported_options_change_the_layout(z):
    """norm_in_type / embedding_proj_norm_type "layer", no prd token and explicit widths build their layers."""
    cfg = {**config_of(z, "prior"), "norm_in_type": "layer", "embedding_proj_norm_type": "layer",
           "added_emb_type": None, "additional_embeddings": 3, "embedding_proj_dim": 16, "clip_embed_dim": 8,
           "time_embed_dim": 40}
    shapes = expected_prior_shapes(cfg)
    assert shapes["norm_in.weight"] == (24,) and shapes["embedding_proj_norm.weight"] == (16,)
    assert "prd_embedding" not in shapes and shapes["positional_embedding"] == (1, 13, 24)
    assert shapes["time_embedding.linear_1.weight"] == (40, 24) and shapes["clip_mean"] == (1, 8)


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


@pytest.mark.parametrize("field,value,words", [
    ("time_embed_dim", None, ["time_embed_dim=None", "required"]),
    ("cross_attention_dim", 0, ["cross_attention_dim=0", "a positive integer"]),
    ("clip_extra_context_token", 4, ["'clip_extra_context_token'", "did you mean 'clip_extra_context_tokens'"]),
])
def test_text_proj_config_refused(z, tmp_path, field, value, words):
    folder = tmp_path / "text_proj"
    folder.mkdir()
    cfg = {**config_of(z, "text_proj"), field: value}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_text_proj_folder(folder)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_unexpected_and_misshaped_keys(z, tmp_path):
    """Each loader lists every problem key in one ValueError, before converting anything."""
    sd = state_dict(z, "prior")
    del sd["transformer_blocks.0.attn1.to_k.bias"]
    sd["transformer_blocks.1.norm1.weight"] = np.ones(24, np.float32)
    sd["clip_std"] = np.ones((32,), np.float32)
    with pytest.raises(ValueError) as e:
        load_prior_folder(diffusers_folder(tmp_path / "prior", z, "prior", "PriorTransformer", sd=sd))
    msg = str(e.value)
    assert "1 missing, 1 unexpected, 1 wrongly shaped" in msg
    for w in ["missing key 'transformer_blocks.0.attn1.to_k.bias'", "unexpected key 'transformer_blocks.1.norm1",
              "key 'clip_std' has shape (32,), the model needs (1, 32)"]:
        assert w in msg, (w, msg)

    sd = state_dict(z, "text_proj")
    del sd["learned_classifier_free_guidance_embeddings"]
    with pytest.raises(ValueError, match="missing key 'learned_classifier_free_guidance_embeddings'"):
        load_text_proj_folder(diffusers_folder(tmp_path / "tp", z, "text_proj", "UnCLIPTextProjModel", sd=sd))

    sd = state_dict(z, "clip_text")
    del sd["text_projection.weight"]
    with pytest.raises(ValueError) as e:
        load_clip_text_folder(clip_folder(tmp_path / "clip", z, sd=sd))
    assert "missing key 'text_projection.weight'" in str(e.value) and "CLIPTextModel's weights?" in str(e.value)


def test_clip_position_ids_buffer(z):
    """The position_ids buffer older transformers saved is accepted when it is 0 .. P - 1, refused otherwise."""
    cfg = clip_text_config_from_json(config_of(z, "clip_text"))
    sd = state_dict(z, "clip_text")
    clip_text_params_from_state_dict({**sd, POSITION_IDS_KEY: np.arange(10)[None]}, cfg)
    with pytest.raises(ValueError, match="position_ids"):
        clip_text_params_from_state_dict({**sd, POSITION_IDS_KEY: np.arange(1, 11)[None]}, cfg)


def test_bad_inputs(z):
    cfg = clip_text_config_from_json(config_of(z, "clip_text"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        encode_clip_text(CLIPTextEncoder(cfg), {}, np.array([[0, 1000]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encode_clip_text(CLIPTextEncoder(cfg), {}, np.zeros((1, 11), int))
    prior = PriorTransformer(prior_config(config_of(z, "prior")))
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        jax.eval_shape(lambda: prior.init(jax.random.key(0), z["prior_x"], z["prior_t"], z["clip_text_embeds"],
                                          z["clip_last_hidden_state"][:, :9]))


def test_bfloat16_compute(z, tmp_path):
    """bfloat16 projections and attention products (float32 parameters, norms, softmax, residual stream and
    outputs) stay close to the float32 reference."""
    module, params, _ = load_clip_text_folder(clip_folder(tmp_path / "clip", z), dtype="bfloat16")
    out = encode_clip_text(module, params, z["clip_tokens"])
    assert out.text_embeds.dtype == jnp.float32
    assert rel_err(out.text_embeds, z["clip_text_embeds"]) <= 2e-2
    assert rel_err(out.last_hidden_state, z["clip_last_hidden_state"]) <= 2e-2
    module, params, _ = load_prior_folder(diffusers_folder(tmp_path / "prior", z, "prior", "PriorTransformer"),
                                          dtype="bfloat16")
    out = jax.jit(module.apply)({"params": params}, z["prior_x"], z["prior_t"], z["clip_text_embeds"],
                                z["clip_last_hidden_state"], z["clip_mask"])
    assert out.dtype == jnp.float32
    assert rel_err(out, z["prior_out"]) <= 2e-2
