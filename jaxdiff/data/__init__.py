"""Data: tfds sources and the bundled datasets (`sources`, `datasets/`), the example stream's
deterministic order (`order`), per-process batches with worker threads (`batching`), image transforms
(`transforms`), captions of the captioned datasets (`captions`) and tokenizers (`tokenizers`). The
command: `python -m jaxdiff.data prepare NAME...`.

May import: `jaxdiff.util`. Not `models`, `diffusion` or `convert`.
"""
