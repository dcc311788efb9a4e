"""Compiles a config's steps for a TPU slice without one: python -m decoderjax.compile.

  pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # libtpu
  python -m decoderjax.compile --config=configs/llama_1b.py --topology=v5e-16
  python -m decoderjax.compile --config=configs/llama_1b.py --topology=v5p-128 --num_slices=2 \
    --mode=decode --config.mesh.fsdp=64 --output_json=report.json

Prints whether the step fits in HBM (bytes per chip: parameters, optimizer state, temporaries),
its collectives by kind and mesh axis, model FLOPs beside XLA's, and a roofline step time and MFU
over the chip's published peak, ICI / DCN and HBM bandwidth. Any config override works as in
`train`. Runs on a CPU host: JAX_PLATFORMS=cpu is set before JAX starts.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces; libtpu compiles
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: this is not a TPU VM
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles side by side

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from decoderjax import cli
from decoderjax.checkpoints import modeldir  # noqa: E402
from decoderjax.data.tokenizer import SENTENCEPIECE_KINDS  # noqa: E402
from decoderjax.runtime import topology
from decoderjax.runtime.progress import format_bytes as size  # noqa: E402
from decoderjax.training import aot, experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "v5e-256, v5p-128, v6e-64, v4-32, ... or GEN:SHAPE such as v5e:4x4; GPUs: h100:8, h200:16.",
)
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice).")
_MODE = flags.DEFINE_enum("mode", "train", aot.MODES, "The step to compile.")
_BATCH = flags.DEFINE_integer("batch", 0, "prefill/decode rows (0: train.batch_size).")
_PROMPT = flags.DEFINE_integer("prompt_len", 0, "prefill/decode prompt tokens (0: data.seq_len).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "prefill/decode: new tokens in the cache.")
_GPU_TARGET = flags.DEFINE_string(
  "gpu_target_config", "", "GPU topologies: XLA's GpuTargetConfigProto text file for the GPU."
)
_OUTPUT_JSON = flags.DEFINE_string("output_json", "", "Write the report here as JSON too.")
flags.mark_flags_as_required(["config", "topology"])


def build_experiment(config) -> experiment.Experiment:
  base = modeldir.read_config(config.init_from) if config.get("init_from") else None
  vocab = 0 if base is not None else config.model.get("vocab_size", 0)
  if base is None and not vocab:  # the tokenizer's: known when the config trains one
    trained = config.data.tokenizer in SENTENCEPIECE_KINDS
    vocab = config.data.vocab_size if trained else 0
    if not vocab:
      raise ValueError(
        "config.model.vocab_size=0 takes the tokenizer's, which compile does not read; "
        "give --config.model.vocab_size=N"
      )
  return experiment.experiment_from_config(config, vocab, base)


def describe(r: aot.Report) -> str:
  mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items())
  lines = [f"{r.mode} step on {r.topology} ({r.chips} chips), mesh {mesh}"]
  m = r.memory
  verdict = "fits" if r.fits else "DOES NOT FIT"
  lines.append(
    f"memory per chip: {verdict} in {size(r.hbm_bytes)} of HBM: parameters "
    f"{size(m['parameters'])}, optimizer state {size(m['optimizer_state'])}"
    + (f", temporaries {size(m['temporaries'])}, total {size(m['total'])}" if "total" in m else "")
  )
  if r.error:
    lines.append(f"compiler: {r.error}")
    return "\n".join(lines)
  gpu = r.topology.split(":")[0] in topology.GPUS
  for kind, by_axes in sorted(r.collectives.items()):
    for axes, row in sorted(by_axes.items()):
      link = "DCN" if row["dcn"] else "NVLink" if gpu else "ICI"
      lines.append(
        f"  {kind:<18} over {axes:<14} x{row['count']:<5} {size(row['bytes']):>10} "
        f"({size(row['sent_bytes'])} sent per chip, {link})"
      )
  xla = f", XLA {r.xla_flops * r.chips:.3g} (a loop body counted once)" if r.xla_flops else ""
  lines.append(f"model FLOPs per step {r.model_flops:.3g}{xla}")
  f = r.roofline
  lines.append(
    f"roofline: compute {f['compute_s'] * 1e3:.1f} ms, collectives {f['collective_s'] * 1e3:.1f} "
    f"ms, HBM {f['hbm_s'] * 1e3:.1f} ms -> {f['step_s'] * 1e3:.1f} ms per step overlapped, "
    f"{f['step_s_no_overlap'] * 1e3:.1f} ms serial ({f['bound']}-bound); projected MFU "
    f"{100 * f['mfu']:.1f}% (serial {100 * f['mfu_no_overlap']:.1f}%)"
  )
  if r.attention_kernels:
    lines.append(f"kernels: {', '.join(r.attention_kernels)}")
  return "\n".join(lines)


def main(argv):
  del argv
  exp = build_experiment(_CONFIG.value)
  r = aot.report(
    exp, _TOPOLOGY.value, _SLICES.value, _MODE.value, _BATCH.value, _PROMPT.value,
    _MAX_NEW.value, _GPU_TARGET.value,
  )  # fmt: skip
  print(describe(r))
  if _OUTPUT_JSON.value:
    cli.write_json(_OUTPUT_JSON.value, r.to_dict())


if __name__ == "__main__":
  cli.run(main)
