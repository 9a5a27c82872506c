"""Tokenization speed of GLIDE's GPT-2 BPE and CLIP BPE on 10,000 captions, or their agreement with
GLIDE's own tokenizers on 3,023 strings; prints JSON.

    python bench/bench_tokenizers.py --glide PATH/glide-text2im [--captions 10000] [--repeats 5]
                                     [--baseline OLD_TOKENIZERS.py] [--agreement]

PATH is an openai/glide-text2im checkout (or its tokenizer folder): the real BPE files, nothing is
downloaded. Two seeded sets of captions: a third are the captioned datasets' captions ("a thick
slanted seven"), the rest GLIDE-style prompts of 3 to 150 words with punctuation, capitals and
numbers (a few longer than text_ctx = 128 tokens, so truncation runs), their words drawn from 150
caption words (small_vocabulary: the caches are warm at once) or from GPT-2's whole-word tokens
(24,071; large_vocabulary: most words are new to the caches in the first pass). Per tokenizer:
- load_s: from_glide (reading and parsing the files, building the tokenizer);
- first_pass_ms: `encode` of every caption on a fresh tokenizer (empty caches);
- encode_ms: `encode` of every caption again, median of the repeats (warm caches);
- batch_ms: `tokens_and_mask(captions, 128)` (GPT-2) or `tokens_and_lengths(captions, 77)` (CLIP),
  median of the repeats;
- ids: how many ids the captions give, and a sha256 of all of them (equal digests: equal ids).
With --baseline FILE (another version of jaxdiff/tokenizers.py, e.g. `git show REV:jaxdiff/tokenizers.py`)
both versions are timed in one process, their calls alternated, and `same_ids` says whether every
caption gives the same ids in both. --agreement compares the ids of `agreement_strings()` between
this checkout, --baseline and GLIDE's own bpe.py / simple_tokenizer.py from the checkout (these need
`regex`, and `ftfy` for CLIP's; a tokenizer whose reference cannot be imported says why).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import random
import time
import unicodedata

import common  # first: puts this checkout's jaxdiff on sys.path
import numpy as np

from jaxdiff import captions, tokenizers

_WORD_POOL = (
    "a an the of in on with and at by under over near behind beside two three several many small large tiny "
    "huge old young red blue green yellow purple orange black white golden silver wooden glass painted "
    "shiny dark bright misty snowy sunny cat dog corgi horse fox owl robot astronaut teapot chair table "
    "lamp city street forest mountain lake river beach castle bridge tower garden kitchen library boat "
    "car train bicycle cloud moon sun star flower tree house window door painting photograph sketch "
    "watercolor oil illustration render sculpture portrait landscape close-up wide-angle sitting standing "
    "running flying reading wearing holding eating sleeping dancing looking playing hat scarf glasses "
    "book cup apple pizza guitar piano clock umbrella sunset night morning winter autumn spring summer "
    "style artstation trending highly detailed 4k 8k hdr cinematic lighting soft focus bokeh vintage "
    "retro futuristic surreal minimalist baroque impressionist cubist pixel art low-poly isometric")
_WORDS = _WORD_POOL.split()
_PUNCT = (",", ",", ".", ";", ":", "!", "?", " -", " &", "'s", "...", " (", ")")


def _prompt(rng: random.Random, pool: list[str]) -> str:
    n = rng.choice([rng.randint(3, 12), rng.randint(8, 30), rng.randint(20, 60), rng.randint(100, 150)]
                   if rng.random() < 0.03 else [rng.randint(3, 12), rng.randint(8, 30), rng.randint(20, 60)])
    words = []
    for _ in range(n):
        w = rng.choice(pool)
        r = rng.random()
        if r < 0.05:
            w = w.capitalize()
        elif r < 0.06:
            w = w.upper()
        elif r < 0.08:
            w = str(rng.randint(0, 2030))
        if rng.random() < 0.08:
            w += rng.choice(_PUNCT)
        words.append(w)
    return " ".join(words)


def bench_captions(n: int, seed: int = 0, pool: list[str] | None = None) -> list[str]:
    """n seeded captions: a third from the captioned datasets' grammar, the rest GLIDE-style prompts of
    words from `pool` (default: a pool of 150 caption words)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 0:
            s = captions.scheme(rng.choice(sorted(captions.SCHEMES)))
            k = len(s.attributes)
            out.append(captions.caption(s, rng.randrange(s.num_classes), [rng.randrange(3) for _ in range(k)],
                                        [rng.random() < 0.5 for _ in range(k)]))
        else:
            out.append(_prompt(rng, pool or _WORDS))
    return out


