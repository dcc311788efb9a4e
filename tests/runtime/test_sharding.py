"""Scale-out on 8 virtual CPU devices (and 2 processes): same losses on every mesh as on one
device, parameters really sharded, checkpoints restoring across meshes, clear mesh errors."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from decoderjax.model.presets import get_preset
from decoderjax.runtime import sharding
from decoderjax.training import metrics

EIGHT = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
MODEL = [
  "--config.model.num_layers=2",
  "--config.model.embed_dim=64",
  "--config.model.num_heads=4",
  "--config.model.num_kv_heads=2",
  "--config.model.mlp_dim=128",
  "--config.model.max_seq_len=32",
  "--config.model.scan_layers=True",
  "--config.data.seq_len=32",
  "--config.train.batch_size=16",
  "--config.train.log_every=1",
  "--config.eval.every_steps=0",
  "--config.eval.max_batches=1",
  "--config.eval.batch_size=16",
  "--config.optimizer.warmup_steps=2",
  "--config.optimizer.decay_steps=10",
  "--config.train.sample_tokens=4",
]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "corpus.txt"
  path.write_text(" ".join(f"word{i % 37} and more{i % 11}." for i in range(6000)))
  return str(path)


def train(workdir, text_file, *extra, env=None, steps=4):
  command = [sys.executable, "-m", "decoderjax.train", f"--config={REPO}/configs/default.py",
             f"--workdir={workdir}", "--config.data.source=text", f"--config.data.path={text_file}",
             f"--config.train.steps={steps}", "--config.checkpoint.every_steps=3",
             "--config.checkpoint.async_save=False", *MODEL, *extra]  # fmt: skip
  result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def mesh_flags(data=1, fsdp=1, tensor=1):
  return [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
          f"--config.mesh.tensor={tensor}"]  # fmt: skip


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, text_file):
  workdir = tmp_path_factory.mktemp("one") / "w"
  return train(workdir, text_file), workdir


@pytest.fixture(scope="module")
def single_device_losses(single_device_run):
  return single_device_run[0]


def test_generation_and_evaluation_run_sharded(tmp_path, single_device_run):
  workdir = single_device_run[1]

  def run(binary, *extra, env=None):
    out = tmp_path / f"{binary}-{len(extra)}.json"
    command = [sys.executable, "-m", f"decoderjax.{binary}", f"--checkpoint={workdir}",
               f"--output_json={out}", *extra]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())

  greedy = ["--prompt=word1 and", "--prompt=more", "--temperature=0", "--max_new_tokens=12"]
  mesh = ["--mesh_data=2", "--mesh_tensor=2", "--mesh_fsdp=2"]
  assert run("generate", *greedy, *mesh, env=EIGHT) == run("generate", *greedy)
  text = tmp_path / "t.txt"
  text.write_text("word3 and more4. word5 and more6. " * 20)
  one = run("evaluate", f"--text_file={text}")
  eight = run("evaluate", f"--text_file={text}", *mesh, env=EIGHT)
  assert eight["tokens"] == one["tokens"]
  assert eight["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.parametrize(
  "mesh", [dict(data=8), dict(fsdp=8), dict(tensor=2, fsdp=4), dict(data=2, fsdp=2, tensor=2)]
)
def test_meshes_log_the_same_losses_as_one_device(tmp_path, text_file, single_device_losses, mesh):
  losses = train(tmp_path / "w", text_file, *mesh_flags(**mesh), env=EIGHT)
  assert sorted(losses) == [1, 2, 3, 4]
  for step, loss in single_device_losses.items():
    assert losses[step] == pytest.approx(loss, rel=1e-5)


def test_newer_families_options_train_alike_on_a_mesh(tmp_path, text_file):
  """Norms after each sublayer as well as before it (Gemma 2/3), q/k norms over all heads
  (OLMo 2), alternating sliding and global layers with their own RoPE bases (Gemma 3), a query
  scale: the same losses on a data x fsdp x tensor mesh as on one device."""
  options = ["--config.model.norm_placement=both", "--config.model.qk_norm=True",
             "--config.model.qk_norm_scope=all", "--config.model.sliding_window=8",
             "--config.model.global_every=2", "--config.model.local_rope_theta=100.0",
             "--config.model.attn_scale=0.3"]  # fmt: skip
  one = train(tmp_path / "one", text_file, *options, steps=3)
  mesh = train(tmp_path / "mesh", text_file, *options, *mesh_flags(2, 2, 2), env=EIGHT, steps=3)
  assert sorted(mesh) == [1, 2, 3]
  for step, loss in one.items():
    assert mesh[step] == pytest.approx(loss, rel=2e-4)


def test_seq2seq_trains_alike_on_a_mesh(tmp_path):
  """The cross-attention decoder and its encoder, sources in the batch: the same losses on a
  data x fsdp x tensor mesh as on one device."""
  lines = [f"word{i % 7} and more{i % 5} then word{i % 3}" for i in range(64)]
  with open(tmp_path / "pairs.jsonl", "w") as f:
    for line in lines:
      f.write(json.dumps({"source": line, "target": " ".join(reversed(line.split()))}) + "\n")

  def run(workdir, *extra, env=None):
    command = [sys.executable, "-m", "decoderjax.train",
               f"--config={REPO}/configs/seq2seq_shakespeare.py", f"--workdir={workdir}",
               "--config.data.source=jsonl", f"--config.data.path={tmp_path / 'pairs.jsonl'}",
               "--config.model.embed_dim=32", "--config.model.mlp_dim=64",
               "--config.train.steps=3", "--config.train.batch_size=8",
               "--config.train.log_every=1", "--config.eval.every_steps=0",
               "--config.train.sample_tokens=0", "--config.optimizer.warmup_steps=1",
               *extra]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}

  one = run(tmp_path / "one")
  mesh = run(tmp_path / "mesh", *mesh_flags(2, 2, 2), env=EIGHT)
  assert sorted(mesh) == [1, 2, 3]
  for step, loss in one.items():
    assert mesh[step] == pytest.approx(loss, rel=2e-4)


def test_checkpoint_restores_onto_another_mesh(tmp_path, text_file, single_device_losses):
  train(tmp_path / "w", text_file, *mesh_flags(fsdp=8), env=EIGHT, steps=3)
  resumed = train(tmp_path / "w", text_file, *mesh_flags(data=2, fsdp=2, tensor=2), env=EIGHT)
  assert resumed[4] == pytest.approx(single_device_losses[4], rel=1e-5)


SHARDING_CHECK = textwrap.dedent(
  """
  import jax, numpy as np
  from decoderjax.data.data_config import DataConfig
  from decoderjax.model.presets import get_preset
  from decoderjax.runtime import sharding
  from decoderjax.training import state as state_lib
  from decoderjax.training.experiment import Experiment, TrainConfig, EvalConfig, CheckpointConfig
  from decoderjax.training.optimizer import OptimizerConfig, make_optimizer
  from decoderjax.training.steps import LossConfig
  model = get_preset("tiny-llama", vocab_size=64, num_kv_heads=2)
  def state(**mesh):
    exp = Experiment(model, DataConfig(), OptimizerConfig(), LossConfig(), TrainConfig(),
                     EvalConfig(), CheckpointConfig(), sharding.MeshConfig(**mesh))
    m = sharding.make_mesh(exp.mesh)
    with jax.set_mesh(m):
      return state_lib.init_state(exp, make_optimizer(exp.optimizer, 10), m)[0]
  s = state(data=1, fsdp=8)
  up = s.params["layers"]["mlp"]["up"]
  print("SPEC", tuple(up.sharding.spec))
  total = sum(x.nbytes for x in jax.tree.leaves(s))
  first = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(s))
  print("RATIO", first / total)
  mu = s.opt_state[1][0].mu["layers"]["mlp"]["up"]
  print("MU_SPEC", tuple(mu.sharding.spec))
  t = state(data=2, fsdp=2, tensor=2)
  print("TP_SPEC", tuple(t.params["layers"]["attn"]["q"].sharding.spec))
  for bad in (dict(data=3), dict(data=1, tensor=8)):
    try:
      state(**bad)
    except ValueError as e:
      print("ERROR", e)
  """
)


def test_parameters_and_optimizer_state_are_sharded_as_declared():
  result = subprocess.run(
    [sys.executable, "-c", SHARDING_CHECK], capture_output=True, text=True, env=EIGHT, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
  assert out["SPEC"] == "(None, 'fsdp', 'tensor')"  # layers, embed -> fsdp, mlp -> tensor
  assert out["MU_SPEC"] == out["SPEC"]  # Adam moments sharded like their parameters
  assert float(out["RATIO"]) < 1 / 8 + 0.02  # per-device bytes ~ total / 8
  assert out["TP_SPEC"] == "(None, 'fsdp', 'tensor', None)"
  errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
  assert "= 3 devices, but there are 8 devices" in errors[0]
  assert "dimension 2 of size 2 does not divide over mesh axis tensor of size 8" in errors[1]


def test_bad_mesh_is_a_one_line_error(tmp_path, text_file):
  command = [sys.executable, "-m", "decoderjax.train", f"--config={REPO}/configs/default.py",
             f"--workdir={tmp_path}", "--config.data.source=text",
             f"--config.data.path={text_file}", *MODEL, *mesh_flags(data=3)]  # fmt: skip
  result = subprocess.run(command, capture_output=True, text=True, env=EIGHT, timeout=300)
  assert result.returncode == 1
  assert "but there are 8 devices" in result.stderr and "Traceback" not in result.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_checkpoint_and_resume(tmp_path, text_file):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

  def launch(steps):
    port = _free_port()
    procs = [
      subprocess.Popen(
        [
          sys.executable,
          "-m",
          "decoderjax.train",
          f"--config={REPO}/configs/default.py",
          f"--workdir={tmp_path / 'w'}",
          "--config.data.source=text",
          f"--config.data.path={text_file}",
          f"--config.train.steps={steps}",
          "--config.checkpoint.every_steps=2",
          *MODEL,
          *mesh_flags(data=2, fsdp=2),
          f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2",
          f"--process_id={i}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
      )  # fmt: skip
      for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "\n".join(
      f"process {i}: {err[-2000:]}" for i, (_, err) in enumerate(outs)
    )
    return outs

  launch(steps=2)
  outs = launch(steps=4)
  assert "resumed from" in outs[0][0] and "at step 2" in outs[0][0]
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4]


def test_local_multiprocess_launch_script(tmp_path, text_file):
  env = {**os.environ, "NUM_PROCESSES": "2", "DEVICES_PER_PROCESS": "1",
         "PYTHON": sys.executable, "LOG_DIR": str(tmp_path)}  # fmt: skip
  result = subprocess.run(
    ["bash", f"{REPO}/launch/local_multiprocess.sh", f"--config={REPO}/configs/default.py",
     f"--workdir={tmp_path / 'w'}", "--config.data.source=text",
     f"--config.data.path={text_file}", "--config.train.steps=2", *MODEL,
     *mesh_flags(data=2)],
    capture_output=True, text=True, env=env, timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step=2" in result.stdout
  assert (tmp_path / "process_1.log").exists()


def test_cpu_devices_auto_takes_one_per_core_that_the_batches_divide_over():
  assert sharding.devices_per_core(2, (12, 64)) == 2
  assert sharding.devices_per_core(16, (12, 64)) == 4  # gcd 4
  assert sharding.devices_per_core(8, (7,)) == 7
  assert sharding.devices_per_core(3, (16, 32)) == 2
  assert sharding.devices_per_core(1, (12,)) == 1
  gpt2 = get_preset("gpt2")  # 124M: its matmuls keep the cores busy in one device
  assert metrics.matmul_params(gpt2) > sharding.CPU_SPLIT_MAX_PARAMS
  assert sharding.devices_per_core(2, (12, 64), metrics.matmul_params(gpt2)) == 1
  assert sharding.devices_per_core(2, (12, 64), metrics.matmul_params(get_preset("tiny-gpt2"))) == 2
