"""CLIP on captioned Fashion-MNIST (padded to 32): noised, to guide sampling by text, or clean
(`configs/fashion_mnist_clip.py:eval`), to score samples; as configs/digits_clip.py."""

from jaxdiff.train.config import default_config


def get_config(variant: str = "noised"):
    if variant not in ("noised", "eval"):
        raise ValueError(f"configs/fashion_mnist_clip.py:{variant}: allowed variants: noised, eval")
    c = default_config("clip")
    c.data.name = "fashion_mnist_text"
    c.data.image_size = 32
    c.model.update(patch_size=4, n_xf_blocks_text=1)
    c.train.update(steps=400, lr_schedule="linear", warmup_steps=50, ema_decay=0.99, checkpoint_every=200, keep=2)
    if variant == "eval":
        c.seed = 1
        c.train.noised = False
    return c
