"""Numerical kernels with their own gradients, tuned for the CPU and exact everywhere: attention
(`attention`), convolutions in canonical form (`conv`) and group norm (`norm`).

May import: `jaxdiff.util`.
"""
