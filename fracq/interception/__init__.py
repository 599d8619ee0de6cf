"""Layer 2: apply quantization rules to unmodified Flax models."""

from fracq.interception.facts import AttentionFacts
from fracq.interception.facts import LayerFacts
from fracq.interception.facts import count_macs
from fracq.interception.facts import format_facts_table
from fracq.interception.interceptor import LayerCall
from fracq.interception.interceptor import ModuleCall
from fracq.interception.interceptor import Provider
from fracq.interception.interceptor import QuantizedModule
from fracq.interception.interceptor import Site
from fracq.interception.interceptor import check_unused_rules
from fracq.interception.interceptor import layer_type_of
from fracq.interception.interceptor import per_tensor_transform
from fracq.interception.interceptor import weight_name
from fracq.interception.rules import ATTENTION
from fracq.interception.rules import MethodSpec
from fracq.interception.rules import Rule
from fracq.interception.rules import OPT_IN_LAYER_TYPES
from fracq.interception.rules import SUPPORTED_LAYER_TYPES
from fracq.interception.rules import keep_float
from fracq.interception.rules import match_rule
from fracq.interception.rules import validate_rules

__all__ = [
  'ATTENTION',
  'AttentionFacts',
  'LayerCall',
  'LayerFacts',
  'MethodSpec',
  'ModuleCall',
  'Provider',
  'QuantizedModule',
  'Rule',
  'OPT_IN_LAYER_TYPES',
  'SUPPORTED_LAYER_TYPES',
  'Site',
  'check_unused_rules',
  'count_macs',
  'format_facts_table',
  'keep_float',
  'layer_type_of',
  'match_rule',
  'per_tensor_transform',
  'validate_rules',
  'weight_name',
]
