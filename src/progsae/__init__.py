"""progsae: progressive sparse autoencoders (TopK, Matryoshka, permutation, progressive evaluation)."""

from .analysis.shrink import shrink
from .errors import ProgsaeError
from .formats import load_sae, save_sae
from .sae import SAE, SAEConfig
from .train import TrainConfig, Trainer, train

__all__ = ["SAE", "SAEConfig", "load_sae", "save_sae", "TrainConfig", "Trainer", "train", "shrink", "ProgsaeError"]
__version__ = "0.1.0"
