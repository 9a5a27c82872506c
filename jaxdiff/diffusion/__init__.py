"""The diffusion process, free of any network architecture: noise schedules and respacing (`schedules`),
the Gaussian process math and training losses (`gaussian`), guides as pure functions (`guides`: CFG,
autoguidance, classifier and log-density gradients, dynamic thresholding), CLIP guidance (`clip_guide`),
the guide registry and `build_guides` (`guidance`), and the samplers with their registry (`samplers`:
DDPM, DDIM, DPM-Solver++ as `lax.scan` loops).

May import: `jaxdiff.models`, `jaxdiff.ops`, `jaxdiff.util`. Not `convert` or `data` (independent siblings).
"""
