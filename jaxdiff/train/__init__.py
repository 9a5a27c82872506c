"""Training, one entry point `loop.train(config, workdir)` for every task ("diffusion", "classifier",
"text2im", "clip", "if_text2im", "if_superres", "unclip_prior", "unclip_decoder"): the config and its derived
values (`config`), the train state, optimiser and EMA (`state`), each task's loss (`losses`), the jitted step on
a (data, fsdp) mesh (`step`), the batches it eats (`inputs`), the IF and unCLIP tasks' cached frozen
text-encoder outputs (`text_states`), the unCLIP tasks' cached CLIP image embeddings (`image_embeddings`),
training grids (`grids`), the loop with checkpoints and multi-host agreement (`loop`), metrics and profiling
(`monitor`) and preemption (`preemption`). Details: docs/training.md, docs/text.md, docs/unclip_training.md.

May import: every other layer (`eval` for the classifier's periodic accuracy, `sample` for grids).
"""
