"""Tokenizers on tiny synthetic vocabularies built here (no real vocabulary is committed)."""

import gzip
import json

import numpy as np
import pytest

from jaxdiff.data.tokenizers import ClipTokenizer, GPT2Tokenizer, WordTokenizer, _gpt2_pieces, bytes_to_unicode

BYTES = list(bytes_to_unicode().values())
GPT2_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "hello"), ("o", "r"), ("Ġ", "w"),
               ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld")]
CLIP_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>"), ("w", "o"), ("wo", "r"), ("l", "d</w>"),
               ("wor", "ld</w>")]


def gpt2_encoder(merges):
    return {s: i for i, s in enumerate(BYTES + ["".join(m) for m in merges] + ["<|endoftext|>"])}


@pytest.fixture(scope="module")
def glide_dir(tmp_path_factory):
    """A fake glide checkout: gzipped encoder.json and CLIP merges, a plain vocab.bpe."""
    root = tmp_path_factory.mktemp("glide")
    d = root / "glide_text2im" / "tokenizer"
    d.mkdir(parents=True)
    with gzip.open(d / "encoder.json.gz", "wt") as f:
        json.dump(gpt2_encoder(GPT2_MERGES), f)
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in GPT2_MERGES))
    with gzip.open(d / "bpe_simple_vocab_16e6.txt.gz", "wt") as f:
        f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES))
    return root


def symbols(tok, ids):
    return [tok.decoder[i] for i in ids]


def test_bytes_to_unicode():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table["é".encode()[0]] == "Ã"
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == chr(256)


def test_gpt2_pre_tokenizer():
    assert _gpt2_pieces("it's  a test\n") == ["it", "'s", " ", " a", " test", "\n"]
    assert _gpt2_pieces("x 123!! ü\t'd") == ["x", " 123", "!!", " ü", "\t", "'d"]
    assert _gpt2_pieces("a  ") == ["a", "  "]


def test_gpt2_merges_lowercase_bytes(glide_dir):
    tok = GPT2Tokenizer.from_glide(glide_dir)
    assert tok.n_vocab == 256 + len(GPT2_MERGES) + 1 and tok.end_token == tok.n_vocab - 1
    assert symbols(tok, tok.encode("Hello WORLD hello")) == ["hello", "Ġworld", "Ġhello"]
    assert symbols(tok, tok.encode("é\n")) == ["Ã", "©", "Ċ"]
    assert tok.decode(tok.encode("hello é world")) == "hello é world"
    # the merge with the lower rank wins; occurrences are merged left to right
    a = GPT2Tokenizer(gpt2_encoder([("l", "l"), ("e", "l")]), [("l", "l"), ("e", "l")])
    b = GPT2Tokenizer(gpt2_encoder([("e", "l"), ("l", "l")]), [("e", "l"), ("l", "l")])
    assert symbols(a, a.encode("ell")) == ["e", "ll"] and symbols(b, b.encode("ell")) == ["el", "l"]
    assert symbols(a, a.encode("llll l")) == ["ll", "ll", "Ġ", "l"]
    c = GPT2Tokenizer(gpt2_encoder([("a", "a")]), [("a", "a")])
    assert symbols(c, c.encode("aaa")) == ["aa", "a"]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        GPT2Tokenizer({"a": 0}, []).encode("b")


def test_gpt2_truncation_and_padding(glide_dir):
    tok = GPT2Tokenizer.from_glide(glide_dir / "glide_text2im" / "tokenizer")
    tokens, mask = tok.tokens_and_mask(["hello world", "", "hello hello hello hello"], text_ctx=3)
    end = tok.end_token
    hello, world, shello = (tok.encoder[s] for s in ("hello", "Ġworld", "Ġhello"))
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape == (3, 3)
    np.testing.assert_array_equal(tokens, [[hello, world, end], [end, end, end], [hello, shello, shello]])
    np.testing.assert_array_equal(mask, [[True, True, False], [False] * 3, [True] * 3])
    with pytest.raises(ValueError, match="more than text_ctx=3"):
        tok.tokens_and_mask(["hello hello hello hello"], 3, truncate=False)
    with pytest.raises(TypeError, match="one string"):
        tok.tokens_and_mask("hello", 3)
    with pytest.raises(ValueError, match="text_ctx=0"):
        tok.tokens_and_mask(["hello"], 0)


