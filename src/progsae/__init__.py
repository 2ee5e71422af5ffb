"""progsae: progressive sparse autoencoders (TopK, Matryoshka, permutation, progressive evaluation)."""

from .files import ProgsaeError
from .sae import SAE, SAEConfig
from .train import TrainConfig, Trainer, train

__all__ = ["SAE", "SAEConfig", "TrainConfig", "Trainer", "train", "ProgsaeError"]
__version__ = "0.1.0"
