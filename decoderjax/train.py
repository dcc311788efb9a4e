"""Trains a model: python -m decoderjax.train --config=configs/NAME.py --workdir=DIR.

Every config field can be overridden on the command line, e.g. --config.train.steps=100.
Re-running the same command with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os

import jax
from absl import flags
from ml_collections import config_flags

from decoderjax import cli
from decoderjax.checkpoints import modeldir
from decoderjax.data import pipeline, tasks
from decoderjax.data.tokenizer import load_tokenizer
from decoderjax.runtime import hostmem, sharding
from decoderjax.training import experiment, loop, metrics

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; also a model directory.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", "", "host:port of process 0, for multi-host runs outside TPU/SLURM/GKE."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in a multi-host run.")
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
  "keep_freed_memory",
  True,
  "CPU runs: glibc's malloc keeps freed memory for reuse (one arena, no mmap, no trimming), so "
  "train steps do not fault their buffers in anew each step; a step's buffers may then be held "
  "twice. false leaves malloc as it is.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # before any other thread allocates
  if _KEEP_FREED_MEMORY.value and hostmem.cpu_only() and hostmem.keep_freed_memory():
    print("host memory: freed buffers kept for reuse (--keep_freed_memory)", flush=True)
  config = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  data_cfg = experiment.data_config(config)
  init_from = config.get("init_from", "")
  base, tokenizer, template = None, None, None
  if init_from:  # fine-tuning: the base model's architecture, tokenizer and chat template
    base = modeldir.read_config(init_from)
    tokenizer = load_tokenizer(os.path.join(init_from, modeldir.TOKENIZER_DIR))
    template = modeldir.read_generation(init_from).get("chat_template")
  if data_cfg.task == "lm":
    dataset = pipeline.load_dataset(data_cfg, os.path.join(workdir, "data_cache"), tokenizer)
  elif tokenizer is None and data_cfg.task != "seq2seq":  # seq2seq may start from scratch
    raise ValueError(
      f"data.task={data_cfg.task!r} fine-tunes a pretrained model: give --config.init_from=DIR"
    )
  else:
    dataset = tasks.load_task_dataset(data_cfg, tokenizer, template)
  num_labels = len(dataset.label_names or [])
  exp = experiment.experiment_from_config(config, dataset.tokenizer.vocab_size, base, num_labels)
  if exp.model.cross_attention != (data_cfg.task == "seq2seq"):
    raise ValueError(
      "data.task='seq2seq' trains a model with cross_attention=True, and such a model trains "
      f"on seq2seq data only (data.task={data_cfg.task!r}, "
      f"model.cross_attention={exp.model.cross_attention})"
    )
  # Nothing above starts JAX's backends: the CPU split and the cluster come first.
  train_batch, accum = exp.train.batch_size, max(exp.loss.grad_accum_steps, 1)
  batches = (train_batch, train_batch // accum, exp.eval.batch_size or train_batch)
  sharding.split_cpu(exp.mesh.cpu_devices, batches, metrics.matmul_params(exp.model))
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  final = loop.train(exp, workdir, dataset)
  if jax.process_count() > 1:  # leave together: no process exits while another still talks
    sharding.sync_hosts("decoderjax.train done")
    jax.distributed.shutdown()
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))


if __name__ == "__main__":
  cli.run(main)
