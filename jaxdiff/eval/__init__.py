"""Evaluation: FID / IS / precision-recall / density-coverage (`metrics`), the FID Inception-v3's
features (`inception`), guided-diffusion's evaluator (`adm`), model and sample evaluations
(`evaluation`), the guidance-scale sweep (`sweep`) and its report (`report`). The command:
`python -m jaxdiff.eval samples|accuracy|cfg|adm|reference`.

May import: `jaxdiff.sample` and every layer below it. Not `jaxdiff.train`.
"""
