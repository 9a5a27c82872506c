"""Training, one entry point `loop.train(config, workdir)` for every task ("diffusion", "classifier",
"text2im", "clip", "if_text2im", "if_superres"): the config and its derived values (`config`), the train state,
optimiser and EMA (`state`), each task's loss (`losses`), the jitted step on a (data, fsdp) mesh (`step`), the
batches it eats (`inputs`), the IF tasks' cached frozen text-encoder states (`text_states`), training grids
(`grids`), the loop with checkpoints and multi-host agreement (`loop`), metrics and profiling (`monitor`) and
preemption (`preemption`). Details: docs/training.md, docs/text.md.

May import: every other layer (`eval` for the classifier's periodic accuracy, `sample` for grids).
"""
