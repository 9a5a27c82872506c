"""Guidance sweep on the digits models (the main job's last stage; see scripts/main.sh).

Scales: classifier guidance in guided-diffusion's convention (0 = none); CFG in the Imagen
convention (1 = plain conditional, 0 = unconditional). The "none" row is plain conditional
sampling, shared as the starting point of both curves.
"""

from jaxdiff.eval.sweep import default_config


def get_config():
    return default_config("digits")
