"""Plain Flax models (they know nothing of quantization).

``get_model(name, **kwargs)`` builds a model by name; ``list_models()`` lists
the names; ``default_fixed_layers(name)`` gives the regex of the layers the
default quantization rules keep at 8 bits (first conv and classifier;
for transformers the embedding and the head).
"""

from __future__ import annotations

from fracq.models import digits_cnn
from fracq.models import gpt
from fracq.models import inception
from fracq.models import mobilenet
from fracq.models import resnet
from fracq.models import vit

__all__ = [
  'default_fixed_layers',
  'get_model',
  'list_models',
]

_REGISTRY = {
  'digits_cnn': (digits_cnn.DigitsCNN, digits_cnn),
  'resnet18': (resnet.ResNet18, resnet),
  'resnet34': (resnet.ResNet34, resnet),
  'resnet50': (resnet.ResNet50, resnet),
  'resnet20': (resnet.ResNet20, resnet),
  'resnet56': (resnet.ResNet56, resnet),
  'resnet_tiny': (resnet.ResNetTiny, resnet),
  'resnet_tiny_bottleneck': (resnet.ResNetTinyBottleneck, resnet),
  'mobilenet_v1': (mobilenet.MobileNetV1, mobilenet),
  'mobilenet_v1_tiny': (mobilenet.MobileNetV1Tiny, mobilenet),
  'mobilenet_v2': (mobilenet.MobileNetV2, mobilenet),
  'mobilenet_v2_cifar': (mobilenet.MobileNetV2Cifar, mobilenet),
  'mobilenet_v2_tiny': (mobilenet.MobileNetV2Tiny, mobilenet),
  'inception_v3': (inception.InceptionV3, inception),
  'gpt_tiny': (gpt.GPTTiny, gpt),
  'gpt_small': (gpt.GPTSmall, gpt),
  'gpt_base': (gpt.GPTBase, gpt),
  'gpt_medium': (gpt.GPTMedium, gpt),
  'vit_tiny': (vit.ViTTiny, vit),
  'vit_digits': (vit.ViTDigits, vit),
  'vit_s16': (vit.ViTS16, vit),
}


def list_models() -> list[str]:
  return sorted(_REGISTRY)


def get_model(name: str, **kwargs):
  """Builds the model ``name`` with its own hyperparameters ``kwargs``."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; valid names: {list_models()}.')
  return _REGISTRY[name][0](**kwargs)


def default_fixed_layers(name: str) -> str:
  """Regex of the first conv and the classifier of model ``name``."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; valid names: {list_models()}.')
  mod = _REGISTRY[name][1]
  return f'{mod.FIRST_LAYER_PATTERN}|{mod.CLASSIFIER_PATTERN}'
