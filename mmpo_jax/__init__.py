"""mmpo-jax: offline preference optimisation (MMPO, DPO, SimPO) in JAX / Flax NNX.

Importing the package is light: no torch, grain or datasets are loaded here.
"""

__version__ = "0.1.0"