def test_clip_tokenizer(glide_dir):
    tok = ClipTokenizer.from_glide(glide_dir)
    assert (tok.n_vocab, tok.start_token, tok.end_token) == (522, 520, 521)
    hello, world = tok.encoder["hello</w>"], tok.encoder["world</w>"]
    assert (hello, world) == (512 + 3, 512 + 7)
    # cleaning (HTML twice, whitespace) and lowercasing; single digits; "</w>" on the last symbol only
    assert tok.encode("  Hello,\n\tWORLD &amp;amp; 12 ") == [hello, 256 + 11, world, 256 + 5, 256 + 16, 256 + 17]
    assert symbols(tok, tok.encode("...")) == [".", ".", ".</w>"]
    assert tok.encode("<|startoftext|>") == [tok.start_token]
    tokens, lens = tok.tokens_and_lengths(["hello world", "", "hello hello hello"], max_text_len=4)
    np.testing.assert_array_equal(tokens, [[520, hello, world, 521], [520, 521, 0, 0], [520, hello, hello, 521]])
    np.testing.assert_array_equal(lens, [4, 2, 4])
    assert tokens.dtype == np.int32 and lens.dtype == np.int32
    with pytest.raises(ValueError, match="max_text_len=1"):
        tok.tokens_and_lengths(["hello"], 1)


def test_clip_special_words_and_decode(glide_dir):
    tok = ClipTokenizer.from_glide(glide_dir)
    hello, world = tok.encoder["hello</w>"], tok.encoder["world</w>"]
    # a special string is the special id where CLIP's regex makes it a word of its own, BPE where a
    # run of punctuation takes it in ("!<|" is one piece)
    assert tok.encode("hello<|endoftext|>world") == [hello, tok.end_token, world]
    assert tok.encode("<|endoftext|> <|startoftext|>") == [tok.end_token, tok.start_token]
    assert symbols(tok, tok.encode("!<|endoftext|>"))[:3] == ["!", "<", "|</w>"]
    assert tok.decode(tok.encode("Hello  world")) == "hello world "


def test_made_up_vocabularies_without_every_symbol():
    """The library refuses a merge whose result is not in the vocabulary; the tokenizer, like GLIDE's,
    refuses only a caption that needs the missing symbol."""
    enc = {"a": 0, "ab": 1, "<|endoftext|>": 2}
    tok = GPT2Tokenizer(enc, [("a", "b"), ("a", "a"), ("zz", "q")])
    assert tok.encode("ab") == [1]
    with pytest.raises(ValueError, match=r"BPE symbol 'aa' \(from 'abaa'\) is not in the vocabulary"):
        tok.encode("abAA")


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json.gz"):
        GPT2Tokenizer.from_glide(tmp_path)
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt"):
        ClipTokenizer.from_glide(tmp_path)


def test_word_tokenizer(tmp_path):
    tok = WordTokenizer.from_captions(["A red Cube.", "a blue sphere, don't move!"])
    assert tok.words == ("a", "blue", "cube", "don't", "move", "red", "sphere")
    assert tok.n_vocab == 8 and tok.end_token == 7
    tokens, mask = tok.tokens_and_mask(["A red-cube", "", "red red red red"], text_ctx=3)
    np.testing.assert_array_equal(tokens, [[0, 5, 2], [7, 7, 7], [5, 5, 5]])
    np.testing.assert_array_equal(mask, [[True] * 3, [False] * 3, [True] * 3])
    assert tok.decode(tokens[0]) == "a red cube"
    path = tok.save(tmp_path / "vocab.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.json"]
    loaded = WordTokenizer.load(path)
    assert loaded.words == tok.words
    with pytest.raises(ValueError, match=r"word 'green' .* not in the vocabulary \(.*vocab\.json"):
        loaded.encode("a green cube")
    with pytest.raises(ValueError, match="single lowercase word"):
        WordTokenizer(["Red"])
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer(["red", "red"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a word vocabulary"):
        WordTokenizer.load(tmp_path / "bad.json")
