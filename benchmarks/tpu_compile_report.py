"""Ahead-of-time compile reports for real TPU topologies, no TPU needed (libtpu on a CPU host).

  pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"
  python benchmarks/tpu_compile_report.py --json=tpu.json --markdown=tpu.md
  python benchmarks/tpu_compile_report.py --rows=llama1b-v5e-16 --remat=dots_no_batch

Each row compiles decoderjax's real train step (bf16 compute, float32 parameters and AdamW
state, FSDP over every chip unless the row says otherwise) for a slice through
`decoderjax.training.aot.report`, in its own process, and prints bytes per chip, collective
bytes, the roofline step time and the MFU it projects beside MaxText's published figure for the
nearest configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# name: preset, topology, slices, sequence, global batch, remat, mesh, MaxText anchor
ROWS = {
  "llama1b-v5e-16": ("llama-3.2-1b", "v5e-16", 1, 2048, 32, "full", dict(fsdp=16), None),
  "llama1b-v5e-256": ("llama-3.2-1b", "v5e-256", 1, 2048, 512, "full", dict(fsdp=256), None),
  "llama8b-v5p-64": ("llama-3.1-8b", "v5p-64", 1, 8192, 32, "full", dict(fsdp=32), None),
  "llama8b-v6e-256": ("llama-3.1-8b", "v6e-256", 1, 8192, 256, "full", dict(fsdp=256),
                      "Llama-3.1-8B, 256 v6e: 45.5%"),
  "mistral7b-v5p-128": ("mistral-7b", "v5p-128", 1, 8192, 64, "full", dict(fsdp=64),
                        "32B on v5p: 71.5%"),
  "llama70b-v5p-512": ("llama-3.1-70b", "v5p-512", 1, 4096, 256, "full", dict(fsdp=256),
                       "Llama-2-70B, 512 v5p: 65.4%"),
  "llama70b-2xv5p-256": ("llama-3.1-70b", "v5p-256", 2, 4096, 256, "full",
                         dict(fsdp=128, dcn_data=2), "Llama-2-70B, 512 v5p: 65.4%"),
}  # fmt: skip

CHILD = """
import json, sys
import jax
from decoderjax.training import aot, experiment
preset, topology, slices, seq, batch, remat, mesh = json.loads(sys.argv[1])
config = experiment.base_config(preset, dtype="bfloat16", remat=remat, max_seq_len=seq)
config.data.update(seq_len=seq)
config.train.update(batch_size=batch)
config.mesh.update(data=1, **mesh)
exp = experiment.experiment_from_config(config, 0)
with jax.default_matmul_precision("default"):
  report = aot.report(exp, topology, slices, "train")
print(json.dumps(report.to_dict()))
"""


def run(name: str, remat: str | None) -> dict:
  preset, topology, slices, seq, batch, row_remat, mesh, anchor = ROWS[name]
  args = [preset, topology, slices, seq, batch, remat or row_remat, mesh]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
         "TPU_SKIP_MDS_QUERY": "1"}  # fmt: skip
  out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True,
                       text=True, env=env)  # fmt: skip
  if out.returncode:
    raise RuntimeError(f"{name}: {out.stderr[-3000:]}")
  report = json.loads(out.stdout.strip().splitlines()[-1])
  return {"row": name, "preset": preset, "seq": seq, "batch": batch, "remat": args[5],
          "slices": slices, "anchor": anchor, **report}  # fmt: skip


GiB = 1 << 30


def markdown(rows: list[dict]) -> str:
  lines = [
    "| model | topology | mesh | batch x seq | remat | GiB per chip: params / opt / temp / "
    "total (HBM) | collectives sent per chip | roofline step | projected MFU (serial-overlapped)"
    " | MaxText |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    m, f = r["memory"], r["roofline"]
    mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1)
    topo = r["topology"] if r["slices"] == 1 else f"{r['slices']} x {r['topology']}"
    parts = ("parameters", "optimizer_state", "temporaries", "total")
    mem = " / ".join(f"{m.get(k, 0) / GiB:.2f}" for k in parts)
    head = f"| {r['preset']} | {topo} | {mesh} | {r['batch']}x{r['seq']} | {r['remat']} | {mem} "
    head += f"({r['hbm_bytes'] / GiB:.0f}){' DOES NOT FIT' if not r['fits'] else ''} |"
    if not f:
      lines.append(f"{head} | | | {r['anchor'] or '-'} |")
      continue
    sent = f"ICI {f['ici_bytes'] / GiB:.2f} GiB"
    if f["dcn_bytes"]:
      sent += f", DCN {f['dcn_bytes'] / GiB:.2f} GiB"
    lines.append(
      f"{head} {sent} | {f['step_s']:.2f} s ({f['bound']}) | "
      f"{100 * f['mfu_no_overlap']:.1f}-{100 * f['mfu']:.1f}% | {r['anchor'] or '-'} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
  parser.add_argument("--remat", default=None, help="override every row's remat policy")
  parser.add_argument("--json", default="")
  parser.add_argument("--markdown", default="")
  args = parser.parse_args()
  rows = []
  for name in args.rows.split(","):
    rows.append(run(name, args.remat))
    r = rows[-1]
    summary = {k: r[k] for k in ("row", "fits", "mesh", "roofline")}
    print(json.dumps({**summary, "total_gib": r["memory"].get("total", 0) / GiB}), flush=True)
  table = markdown(rows)
  print(table)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  main()
