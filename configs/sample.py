"""Sampling config for sample.py (override any key on the command line):

    python sample.py --config configs/sample.py --config.model=W --config.out=OUT \
        --config.sample.sampler=ddim --config.sample.steps=50 --config.sample.guidance=cfg \
        --config.sample.scale=3 --config.sample.classes=3,5 --config.sample.num_samples=64

DeepFloyd IF's cascade (docs/cascade.md): `--config.pipeline=if --config.prompts=P.txt
--config.stages=IF-I-XL-v1.0,IF-II-L-v1.0 --config.text_encoder=T5 --config.tokenizer=spiece.model`, with
`config.cascade.*` (steps, scales, noise level, dynamic thresholding) and `--config.mesh.fsdp=N`.
Karlo's unCLIP (docs/unclip.md): `--config.pipeline=unclip --config.prompts=P.txt --config.unclip.folder=KARLO`,
with `config.unclip.*` (each part's folder, steps, scales, image_embeddings for image variations).

`--config configs/sample.py:pkg.my_guides,pkg.more` imports those modules first, so the guides and
samplers they register (jaxdiff.diffusion.guidance.register_guide, jaxdiff.diffusion.samplers.register_sampler) have
their keys here. Scale conventions (docs/guidance.md): `scale` is the classifier-free /
autoguidance scale in the Imagen convention (1 = plain conditional, 0 = unconditional; Ho &
Salimans' w = scale - 1); `classifier_scale` is guided-diffusion's classifier scale (0 = none).
"""

import importlib

from jaxdiff.sample.runner import default_config


def get_config(imports: str = ""):
    for name in (n.strip() for n in (imports or "").split(",")):
        if name:
            importlib.import_module(name)
    return default_config()
