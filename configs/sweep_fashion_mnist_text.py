"""Text guidance sweep on the captioned Fashion-MNIST models (last stage of scripts/main.sh
fashion_mnist_text): as configs/sweep_digits_text.py, sized for 32x32 samples on 2 CPU cores."""

from jaxdiff.eval.sweep import default_config


def get_config():
    c = default_config("fashion_mnist_text")
    c.steps = (25,)
    c.num_samples, c.batch_size = 200, 100
    return c
