"""genmem: train generative models and measure and reduce their memorisation of training data."""

__version__ = "0.1.0"
