"""Text guidance sweep on the captioned digits models (the last stage of scripts/main.sh digits_text).

Each sample's caption is that of a test example (a fixed draw: class, requested attribute bins, named
attributes). CFG over text in the Imagen convention (1 = plain conditional sampling = the "none" row,
0 = the empty caption) and CLIP guidance with the noised CLIP (0 = none) on top of plain conditional
sampling, at jaxdiff.eval.sweep's text scales. Metrics: class accuracy, FID / precision / recall in the
evaluation classifier's features, attribute accuracy of the named attributes (chance about 1/3),
the evaluation CLIP's score.
"""

from jaxdiff.eval.sweep import default_config


def get_config():
    c = default_config("digits_text")
    c.num_samples = c.batch_size = 300
    return c
