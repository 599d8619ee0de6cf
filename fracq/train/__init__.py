"""Layer 5: input pipelines feed a data-parallel train loop with checkpoints."""

from fracq.train.model_wrapper import ModelWrapper
from fracq.train.model_wrapper import PlainModel
from fracq.train.quant_config import build_model_wrapper
from fracq.train.quant_config import default_quant_config
from fracq.train.registry import METHODS
from fracq.train.train import NonFiniteError
from fracq.train.train import TrainState
from fracq.train.train import create_train_state
from fracq.train.train import evaluate
from fracq.train.train import make_eval_step
from fracq.train.train import make_mesh
from fracq.train.train import make_train_step
from fracq.train.train import train_and_evaluate

__all__ = [
  'METHODS',
  'ModelWrapper',
  'NonFiniteError',
  'PlainModel',
  'TrainState',
  'build_model_wrapper',
  'create_train_state',
  'default_quant_config',
  'evaluate',
  'make_eval_step',
  'make_mesh',
  'make_train_step',
  'train_and_evaluate',
]
