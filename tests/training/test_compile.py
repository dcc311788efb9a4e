"""Ahead-of-time TPU compiles (libtpu, no TPU): steps, collectives, memory, FLOPs, bad input."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from jax.sharding import NamedSharding, PartitionSpec

from decoderjax.runtime import sharding, topology
from decoderjax.training import aot, experiment, hlo_stats, metrics

pytest.importorskip("libtpu")  # the test extra installs jax[tpu]


@pytest.fixture(autouse=True, scope="module")
def default_precision():
  """As a user compiles: conftest's float32 'highest' precision is no setting for bf16 Mosaic
  kernels (splash attention's matmuls refuse it)."""
  with jax.default_matmul_precision("default"):
    yield


TINY = dict(vocab_size=256, max_seq_len=128, dtype="bfloat16", scan_layers=True)


def tiny_experiment(**mesh):
  config = experiment.base_config("tiny-llama", **TINY)
  config.data.update(seq_len=128)
  config.train.update(batch_size=8)
  config.mesh.update(**mesh)
  return experiment.experiment_from_config(config, 256)


def compile_cli(*args):
  command = [sys.executable, "-m", "decoderjax.compile", f"--config={REPO}/configs/default.py",
             "--config.model.vocab_size=256", *args]  # fmt: skip
  return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def train_report():
  return aot.report(tiny_experiment(fsdp=2), "v5e:2x2", mode="train")


def test_train_step_compiles_for_a_slice_with_the_configs_mesh(train_report):
  r = train_report
  assert r.chips == 4 and r.mesh == {"data": 2, "fsdp": 2, "tensor": 1} and r.fits
  exp = tiny_experiment()
  assert r.model_flops == metrics.flops_per_token(exp.model, 128) * 8 * 128
  assert r.xla_flops > 0 and r.memory["temporaries"] > 0
  # Parameters (float32) and AdamW's two moments, sharded over fsdp.
  params = aot.abstract_params(exp.model, _cpu_mesh(), exp.mesh.rules)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert r.memory["parameters"] == pytest.approx(n * 4 / 2, rel=0.05)
  assert r.memory["optimizer_state"] == pytest.approx(2 * r.memory["parameters"], rel=0.05)
  assert "fsdp" in r.collectives["all-gather"]  # FSDP gathers weights per layer
  assert 0 < r.roofline["mfu_no_overlap"] <= r.roofline["mfu"] <= 1


def _cpu_mesh():
  return sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])


def test_the_program_for_a_tpu_mesh_calls_splash_attention(train_report):
  assert any(k.startswith("splash_mqa_fwd") for k in train_report.attention_kernels)
  assert any("dkv" in k for k in train_report.attention_kernels)  # its backward kernels too


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_generation_steps_compile_over_the_kv_cache(mode):
  r = aot.report(tiny_experiment(), "v5e:2x2", mode=mode, batch=4, prompt_len=64, max_new=64)
  assert r.fits and r.xla_flops > 0
  cfg = tiny_experiment().model
  tokens, context = (4 * 64, 64) if mode == "prefill" else (4, 128)
  assert r.model_flops == aot.forward_flops(cfg, tokens, context, causal=mode == "prefill")


def test_two_slices_join_over_dcn():
  r = aot.report(tiny_experiment(), "v5e:2x2", num_slices=2, mode="train")
  assert r.chips == 8 and r.mesh["data"] == 8 and r.fits
  assert r.roofline["dcn_bytes"] > 0  # the gradient exchange crosses slices
  assert any(row["dcn"] for rows in r.collectives.values() for row in rows.values())


