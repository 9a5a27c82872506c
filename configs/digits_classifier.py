"""Noisy classifier on the 8x8 digits for classifier guidance (ADM recipe: q_sample'd inputs at
uniform t, AdamW with weight decay, linear lr anneal). Report: accuracy against t with
`python -m jaxdiff.eval accuracy --workdir W`."""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("classifier")
    # the digits, the attention-pooled classifier, and the default schedule, which must be the diffusion
    # model's (configs/digits.py): the task defaults (jaxdiff.train.config.default_config) except these
    c.model.update(model_channels=32, num_res_blocks=1)
    c.train.update(steps=1000, lr_schedule="linear", weight_decay=0.05, checkpoint_every=500, sample_every=500)
    return c
