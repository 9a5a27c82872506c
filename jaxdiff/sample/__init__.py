"""Sampling: the one generation path over every device of every host (`generation`), sample.py's
validated, configured runs (`runner`), and sharded, resumable sample files (`shards`; the merge command:
`python -m jaxdiff.sample merge OUT`).

May import: `jaxdiff.checkpoints`, `jaxdiff.parallel` and every layer below them.
"""
