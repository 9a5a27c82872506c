"""Numerical kernels with their own gradients, tuned for the CPU and exact everywhere: attention
(`attention`), convolutions in canonical form (`conv`), group norm (`norm`), the exact GELU in the
form the CPU backend fuses (`activation`), and quantiles without a sort (`quantile`, for dynamic
thresholding).

May import: `jaxdiff.util`.
"""