def agreement_strings() -> list[str]:
    """The 3,023 strings of the agreement check: captions, contractions, whitespace of every kind,
    numbers, scripts, combining marks, emoji, HTML entities and mojibake, the special-token strings
    in and out of punctuation, empty and long strings, then random code points of the whole range."""
    rng = random.Random(3023)
    out = []
    # 1. captions (GLIDE-style prompts and the datasets' grammar): 900
    out += bench_captions(900, seed=1)
    # 2. contractions and apostrophes: 200
    parts = ["don't", "it's", "IT'S", "we're", "they've", "I'm", "you'll", "he'd", "O'Neil", "rock'n'roll", "'s", "'t",
             "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "''", "'", "'x", "'ss", "'lll", "'d've", "’s", "‘quoted’",
             "dogs'", "'90s", "y'all", "'em", "ma'am", "9's", "!'s", "'s'", " 's", "l'amour", "'ré"]
    for _ in range(200):
        out.append(rng.choice(["", " ", "  "]).join(rng.choice(parts + _WORDS) for _ in range(rng.randint(1, 8))))
    # 3. whitespace: 300
    spaces = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0", "\u1680",
              "\u2000", "\u2003", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\u180e", "\u200b",
              "\ufeff", "\n\n", "   \t "]
    for _ in range(300):
        toks = []
        for _ in range(rng.randint(1, 8)):
            toks.append(rng.choice(_WORDS + ["1", "22", "!", "..", "é", "'s"]))
            toks.append(rng.choice(spaces))
        if rng.random() < 0.5:
            toks.insert(0, rng.choice(spaces))
        if rng.random() < 0.5:
            toks.pop()
        out.append("".join(toks))
    # 4. numbers: 200
    nums = ["0", "7", "42", "2024", "3.14159", "1,000,000", "-5", "+12", "1e-9", "½", "¹²³", "٣٤٥", "۱۲", "१२३",
            "๑๒", "Ⅻ", "ⅷ", "〇", "一二三", "①", "⒈", "𝟙𝟚", "١٢", "0x1F", "#1", "100%", "$9.99", "24/7", "10:30"]
    for _ in range(200):
        out.append(" ".join(rng.choice(nums + _WORDS) for _ in range(rng.randint(1, 6))))
    # 5. scripts, marks, symbols, emoji: 800
    samples = ["café", "naïve", "Ångström", "straße", "STRASSE", "İstanbul", "ǅemal", "ﬁne", "Kelvin", "Ωhm",
               "ΣΊΣΥΦΟΣ", "ὈΔΥΣΣΕΎΣ", "Москва", "ПРИВЕТ", "Ελλάδα", "עברית", "العربية", "हिन्दी", "नमस्ते",
               "தமிழ்", "ไทย", "ภาษา", "中文", "日本語", "ひらがな", "カタカナ", "한국어", "ᄀᄁ", "ສະບາຍດີ", "ქართული",
               "Հայերեն", "ኢትዮጵያ", "ᚠᚢᚦ", "𐌰𐌱", "e\u0301", "a\u0308", "n\u0303o", "\u0301x", "Z\u0335a\u0336",
               "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "☃", "✓", "→", "∑", "∞", "≈", "±", "©", "®", "™", "°C",
               "€", "£", "¥", "§", "¶", "•", "…", "—", "–", "“quoted”", "«guillemets»", "【brackets】", "¿qué?",
               "¡hola!", "ⓐⓑ", "𝔉𝔯𝔞𝔨𝔱𝔲𝔯", "𝐁𝐨𝐥𝐝", "ｆｕｌｌｗｉｄｔｈ", "ＡＢＣ", "\x00", "\x07", "\x7f", "\x80",
               "\x9f", "\ue000", "\U000f0000", "\ufffd", "\ufffe", "ꙮ", "ʼn", "ŉ", "ǰ", "ΐ", "ﬀ", "ẞ", "Ⓐ",
               "ᾼ", "ᾳ", "Ǆ", "ǆ", "ᵃᵇ", "ª", "º", "µ", "ÿ", "Ÿ", "Ā", "ı", "I", "Iİ", "ꭰ", "Ꭰ", "\u0345",
               "\u2126", "\u212a", "\u212b", "ǈ", "ǉ", "Ａ", "ａ"]
    pool = [chr(c) for c in list(range(0x20, 0x250)) + list(range(0x370, 0x530)) + list(range(0x2000, 0x2070))
            + list(range(0x3040, 0x30ff))]
    for i in range(800):
        if i % 2:
            out.append(" ".join(rng.choice(samples + _WORDS[:40]) for _ in range(rng.randint(1, 6))))
        else:
            out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 24))))
    # 6. HTML entities and mojibake: 100
    html = ["&amp;", "&amp;amp;", "&amp;amp;amp;", "&lt;b&gt;", "&#39;", "&#x27;", "&nbsp;", "&quot;", "&eacute;",
            "&copy;", "&#8212;", "&#128512;", "&notanentity;", "& amp;", "&amp", "&#10;", "&#x9;", "Ã©", "â€™",
            "Ã¼ber", "Ã¢â‚¬â„¢", "ðŸ˜€", "&lt;|endoftext|&gt;"]
    for _ in range(100):
        out.append(rng.choice(["", " "]).join(rng.choice(html + _WORDS[:40]) for _ in range(rng.randint(1, 6))))
    # 7. the special-token strings: 60
    sp = ["<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext|", "<endoftext>", "|endoftext|>"]
    pre = ["", " ", "a", "!", "'s", "1", "a ", "<", "<<", ".", "x'", "é"]
    for _ in range(60):
        out.append(rng.choice(pre) + rng.choice(sp) + rng.choice(pre) + rng.choice(["", rng.choice(sp)]))
    # 8. edge shapes: empty, single chars, long: 60
    out += ["", " ", "  ", "\n", "'", "a", "A", "1", "!", " a", "a ", "<|", "|>"]
    out += [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(150, 400))) for _ in range(20)]
    out += ["".join(rng.choice("abc ") for _ in range(rng.randint(200, 600))) for _ in range(10)]
    out += ["a" * rng.randint(50, 300) for _ in range(5)] + ["!" * rng.randint(50, 300) for _ in range(4)]
    out += ["ab" * 100, "\n" * 50, " " * 80, "'s" * 30, "123" * 40, "é" * 60, "😀" * 30, "日本" * 50]
    # 9. random code points from the whole Unicode range: the rest (unique strings)
    out = list(dict.fromkeys(out))
    while len(out) < 3023:
        cps = []
        for _ in range(rng.randint(1, 12)):
            c = rng.randrange(0x110000)
            if not 0xD800 <= c <= 0xDFFF:
                cps.append(chr(c))
        t = "".join(cps) + rng.choice(["", " ", " cat", "'s"])
        if t not in out:
            out.append(t)
    return out


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location("baseline_tokenizers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ids_digest(rows: list) -> dict:
    flat = np.fromiter((i for r in rows for i in r), np.int64)
    return {"count": int(flat.size), "sha256": hashlib.sha256(flat.tobytes()).hexdigest()[:16]}


def gpt2_words(glide: str) -> list[str]:
    """The whole-word tokens of GPT-2's vocabulary ("Ġ" + 3 or more ASCII letters), lowercased: 24,071
    words, for captions whose words are mostly new to the tokenizers' caches."""
    encoder = json.loads(tokenizers._read_text(tokenizers._find(glide, ("encoder.json.gz", "encoder.json"), "")))
    return sorted({w[1:].lower() for w in encoder if w[0] == "Ġ" and len(w) > 3 and w[1:].isascii() and w[1:].isalpha()})


def run(mods: dict, glide: str, caps: list[str], repeats: int) -> dict:
    out = {}
    for kind, batch in (("GPT2Tokenizer", lambda t: t.tokens_and_mask(caps, 128)),
                        ("ClipTokenizer", lambda t: t.tokens_and_lengths(caps, 77))):
        toks, res = {}, {}
        for name, mod in mods.items():
            t0 = time.perf_counter()
            toks[name] = getattr(mod, kind).from_glide(glide)
            load = time.perf_counter() - t0
            t0 = time.perf_counter()
            rows = [toks[name].encode(c) for c in caps]
            res[name] = {"load_s": round(load, 3), "first_pass_ms": round((time.perf_counter() - t0) * 1e3, 1),
                         "ids": _ids_digest(rows), "_rows": rows}
        fns = {}
        for name, tok in toks.items():
            fns[f"{name}/encode"] = lambda tok=tok: [tok.encode(c) for c in caps]
            fns[f"{name}/batch"] = lambda tok=tok, batch=batch: batch(tok)
        times = common.interleaved(fns, repeats)
        for name in toks:
            res[name]["encode_ms"] = common.median(times[f"{name}/encode"])
            res[name]["batch_ms"] = common.median(times[f"{name}/batch"])
            res[name]["encode_ms_all"] = [round(t, 1) for t in times[f"{name}/encode"]]
        if len(res) == 2:
            a, b = (r.pop("_rows") for r in res.values())
            res["same_ids"] = a == b
            res["captions_with_different_ids"] = sum(x != y for x, y in zip(a, b))
        for r in res.values():
            if isinstance(r, dict):
                r.pop("_rows", None)
        out[kind] = res
    return out


def _reference(glide: str) -> dict:
    """glide-text2im's own tokenizers, {kind: tokenizer or "error: why not"}: the checkout's
    glide_text2im/tokenizer/bpe.py (needs `regex`) and simple_tokenizer.py (`regex` and `ftfy`)."""
    out = {}
    for kind, name, make in (("GPT2Tokenizer", "bpe", lambda m: m.get_encoder()),
                             ("ClipTokenizer", "simple_tokenizer", lambda m: m.SimpleTokenizer())):
        try:
            path = tokenizers._find(glide, (f"{name}.py",), "glide's reference tokenizer")
            spec = importlib.util.spec_from_file_location(f"glide_reference_{name}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            out[kind] = make(mod)
        except (ImportError, FileNotFoundError) as e:
            out[kind] = f"error: {type(e).__name__}: {e}"
    return out


def _encode_all(tok, strings: list[str]) -> list:
    out = []
    for s in strings:
        try:
            out.append(list(tok.encode(s)))
        except Exception as e:  # noqa: BLE001 - an error is an outcome to compare
            out.append(f"{type(e).__name__}: {e}")
    return out


def agreement(mods: dict, glide: str) -> dict:
    """Per tokenizer and pair of versions (this checkout's, --baseline's, glide's own): how many of the
    3,023 strings give identical ids; the differing ones by index, and how many of them hold a code
    point that this Python's Unicode tables do not know (its regular-expression classes are newer)."""
    strings = agreement_strings()
    refs = _reference(glide)
    out = {"strings": len(strings), "python_unicode": unicodedata.unidata_version, "ftfy": _has_ftfy(),
           "tokenizers_library": importlib.import_module("tokenizers").__version__,
           "reference": {k: v if isinstance(v, str) else "the checkout's" for k, v in refs.items()}}
    for kind in ("GPT2Tokenizer", "ClipTokenizer"):
        ids = {name: _encode_all(getattr(mod, kind).from_glide(glide), strings) for name, mod in mods.items()}
        if not isinstance(refs[kind], str):
            ids["glide"] = _encode_all(refs[kind], strings)
        names, res = list(ids), {}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                diff = [n for n, (x, y) in enumerate(zip(ids[a], ids[b])) if x != y]
                res[f"{a}~{b}"] = {
                    "identical": len(strings) - len(diff), "different": diff,
                    "different_with_unknown_code_points": sum(any(unicodedata.category(c) == "Cn" for c in strings[n])
                                                              for n in diff)}
        out[kind] = res
    return out


def _has_ftfy() -> bool:
    return importlib.util.find_spec("ftfy") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glide", required=True, help="openai/glide-text2im checkout or its tokenizer folder")
    parser.add_argument("--captions", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default="", help="another tokenizers.py to time against this checkout's")
    parser.add_argument("--agreement", action="store_true",
                        help="instead of timing: compare the ids of the 3,023 agreement strings between this "
                             "checkout, --baseline and glide's own tokenizers")
    args = parser.parse_args()
    mods = {"current": tokenizers}
    if args.baseline:
        mods = {"baseline": _load_module(args.baseline), "current": tokenizers}
    if args.agreement:
        print(json.dumps({"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "baseline": args.baseline or None, **agreement(mods, args.glide)}, indent=1))
        return
    sets = {"small_vocabulary": bench_captions(args.captions),
            "large_vocabulary": bench_captions(args.captions, pool=gpt2_words(args.glide))}
    print(json.dumps({
        "machine": common.machine(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repeats": args.repeats, "baseline": args.baseline or None, "ftfy": _has_ftfy(),
        "tokenizers_library": importlib.import_module("tokenizers").__version__,
        "captions": {k: {"n": len(c), "chars_mean": round(float(np.mean([len(x) for x in c])), 1),
                         "chars_max": max(len(x) for x in c), "distinct_words": len({w for x in c for w in x.split()}),
                         "examples": c[1:3]} for k, c in sets.items()},
        "results": {k: run(mods, args.glide, c, args.repeats) for k, c in sets.items()}}, indent=1))

if __name__ == "__main__":
    main()
