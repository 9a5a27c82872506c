"""Text guidance sweep on the captioned digits models (the last stage of scripts/main.sh digits_text).

Each sample's caption is that of a test example (a fixed draw: class, requested attribute bins, named
attributes). CFG over text in the Imagen convention (1 = plain conditional sampling = the "none" row,
0 = the empty caption); CLIP guidance with the noised CLIP (0 = none), on top of plain conditional
sampling. Metrics: class accuracy, FID / precision / recall in the evaluation classifier's features,
attribute accuracy of the named attributes (chance 1/3), the evaluation CLIP's score.
"""

from jaxdiff.sweep import default_config


def get_config():
    c = default_config("digits_text")
    c.clip_image = c.clip_text = "runs/digits_text/clip"
    c.eval_clip = "runs/digits_text/eval_clip"
    c.classifier_scales = ()  # a text model has no labels to guide a classifier towards
    c.cfg_scales = (0.0, 1.5, 3.0)
    c.clip_scales = (1.0, 3.0)
    c.sampler = "ddpm"
    c.steps = (50,)
    c.num_samples = 300
    c.batch_size = 300
    return c
