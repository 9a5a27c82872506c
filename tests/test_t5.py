"""The T5 v1.1 encoder (jaxdiff.models.t5), its transformers converter (jaxdiff.convert.transformers) and
IF's T5 tokenization (jaxdiff.data.t5_tokenizer), against tests/fixtures/if_tiny_a.npz (transformers'
T5EncoderModel: t5_config, t5/<key>, t5_tokens, t5_mask, t5_out; see /work/shared/fixtures/cascade/README.md)."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff.convert import transformers as ct
from jaxdiff.data.t5_tokenizer import IF_MAX_LENGTH, T5Tokenizer
from jaxdiff.models import t5

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "if_tiny_a.npz"


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as z:
        out = {k: z[k] for k in z.files if k.startswith("t5")}
    out["config"] = json.loads(str(out.pop("t5_config")))
    out["sd"] = {k[3:]: out.pop(k) for k in list(out) if k.startswith("t5/")}
    return out


@pytest.fixture(scope="module")
def model(ref):
    config = t5.t5_config_from_json(ref["config"])
    return t5.T5Encoder(config), ct.t5_params_from_state_dict(ref["sd"], config), config


def _rel_err(out, want) -> float:
    return float(np.abs(np.asarray(out) - want).max() / np.abs(want).max())


def _write_folder(path, config: dict, sd: dict, sharded: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if not sharded:
        safetensors.numpy.save_file(sd, str(path / "model.safetensors"))
        return path
    keys = sorted(sd)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in parts.items():
        safetensors.numpy.save_file({k: sd[k] for k in ks}, str(path / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


# --- parity ---------------------------------------------------------------------------------------------


def test_config_from_transformers_json(ref, model):
    config = model[2]
    assert (config.d_model, config.d_kv, config.d_ff, config.num_layers, config.num_heads) == (32, 8, 48, 2, 4)
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (8, 16)
    # "gated-gelu" is run with the tanh approximation, as transformers does
    assert (config.dense_act_fn, config.is_gated_act) == ("gelu_new", True)
    derived = {k: v for k, v in ref["config"].items() if k not in ("dense_act_fn", "is_gated_act")}
    assert t5.t5_config_from_json(derived) == config
    # transformers' attribute_map aliases
    alias = {k: v for k, v in ref["config"].items() if k not in ("d_model", "num_heads")}
    assert t5.t5_config_from_json({**alias, "hidden_size": 32, "num_attention_heads": 4}) == config
    relu = t5.t5_config_from_json({**alias, "hidden_size": 32, "num_attention_heads": 4, "feed_forward_proj": "relu",
                                   "dense_act_fn": "relu", "is_gated_act": False})
    assert (relu.dense_act_fn, relu.is_gated_act) == ("relu", False)


def test_state_dict_parity(ref, model):
    module, params, _ = model
    out = t5.encode(module, params, ref["t5_tokens"], ref["t5_mask"])
    assert out.shape == (4, 12, 32) and out.dtype == jnp.float32
    assert _rel_err(out, ref["t5_out"]) <= 1e-5
    # params are a plain tree named after the state_dict keys
    assert params["block_0"]["layer_0"]["SelfAttention"]["relative_attention_bias"]["embedding"].shape == (8, 4)
    assert "relative_attention_bias" not in params["block_1"]["layer_0"]["SelfAttention"]
    np.testing.assert_array_equal(params["block_1"]["layer_1"]["DenseReluDense"]["wo"]["kernel"],
                                  ref["sd"]["encoder.block.1.layer.1.DenseReluDense.wo.weight"].T)


def test_folder_parity(ref, model, tmp_path):
    folder = _write_folder(tmp_path / "text_encoder", ref["config"], ref["sd"])
    module, params, config = ct.load_t5_folder(folder)
    assert config == model[2]
    assert _rel_err(t5.encode(module, params, ref["t5_tokens"], ref["t5_mask"]), ref["t5_out"]) <= 1e-5
    # sharded safetensors with only one of the tied embedding keys: the same params
    sd = {k: v for k, v in ref["sd"].items() if k != "shared.weight"}
    _, sharded, _ = ct.load_t5_folder(_write_folder(tmp_path / "sharded", ref["config"], sd, sharded=True))
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, params)


def test_bfloat16(ref, tmp_path):
    folder = _write_folder(tmp_path / "te", ref["config"], ref["sd"])
    module, params, _ = ct.load_t5_folder(folder, dtype="bfloat16")
    assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert (module.dtype, module.param_dtype) == (jnp.bfloat16, jnp.bfloat16)
    out = t5.encode(module, params, ref["t5_tokens"], ref["t5_mask"])
    assert out.dtype == jnp.float32
    assert _rel_err(out, ref["t5_out"]) <= 3e-2
    # init in bfloat16 gives the same tree as the converter
    init = t5.abstract_t5_params(module)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), init) == jax.tree_util.tree_map(
        lambda a: (a.shape, a.dtype), params)


def test_padding_mask(ref, model):
    module, params, _ = model
    tokens, mask = ref["t5_tokens"].copy(), ref["t5_mask"]
    base = np.asarray(t5.encode(module, params, tokens, mask))
    tokens[~mask] = 57  # other ids where the mask is False: the real tokens' states do not move
    changed = np.asarray(t5.encode(module, params, tokens, mask))
    np.testing.assert_allclose(changed[mask], base[mask], rtol=0, atol=1e-6)
    # without the mask the padding is attended to
    unmasked = np.asarray(t5.encode(module, params, ref["t5_tokens"], np.ones_like(mask)))
    assert np.abs(unmasked[mask] - base[mask]).max() > 1e-2


def test_relative_position_buckets():
    # transformers' T5Attention._relative_position_bucket(key - query, bidirectional=True, 32, 128)
    # (IF's T5-v1.1-XXL) on offsets -130..130, as runs (first offset, bucket); offsets 16, 32 and 64 lie on
    # bucket edges in exact arithmetic.
    runs = [(-130, 15), (-90, 14), (-63, 13), (-45, 12), (-31, 11), (-22, 10), (-15, 9), (-11, 8), (-7, 7), (-6, 6),
            (-5, 5), (-4, 4), (-3, 3), (-2, 2), (-1, 1), (0, 0), (1, 17), (2, 18), (3, 19), (4, 20), (5, 21), (6, 22),
            (7, 23), (8, 24), (12, 25), (16, 26), (23, 27), (32, 28), (46, 29), (64, 30), (91, 31)]
    want = np.zeros(261, np.int32)
    for (start, bucket), (end, _) in zip(runs, runs[1:] + [(131, None)]):
        want[start + 130:end + 130] = bucket
    got = t5.relative_position_buckets(131, 261, 32, 128)[130]  # query 130: keys at offsets -130..130
    np.testing.assert_array_equal(got, want)


# --- bad inputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, named", [
    ({"feed_forward_proj": "gated-foo", "dense_act_fn": "foo"}, "feed_forward_proj='gated-foo'"),
    ({"dense_act_fn": "mish"}, "dense_act_fn='mish'"),
    ({"is_decoder": True}, "is_decoder=True"),
    ({"model_type": "umt5"}, "model_type='umt5'"),
    ({"rotary_dim": 16}, "rotary_dim"),
    ({"d_model": 0}, "d_model=0"),
    ({"relative_attention_max_distance": 2}, "relative_attention_max_distance=2"),
    ({"num_heads": 4, "num_attention_heads": 8}, "num_attention_heads=8"),
])
def test_bad_config(ref, change, named):
    with pytest.raises(ValueError, match="T5 config: .*" + named.replace("(", r"\(")) as e:
        t5.t5_config_from_json({**ref["config"], **change})
    assert "\n" not in str(e.value)


def test_unknown_config_field_ignored_when_not_strict(ref, model):
    assert t5.t5_config_from_json({**ref["config"], "rotary_dim": 16}, strict=False) == model[2]


def test_bad_state_dict(ref, model):
    config = model[2]
    sd = ref["sd"]
    q = "encoder.block.1.layer.0.SelfAttention.q.weight"
    with pytest.raises(ValueError, match=f"missing keys: {q}$"):
        ct.t5_params_from_state_dict({k: v for k, v in sd.items() if k != q}, config)
    with pytest.raises(ValueError, match=r"missing keys: shared\.weight or encoder\.embed_tokens\.weight"):
        ct.t5_params_from_state_dict({k: v for k, v in sd.items() if "embed" not in k and "shared" not in k}, config)
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.block\.2\.layer\.0\.layer_norm\.weight"):
        ct.t5_params_from_state_dict({**sd, "encoder.block.2.layer.0.layer_norm.weight": np.ones(32, np.float32)},
                                     config)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    with pytest.raises(ValueError, match=rf"wrong shapes: {wo}: \(48, 32\), expected \(32, 48\)"):
        ct.t5_params_from_state_dict({**sd, wo: sd[wo].T}, config)
    with pytest.raises(ValueError, match="shared.weight and encoder.embed_tokens.weight differ"):
        ct.t5_params_from_state_dict({**sd, "shared.weight": sd["shared.weight"] + 1}, config)
    with pytest.raises(ValueError, match=rf"{q} has dtype int32"):
        ct.t5_params_from_state_dict({**sd, q: sd[q].astype(np.int32)}, config)
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        ct.t5_params_from_state_dict(sd, config, "float16")
    # a full T5 checkpoint: the decoder is refused unless asked for
    full = {**sd, "decoder.final_layer_norm.weight": np.ones(32, np.float32), "lm_head.weight": sd["shared.weight"]}
    with pytest.raises(ValueError, match="unexpected keys: decoder.final_layer_norm.weight, lm_head.weight "
                                         r"\(a full encoder-decoder checkpoint: allow_decoder=True"):
        ct.t5_params_from_state_dict(full, config)
    kept = ct.t5_params_from_state_dict(full, config, allow_decoder=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, kept, model[1])


def test_bad_folder(ref, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        ct.load_t5_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ref["config"]))
    with pytest.raises(FileNotFoundError, match=r"no T5 weights in .*model\.safetensors.*holds \['config.json'\]"):
        ct.load_t5_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        ct.load_t5_folder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match=r"pytorch_model\.bin needs PyTorch.*convert the weights to safetensors"):
        ct.load_t5_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**ref["config"], "feed_forward_proj": "gated-foo"}))
    with pytest.raises(ValueError, match=r"config\.json: T5 config: feed_forward_proj='gated-foo'"):
        ct.load_t5_folder(tmp_path)  # the config is refused before the weights are looked at
    sd = {k: v for k, v in ref["sd"].items() if k != "encoder.final_layer_norm.weight"}
    with pytest.raises(ValueError, match=r"missing keys: encoder\.final_layer_norm\.weight"):
        ct.load_t5_folder(_write_folder(tmp_path / "b", ref["config"], sd))


def test_bad_tokens(ref, model):
    module, params, _ = model
    tokens = ref["t5_tokens"].copy()
    tokens[1, 3] = 100
    with pytest.raises(ValueError, match=r"id 100 is outside the vocabulary \[0, 100\)"):
        t5.encode(module, params, tokens, ref["t5_mask"])
    with pytest.raises(ValueError, match="T5 mask: shape"):
        t5.encode(module, params, ref["t5_tokens"], ref["t5_mask"][:, :5])


# --- tokenizer ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A small sentencepiece unigram model with T5's special ids (pad 0, end 1, unk 2, no start)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    rng = np.random.default_rng(0)
    words = ["a", "an", "the", "red", "blue", "green", "cube", "sphere", "photo", "of", "cat", "dog", "on", "table",
             "under", "sky", "bright", "dark", "small", "large", "painting", "oil", "watercolor", "city", "night",
             "river", "mountain", "tree", "flower"]
    lines = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(300)]
    (d / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=120,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    return d / "spiece.model"


def test_tokenizer_if_conventions(spiece):
    tok = T5Tokenizer(spiece.parent)  # the folder holding spiece.model
    assert (tok.pad_id, tok.end_id) == (0, 1)
    ids = tok.encode("a red cube on the table")
    assert ids and all(i > 2 for i in ids)
    long = " ".join(["small red cube under a dark sky"] * 20)
    assert len(tok.encode(long)) > IF_MAX_LENGTH
    tokens, mask = tok.tokens_and_mask(["a red cube on the table", "", "  A Red CUBE on the TABLE ", long])
    assert tokens.shape == mask.shape == (4, 77) and tokens.dtype == np.int32 and mask.dtype == bool
    n = len(ids)
    np.testing.assert_array_equal(tokens[0], ids + [1] + [0] * (76 - n))  # ids, the end token, padding
    np.testing.assert_array_equal(mask[0], [True] * (n + 1) + [False] * (76 - n))
    np.testing.assert_array_equal(tokens[1], [1] + [0] * 76)  # the empty caption (IF's negative prompt)
    np.testing.assert_array_equal(mask[1], [True] + [False] * 76)
    np.testing.assert_array_equal(tokens[2], tokens[0])  # lowercased and stripped, as IF does
    np.testing.assert_array_equal(tokens[3], tok.encode(long)[:76] + [1])  # truncation keeps room for the end
    assert mask[3].all()
    raw, _ = tok.tokens_and_mask(["A Red"], lower=False, max_length=8)
    np.testing.assert_array_equal(raw[0, :len(tok.encode("A Red")) + 1], tok.encode("A Red") + [1])
    assert tok.tokens_and_mask([])[0].shape == (0, 77)


def test_tokenizer_bad_inputs(spiece, tmp_path):
    text = tmp_path / "vocab.txt"
    text.write_text("hello 1\nworld 2\n")
    with pytest.raises(ValueError, match=f"T5 tokenizer: {text} is not a sentencepiece model"):
        T5Tokenizer(text)
    js = tmp_path / "tokenizer.json"
    js.write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match=r"is not a sentencepiece model \(it looks like JSON"):
        T5Tokenizer(js)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T5Tokenizer(tmp_path / "nothing.model")
    with pytest.raises(FileNotFoundError, match="no spiece.model in"):
        T5Tokenizer(tmp_path)
    tok = T5Tokenizer(spiece)
    with pytest.raises(TypeError, match="got one string"):
        tok.tokens_and_mask("a red cube")
    with pytest.raises(ValueError, match="max_length=0 is not allowed"):
        tok.tokens_and_mask(["a"], max_length=0)
