"""unCLIP against GLIDE-style CFG on the captioned digits (the last stage of scripts/main.sh digits_unclip).

The same captions as configs/sweep_digits_text.py (test examples, a fixed draw), sampled two ways:
  * GLIDE: digits_text's text model with CFG over text in the Imagen convention (1 = plain conditional
    sampling = the "none" row), ddpm 50 steps;
  * unCLIP (DALL-E 2): caption -> prior (CFG s_p, 25 steps) -> CLIP image embedding -> decoder (CFG s_d,
    50 steps), one curve per prior scale over the decoder's scales, at the GLIDE curve's scales.
Metrics as the text sweep's: class accuracy, FID / precision / recall in the evaluation classifier's features,
attribute accuracy of the named attributes (chance about 1/3), the evaluation CLIP's score; recall against
that score shows which family keeps more diversity at equal caption fidelity.
"""

from jaxdiff.eval.sweep import default_config


def get_config():
    c = default_config("digits_text")  # digits_text's text model, evaluation CLIP and evaluation classifier
    c.cfg_scales, c.clip_scales = (3.0, 8.0), ()
    c.unclip_prior = "runs/digits_unclip/prior"
    c.unclip_decoder = "runs/digits_unclip/decoder"
    c.unclip_clip = "runs/digits_unclip/clip"
    c.unclip_prior_scales = (1.0, 4.0)
    c.unclip_decoder_scales = (1.0, 3.0, 8.0)
    c.num_samples = c.batch_size = 300
    c.out = "reports/digits_unclip"
    return c
