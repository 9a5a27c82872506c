"""Small helpers every layer may use: atomic file writes and grids (`files`), config access and checks
(`config`), command-line error reporting (`cli`), CPU compilation settings (`cpu`), content fingerprints
(`fingerprint`) and image/label array checks (`images`).

May import: nothing of jaxdiff (only the standard library, numpy, JAX and the like).
"""
