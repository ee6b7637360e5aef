"""noisepo: preference optimisation of language models under noisy preference signals."""

__version__ = "0.1.0"
