"""lensbench: latent predictions of language-model layers, SimLens, and early exit."""

__version__ = "0.1.0"
