"""SimCLR and MoCo trainers built on the fused ops; see engine.Trainer for the shared loop."""
from .data import ImageDataset, load_dataset
from .engine import TrainConfig, Trainer
from .moco import MoCoTrainer
from .simclr import SimCLRTrainer
from .cli import TRAINERS

__all__ = ["SimCLRTrainer", "MoCoTrainer", "TrainConfig", "Trainer", "ImageDataset", "load_dataset", "TRAINERS"]
