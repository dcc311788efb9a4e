"""Config files -> the frozen Experiment: every shipped config builds, unknown keys are errors."""

import importlib.util
import os

import ml_collections
import pytest
from conftest import REPO

from decoderjax.training import experiment


def test_experiment_rejects_unknown_sections_and_keys():
  config = ml_collections.ConfigDict({"model": experiment.model_section("tiny-gpt2"), "oops": {}})
  with pytest.raises(ValueError, match="unknown section"):
    experiment.experiment_from_config(config, 256)
  config = ml_collections.ConfigDict(
    {"model": experiment.model_section("tiny-gpt2"), "train": {"stepz": 3}}
  )
  with pytest.raises(ValueError, match="config.train: unknown key"):
    experiment.experiment_from_config(config, 256)


@pytest.mark.parametrize(
  "name",
  [
    "default",
    "shakespeare_char_cpu",
    "shakespeare_char",
    "shakespeare_spm",
    "gpt2_124m",
    "llama_1b",
  ],
)
def test_config_files_build_experiments(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  exp = experiment.experiment_from_config(module.get_config(), vocab_size=321)
  assert (exp.model.real_vocab, exp.model.vocab_size, exp.model.vocab_pad) == (321, 384, 63)
  assert exp.data.seq_len <= exp.model.max_seq_len
  assert exp.train.batch_size % exp.loss.grad_accum_steps == 0
