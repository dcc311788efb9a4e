"""decoderjax: decoder-only language models in JAX/Flax."""

import importlib

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
_HOMES = {"Decoder": "model", "KVCache": "model", "init_cache": "model"}


def __getattr__(name):
  """The top-level names, imported on first use: `decoderjax.prepare` and its worker processes
  never load JAX."""
  if name not in __all__:
    raise AttributeError(f"module 'decoderjax' has no attribute {name!r}")
  return getattr(importlib.import_module(f"decoderjax.{_HOMES.get(name, 'config')}"), name)
