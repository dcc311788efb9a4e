"""decoderjax: decoder-only language models in JAX/Flax."""

from decoderjax.config import PRESETS, ModelConfig, RopeScaling, get_preset
from decoderjax.model import Decoder, KVCache, init_cache

__version__ = "0.1.0"
__all__ = [
  "PRESETS",
  "Decoder",
  "KVCache",
  "ModelConfig",
  "RopeScaling",
  "get_preset",
  "init_cache",
]
