"""Training: a step graph (loss, gradients, optimizer update) and the callable that runs it on a target."""

from .objective import TokenLoss
from .optim import SGD, Adam, AdamW, Optimizer
from .schedules import Constant, Noam, WarmupCosine
from .step import NonFiniteStep, TrainStep, training_graph

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "Constant", "Noam", "WarmupCosine", "TrainStep", "training_graph", "TokenLoss",
           "NonFiniteStep"]
