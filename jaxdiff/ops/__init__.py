"""Numerical kernels with their own gradients, tuned for the CPU and exact everywhere: attention
(`attention`), convolutions in canonical form (`conv`), group norm (`norm`) and the exact GELU in the
form the CPU backend fuses (`activation`).

May import: `jaxdiff.util`.
"""