def test_collectives_are_counted_with_bytes_axes_and_trip_counts():
  _, devices = topology.topology_devices("v5e:2x2")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2), devices)
  by = lambda *spec: NamedSharding(mesh, PartitionSpec(*spec))
  w = jax.ShapeDtypeStruct((3, 256, 512), jnp.bfloat16, sharding=by(None, "fsdp", None))
  x = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16, sharding=by("data", None))

  def layers(w_LDF, x_BD):
    def layer(y_BD, w_DF):  # an FSDP layer: gather the weight, then multiply
      w_DF = w_DF * (1 + jnp.mean(y_BD))  # depends on the loop: not gathered once, up front
      full = jax.lax.with_sharding_constraint(w_DF, NamedSharding(mesh, PartitionSpec()))
      return y_BD + jnp.tanh(y_BD @ full)[:, :256], None

    return jax.lax.scan(layer, x_BD, w_LDF)[0]

  hlo = jax.jit(layers).lower(w, x).compile().as_text()
  gathers = [c for c in hlo_stats.collectives(hlo, mesh) if c["kind"] == "all-gather"]
  assert sum(c["times"] for c in gathers) == 3  # once per layer of the loop
  assert {c["axes"] for c in gathers} == {"fsdp"} and {c["group"] for c in gathers} == {2}
  assert {c["bytes"] for c in gathers} == {256 * 512 * 2}  # the whole weight, bf16
  assert all(c["sent_bytes"] == 256 * 512 * 2 / 2 for c in gathers)


def test_a_model_too_large_for_the_chips_does_not_fit():
  config = experiment.base_config("llama-3.1-8b", dtype="bfloat16")
  config.data.update(seq_len=2048)
  config.train.update(batch_size=4)
  exp = experiment.experiment_from_config(config, 128256)
  r = aot.report(exp, "v5e:2x2", mode="train")
  assert not r.fits
  assert r.memory["parameters"] > 4 * 2**30  # 8B float32 parameters over 4 chips
  assert r.error or r.memory["total"] > r.hbm_bytes  # the compiler's figures either way


def test_topology_names():
  assert topology.parse_topology("v5e-256") == ("v5e", "v5e:16x16")
  assert topology.parse_topology("v5p-128") == ("v5p", "v5p:4x4x4")  # 128 TensorCores, 64 chips
  assert topology.parse_topology("v6e-64") == ("v6e", "v6e:8x8")
  assert topology.parse_topology("v4-32") == ("v4", "v4:2x2x4")
  assert topology.parse_topology("v5e:4x4") == ("v5e", "v5e:4x4")
  assert topology.parse_topology("h200:8") == ("h200", "1x1x8")  # GPUs, eight to a host
  assert topology.parse_topology("h100:16") == ("h100", "1x2x8")


def test_gpu_topologies_need_xla_target_config_and_the_cuda_plugin(tmp_path):
  with pytest.raises(ValueError, match="need --gpu_target_config=FILE"):
    topology.topology_devices("h200:8")
  try:
    import jax_plugins.xla_cuda12  # noqa: F401
  except ImportError:  # CI: no 5 GB CUDA wheels; the error says how to get them
    with pytest.raises(ImportError, match=r'pip install "jax\[cuda12\]=='):
      topology.topology_devices("h200:8", gpu_target_config=str(tmp_path / "h200.txtpb"))


def test_libtpu_missing_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)
  with pytest.raises(ImportError, match=r'pip install "jax\[tpu\]=='):
    topology.topology_devices("v5e:2x2")


@pytest.mark.parametrize(
  "args, message",
  [
    (["--topology=v7x-9"], "unknown topology 'v7x-9'; known: v4-8"),
    (["--topology=v5e:2x2", "--config.mesh.data=3"], "but there are 4 devices"),
    (
      ["--topology=v5e:2x2", "--config.mesh.tensor=4", "--config.model.mlp_dim=390"],
      "does not divide over mesh axis tensor",
    ),  # fmt: skip
  ],
)
def test_bad_input_is_one_line_error(args, message):
  result = compile_cli(*args)
  assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_the_binary_prints_the_report_and_writes_json(tmp_path):
  out = tmp_path / "r.json"
  result = compile_cli("--topology=v5e:2x2", "--config.mesh.fsdp=2", f"--output_json={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "train step on v5e:2x2 (4 chips)" in result.stdout and "projected MFU" in result.stdout
  import json

  report = json.loads(out.read_text())
  assert report["fits"] and report["mesh"]["fsdp"] == 2
  f = report["roofline"]
  assert np.isclose(f["step_s"], max(f["compute_s"], f["collective_s"], f["hbm_s"]))
