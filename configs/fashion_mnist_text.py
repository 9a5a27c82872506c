"""Text-conditional diffusion model (GLIDE's Text2ImUNet) on captioned Fashion-MNIST (padded to 32).

    python train.py --config configs/fashion_mnist_text.py --workdir W

Captions such as "a large dark ankle boot" (jaxdiff.data.captions), word-tokenized, dropped to the empty
caption with probability diffusion.p_uncond (0.2). Sized like configs/fashion_mnist.py so the main job
finishes on 2 CPU cores: an under-trained model; raise model_channels and steps for a real one.
"""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("text2im")
    c.data.name = "fashion_mnist_text"
    c.data.image_size = 32
    c.model.update(model_channels=32, num_res_blocks=1, attention_resolutions=(4,), channel_mult=(1, 2, 2),
                   xf_width=32, xf_layers=1, xf_heads=1)
    c.train.update(batch_size=32, steps=400, lr=2e-3, ema_decay=0.995, checkpoint_every=200, keep=2)
    return c
