"""Loading GLIDE's noised CLIP checkpoints (openai/glide-text2im clip/image-enc, clip/text-enc).

kind is "clip-image" or "clip-text"; the command line is jaxdiff.convert's:
    python -m jaxdiff.convert --pt image-enc.pt --kind clip-image [--flags "--n_embd 512 ..."] --out DIR
with flags named as in glide's clip/config.yaml (defaults: the released values). DIR's config.json
holds the encoder kwargs ("model"), the schedule ("diffusion") and the whole CLIP config ("clip").

Key map: `blocks.<path>.<leaf>` <-> params[<path>][<leaf>], with Linear `.w` (out, in) <-> Dense
`kernel` (in, out), LayerNorm `.g`/`.b` <-> `scale`/`bias`, Linear `.b` <-> `bias`, the patch
convolution `patch_proj` OIHW <-> HWIO, and w_t / w_pos / w_voc unchanged.
"""

from __future__ import annotations

import functools
import re
from typing import Optional

from jaxdiff.convert.common import checked_params, load_state_dict, make_layout, state_dict_from_layout
from jaxdiff.convert.guided_diffusion import parse_given
from jaxdiff.models.clip import ClipImageEncoder, check_clip_kind, create_clip_encoder

__all__ = ["CLIP_CONFIG", "abstract_clip_params", "clip_config", "encoder_kwargs", "expected_clip_shapes",
           "from_glide_clip", "to_glide_clip"]

SOURCE = "glide"

# glide_text2im/clip/config.yaml (the released encoders were trained with these)
CLIP_CONFIG = dict(logit_scale=100.0, beta_schedule="squaredcos_cap_v2", n_timesteps=1000, image_size=64, patch_size=4,
                   n_vocab=65536, max_text_len=77, n_embd=512, n_head_state_text=64, n_head_text=8, n_xf_blocks_text=12,
                   n_head_state_image=64, n_head_image=12, n_xf_blocks_image=12)

# encoder kwarg -> config.yaml key, per kind
_KWARG_KEYS = {
    "clip-image": dict(image_size="image_size", patch_size="patch_size", n_embd="n_embd", n_head="n_head_image",
                       n_xf_blocks="n_xf_blocks_image", n_head_state="n_head_state_image",
                       n_timestep="n_timesteps"),
    "clip-text": dict(n_bpe_vocab="n_vocab", max_text_len="max_text_len", n_embd="n_embd", n_head="n_head_text",
                      n_xf_blocks="n_xf_blocks_text", n_head_state="n_head_state_text"),
}


def clip_config(argstring: str = "") -> dict:
    """CLIP_CONFIG with the "--name value" flags of `argstring` (config.yaml names) applied."""
    return {**CLIP_CONFIG, **parse_given(argstring, CLIP_CONFIG, "glide CLIP config")}


def encoder_kwargs(kind: str, config: Optional[dict] = None) -> dict:
    """Constructor kwargs of the `kind` encoder from a clip/config.yaml dict (default: CLIP_CONFIG)."""
    check_clip_kind(kind)
    config = {**CLIP_CONFIG, **(config or {})}
    return {arg: config[key] for arg, key in _KWARG_KEYS[kind].items()}


def abstract_clip_params(module):
    """Shapes/dtypes of a CLIP encoder's params (jax.eval_shape of init: nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    if isinstance(module, ClipImageEncoder):
        s = module.image_size
        args = (jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
    else:
        args = (jax.ShapeDtypeStruct((1, module.max_text_len), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)["params"]


_LEAF = {"kernel": "w", "scale": "g", "bias": "b"}
# state_dict order of the names inside a module (glide registers them in this order)
_ORDER = ["input", "block", "output", "w_t", "w_voc", "patch_proj", "w_pos", "ln", "f_attn", "f_mlp",
          "f_q", "f_k", "f_v", "f_c", "f_1", "f_2", "f", "w", "g", "b"]
_RANK = {n: i for i, n in enumerate(_ORDER)}


def _order_key(key: str) -> list:
    out = []
    for part in key.split(".")[1:]:
        m = re.fullmatch(r"block_(\d+)", part)
        out.append((_RANK["block"], int(m.group(1))) if m else (_RANK.get(part, len(_RANK)), 0))
    return out


@functools.lru_cache(maxsize=16)
def _layout(module) -> tuple:
    return make_layout(abstract_clip_params(module),
                        lambda path: ".".join(("blocks",) + path[:-1] + (_LEAF.get(path[-1], path[-1]),)),
                        lambda path, shape: {"kernel": "dense", "patch_proj": "conv2d"}.get(path[-1], "identity"),
                        _order_key)


def expected_clip_shapes(module) -> dict:
    """glide state_dict key -> torch shape that `module` requires, in state_dict order."""
    return {e.key: e.shape for e in _layout(module)}


def _n_blocks(keys) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(r"blocks\.block_(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def _hint(key: str, problem: str, kind: str, expected: dict, given: dict) -> str:
    side = "image" if kind == "clip-image" else "text"
    other = "clip-text" if kind == "clip-image" else "clip-image"
    if key.startswith("blocks.input.w_") and key.split(".")[-1] in ("w_t", "w_voc") and problem != "shape":
        return f"--kind: the checkpoint looks like the other encoder ({other})"
    ne, ng = _n_blocks(expected), _n_blocks(given)
    if ".block_" in key and ne != ng:
        return f"n_xf_blocks_{side}: the checkpoint has {ng} blocks, these flags give {ne}"
    if problem == "shape":
        if key.endswith("w_t"):
            return "n_timesteps (rows of w_t)"
        if key.endswith("w_voc"):
            return "n_vocab (rows of w_voc)"
        if key == "blocks.input.w_pos":
            return ("image_size / patch_size (w_pos has 1 + (image_size / patch_size)^2 rows)" if side == "image"
                    else "max_text_len (rows of w_pos)")
        if key == "blocks.output.f.w" and expected[key][1] == given[key][1]:
            return "n_embd (output width)"
        if key.endswith("patch_proj") and expected[key][2:] != given[key][2:]:
            return "patch_size (patch_proj's kernel)"
    return f"n_head_{side} * n_head_state_{side} (the transformer width)"


def from_glide_clip(state_dict, kind: str, **kwargs):
    """Build the `kind` CLIP encoder from glide constructor `kwargs` (default: the released config's)
    and convert `state_dict` (mapping, .pt or .npz path). Returns (module, params).

    Strict: a missing, unexpected or wrongly shaped key raises ValueError naming it and the config
    value that most likely differs."""
    kwargs = {**encoder_kwargs(kind), **kwargs}
    module = create_clip_encoder(kind, **kwargs)
    params = checked_params(_layout(module), load_state_dict(state_dict), f"{SOURCE} state_dict does not fit the "
                             f"{kind!r} model built from these flags", hint_fn=_hint, kind=kind)
    return module, params


def to_glide_clip(params, module) -> dict:
    """Inverse of from_glide_clip: params -> {state_dict key: np.ndarray} in glide's layout and order."""
    return state_dict_from_layout(params, _layout(module))
