"""Installs decoderjax_lm_eval.pth beside the package (regular and editable installs), so
lm-eval releases without entry-point discovery know `--model decoderjax`; all other metadata
is in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "decoderjax_lm_eval.pth"


class BuildPy(build_py):
  def run(self):
    super().run()
    self.copy_file(PTH, os.path.join(self.build_lib, PTH))


class _WithPth:
  """An editable-install strategy that also writes the .pth file into the wheel."""

  def __init__(self, strategy):
    self.strategy = strategy

  def __enter__(self):
    self.strategy.__enter__()
    return self

  def __exit__(self, *exc):
    return self.strategy.__exit__(*exc)

  def __call__(self, wheel, files, mapping):
    self.strategy(wheel, files, mapping)
    with open(PTH) as f:
      wheel.writestr(PTH, f.read())


class EditableWheel(editable_wheel):
  def _select_strategy(self, *args, **kwargs):
    return _WithPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
