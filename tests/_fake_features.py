"""A stand-in for the Inception feature function: fixed random projections of the pixels.

``feature_fn(params, images_uint8 [B, H, W, 3])`` returns the keys jaxdiff.eval.adm reads (pool3,
spatial, logits_unbiased, logits) with small dimensions; ``make_params`` draws the projections.
``TRACES`` counts how often the function is traced (compiled or shape-evaluated).
"""

import jax
import jax.numpy as jnp
import numpy as np

TRACES = [0]


def make_params(image_shape=(8, 8, 3), dims=(16, 12, 10), seed=0):
    rng = np.random.default_rng(seed)
    d_in = int(np.prod(image_shape))
    return {k: (rng.standard_normal((d_in, d)) / np.sqrt(d_in)).astype(np.float32)
            for k, d in zip(("pool3", "spatial", "logits"), dims)}


def feature_fn(params, images):
    TRACES[0] += 1
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 127.5 - 1.0
    dot = lambda w: jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    logits = 4.0 * dot(params["logits"])
    return {"pool3": jax.nn.relu(dot(params["pool3"])), "spatial": dot(params["spatial"]),
            "logits_unbiased": logits, "logits": logits + 0.5}
