"""Training without Ray: config, objectives, data order, the step, the loop, checkpoints.

``fit`` trains in one process; ``thinkfast_pipelines.train`` runs the same ``train_step``
and ``run_epochs`` on Ray Train workers (DDP, Ray Data shards, checkpoint reporting).
Submodules import torch lazily where they can; this package never imports ray.
"""

from thinkfast.training.config import TrainConfig, build_config, read_config_file
from thinkfast.training.fit import TRAINING_FILE, TrainResult, fit
from thinkfast.training.loop import run_epochs, train_step

__all__ = ["TRAINING_FILE", "TrainConfig", "TrainResult", "build_config", "fit", "read_config_file", "run_epochs",
           "train_step"]
