"""asura: recursive (looped-depth) transformers in JAX/Flax NNX."""

__version__ = "0.1.0"
