"""Loading openai/guided-diffusion and openai/glide-text2im (PyTorch) checkpoints, and diffusers /
transformers model folders, into jaxdiff models.

    python -m jaxdiff.convert (--pt FILE.pt | --npz FILE.npz | --safetensors FILE) --kind unet|classifier|superres \\
        --flags "<guided-diffusion command-line flags>" --out DIR [--force]
    python -m jaxdiff.convert --source glide (--pt | --npz | --safetensors) FILE \\
        [--kind text2im|...|clip-image|clip-text] [--flags "<GLIDE options or clip/config.yaml values>"] --out DIR
    python -m jaxdiff.convert --source diffusers FOLDER --out DIR [--variant fp16] [--force]
    python -m jaxdiff.convert --source transformers FOLDER --out DIR [--variant fp16] [--force]

writes DIR/config.json ({"kind", "model", "diffusion", "source"}) and DIR/params (orbax), atomically;
an existing non-empty DIR is only replaced with --force. GLIDE's options and kinds: `jaxdiff.convert.glide`,
`jaxdiff.convert.clip`. A diffusers folder (UNet2DConditionModel or UNet2DModel: kind "unet2d_condition" /
"unet2d"; unCLIP's PriorTransformer / UnCLIPTextProjModel: "prior" / "unclip_text_proj") or a transformers
folder (T5EncoderModel: kind "t5_encoder"; CLIPTextModelWithProjection: "clip_text") holds config.json and its weights
(safetensors, sharded or not, read without torch; .bin with torch); DIR/config.json then records the
folder's config.json as "model" (`jaxdiff.convert.converted.from_folder`). `jaxdiff.load_model(DIR)` reopens
any of them.

Layout mapping: Conv2d OIHW -> HWIO; Linear (out, in) -> (in, out); the token-wise conv1d layers (qkv,
proj_out, qkv_proj, c_proj, encoder_kv; weight (O, I, 1)) -> Dense (I, O); GroupNorm weight -> scale;
Embedding weight -> embedding; the classifier's positional_embedding (C, T) -> (T, C). GLIDE's caption
encoder (top-level state_dict keys) lives under `text_encoder`; its Linear layers -> Dense.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict

from jaxdiff.convert.converted import FOLDER_SOURCES, SOURCES, from_folder, save_converted
from jaxdiff.convert.guided_diffusion import KINDS, flags_from_args, from_guided_diffusion, infer_kind, parse_given


def main(argv=None) -> int:
    from jaxdiff.convert import glide as convert_glide
    from jaxdiff.models import TEXT_KINDS
    from jaxdiff.models.clip import CLIP_KINDS

    p = argparse.ArgumentParser(
        prog="python -m jaxdiff.convert",
        description="Convert an openai/guided-diffusion or openai/glide-text2im checkpoint (text U-Nets and "
                    "the noised CLIP encoders), or a diffusers U-Net / transformers T5 encoder folder, into a "
                    "jaxdiff checkpoint directory.",
    )
    p.add_argument("folder", nargs="?", default=None,
                   help="--source diffusers / transformers: the model folder (config.json and the weights)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pt", help="PyTorch .pt state_dict (needs torch)")
    src.add_argument("--npz", help="numpy .npz state_dict (keys as in the .pt file)")
    src.add_argument("--safetensors", help="safetensors state_dict (keys as in the .pt file; read without torch)")
    glide_kinds = tuple(TEXT_KINDS) + tuple(CLIP_KINDS)
    p.add_argument("--source", choices=SOURCES, default=None,
                   help="the repository the checkpoint comes from (default: glide for a GLIDE --kind, else "
                        "guided-diffusion); diffusers / transformers convert a model FOLDER")
    p.add_argument("--kind", choices=KINDS + glide_kinds, default=None,
                   help=f"guided-diffusion: {', '.join(KINDS)}; glide: {', '.join(glide_kinds)} (default: "
                        f"inferred from --flags)")
    p.add_argument("--flags", default="",
                   help='guided-diffusion command-line flags, e.g. "--image_size 64 --num_channels 192 ...", '
                        'GLIDE\'s options, e.g. "--super_res True" (absent ones take GLIDE\'s defaults), or for '
                        'CLIP kinds clip/config.yaml values as "--n_embd 512 ..." (default: the released config)')
    p.add_argument("--variant", default=None,
                   help='diffusers / transformers folders: the weights variant, e.g. "fp16" '
                        "(diffusion_pytorch_model.fp16.safetensors, model.fp16.safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    if args.source is None:
        args.source = "glide" if args.kind in glide_kinds else "guided-diffusion"
    weights = args.pt or args.npz or args.safetensors
    if args.source in FOLDER_SOURCES:
        if args.folder is None or weights or args.kind or args.flags:
            p.error(f"--source {args.source} takes a model FOLDER (config.json and the weights) and no --pt / "
                    "--npz / --safetensors, --kind or --flags: the folder's config.json says what the model is")
    else:
        if args.folder is not None:
            p.error(f"a FOLDER ({args.folder}) is read with --source diffusers or --source transformers; "
                    f"--source {args.source} reads one file: --pt, --npz or --safetensors")
        if weights is None:
            p.error("one of --pt, --npz or --safetensors is required")
        if args.variant:
            p.error("--variant is for --source diffusers / transformers folders")

    out = Path(args.out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        print(f"error: {out} exists and is not empty; pass --force to replace it", file=sys.stderr)
        return 2
    if args.source in FOLDER_SOURCES:
        kind, params, model_config = from_folder(args.source, args.folder, args.variant)
        save_converted(out, params, kind, model_config, None, force=args.force, source=args.source)
        return _report(out, kind, params)

    save_kw = {"source": args.source}
    if args.source == "glide":
        if args.kind is not None and args.kind not in glide_kinds:
            p.error(f"--kind {args.kind} is a guided-diffusion kind; GLIDE's are {', '.join(glide_kinds)}")
        if args.kind in CLIP_KINDS:
            from jaxdiff.convert.clip import clip_config, encoder_kwargs, from_glide_clip

            config = clip_config(args.flags)
            kind, model_flags = args.kind, encoder_kwargs(args.kind, config)
            diffusion_flags = {"diffusion_steps": config["n_timesteps"], "noise_schedule": config["beta_schedule"]}
            convert, save_kw["extra"] = from_glide_clip, {"clip": config}
        else:
            kind, model_flags, diffusion_flags = convert_glide.flags_from_glide(args.flags, args.kind)
            convert = from_guided_diffusion
    else:
        if args.kind is not None and args.kind not in KINDS:
            p.error(f"--kind {args.kind} is a GLIDE kind: add --source glide")
        if not args.flags:
            p.error(f"--flags (guided-diffusion command-line flags) is required for --kind {args.kind or 'unet'}")
        kind = args.kind or infer_kind(parse_given(args.flags))
        model_flags, diffusion_flags = flags_from_args(args.flags, kind)
        convert = from_guided_diffusion
    _, params = convert(weights, kind, **model_flags)
    save_converted(out, params, kind, model_flags, diffusion_flags, force=args.force, **save_kw)
    return _report(out, kind, params)


def _report(out: Path, kind: str, params) -> int:
    n = sum(int(np.prod(np.shape(v))) for v in flatten_dict(params).values())
    print(json.dumps({"out": str(out), "kind": kind, "parameters": n}))
    return 0


if __name__ == "__main__":
    from jaxdiff.util import cli

    cli.main_of(main, "python -m jaxdiff.convert")
