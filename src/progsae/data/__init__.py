"""Activation sources. Anything with `d_in` and `batches(batch_size, seed, start)` can be trained on:
an endless, deterministic stream of [batch_size, d_in] float32 batches, batch `start` first."""

from .activations import ActivationDir, ActivationWriter, write_activations
from .synthetic import SyntheticConfig, SyntheticSource

__all__ = ["ActivationDir", "ActivationWriter", "write_activations", "SyntheticConfig", "SyntheticSource"]
