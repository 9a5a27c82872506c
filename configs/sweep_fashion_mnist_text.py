"""Text guidance sweep on the captioned Fashion-MNIST models (last stage of scripts/main.sh
fashion_mnist_text); settings and metrics as configs/sweep_digits_text.py, sized for 32x32 samples."""

from jaxdiff.sweep import default_config


def get_config():
    c = default_config("fashion_mnist_text")
    c.clip_image = c.clip_text = "runs/fashion_mnist_text/clip"
    c.eval_clip = "runs/fashion_mnist_text/eval_clip"
    c.classifier_scales = ()  # a text model has no labels to guide a classifier towards
    c.cfg_scales = (0.0, 1.5, 3.0)
    c.clip_scales = (1.0, 3.0)
    c.sampler = "ddpm"
    c.steps = (25,)
    c.num_samples = 200
    c.batch_size = 100
    return c
