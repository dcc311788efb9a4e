"""Registers the `decoderjax` backend with lm-eval, so `lm_eval --model decoderjax` works.

lm-eval releases that read the `lm_eval.models` entry point (pyproject.toml) find the backend
themselves; for earlier ones, `decoderjax_lm_eval.pth` (installed beside the package) calls
`install()` at interpreter start-up, which only watches for `lm_eval.models` to be imported and
then adds a lazy registry entry. Nothing of JAX or lm-eval is imported before that.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

NAME, TARGET = "decoderjax", "decoderjax.evaluation.harness:DecoderJaxLM"


def register() -> None:
  """Adds the lazy `decoderjax` entry unless lm-eval already has one."""
  from lm_eval.api.registry import model_registry

  if NAME not in model_registry:
    model_registry.register(NAME, target=TARGET)


class _AfterModels(importlib.abc.MetaPathFinder):
  """Finds `lm_eval.models` as usual and registers the backend once it has run."""

  def find_spec(self, fullname, path, target=None):
    if fullname != "lm_eval.models":
      return None
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is None or spec.loader is None:
      return spec
    run = spec.loader.exec_module

    def exec_module(module):
      run(module)
      register()

    spec.loader.exec_module = exec_module
    return spec


def install() -> None:
  if "lm_eval.models" in sys.modules:
    register()
  elif not any(isinstance(f, _AfterModels) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterModels())
