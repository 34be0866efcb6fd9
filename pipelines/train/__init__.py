"""Ray Train: train the slow model, the fast model, and distil one into the other.

The per-step maths lives in :mod:`thinkfast.training`; this package only places it on
Ray Train workers and feeds it Ray Data shards.
"""

from thinkfast_pipelines.train.run import TrainResult, distill, train_fast, train_slow

__all__ = ["TrainResult", "distill", "train_fast", "train_slow"]
