"""mldash: artifact storage for ML training that never makes the training loop wait."""

__version__ = "0.1.0"
