"""Checkpoint converters, one module per source format: openai/guided-diffusion (`guided_diffusion`),
openai/glide-text2im (`glide`), GLIDE's noised CLIP (`clip`), the FID Inception-v3 of torch-fidelity
(`inception`); the helpers every converter shares (`common`: reading state_dicts, layout mapping, strict
key checks) and converted checkpoints on disk (`converted`). The command: `python -m jaxdiff.convert`.

May import: `jaxdiff.models`, `jaxdiff.ops`, `jaxdiff.util`. Not `diffusion` or `data`.
"""
