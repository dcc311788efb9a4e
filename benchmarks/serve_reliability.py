"""Serving under abuse: requests from many concurrent clients, one in eight malformed and one in
eight dropping its connection mid-stream. Exits 1 unless every well-formed request gets the
same complete answer it gets alone, every malformed one a 4xx in OpenAI's envelope, the server's
resident memory after the run is within 5% of before it, and /health still answers.

  python benchmarks/serve_reliability.py --checkpoint=DIR [--requests=256] [--clients=64]
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

MALFORMED = [
  {"temperature": -1.0},
  {"top_p": 0.0},
  {"bogus_field": 1},
  {"model": "no-such-model"},
  {"max_tokens": 1_000_000},
]


def rss_bytes(pid: int) -> int:
  with open(f"/proc/{pid}/status") as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
  return kb * 1024


def start_server(checkpoint: str, *flags):
  """A server in a subprocess (its output in a log file), once /health answers -> (proc, url)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  command = [sys.executable, "-m", "decoderjax.serve", f"--checkpoint={checkpoint}",
             f"--port={port}", "--served_model_name=m", *flags]  # fmt: skip
  log = tempfile.NamedTemporaryFile("w+", prefix="decoderjax-serve-", suffix=".log", delete=False)
  proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    try:
      if httpx.get(f"{url}/health", timeout=2).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      time.sleep(0.2)
  proc.kill()
  with open(log.name) as f:
    raise RuntimeError(f"the server did not start:\n{f.read()[-3000:]}")


def body(prompt: str, max_tokens: int, **extra) -> dict:
  return {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


async def answer(client, payload: dict) -> str:
  r = await client.post("/v1/completions", json=payload)
  r.raise_for_status()
  return r.json()["choices"][0]["text"]


async def streamed(client, payload: dict, drop_after: int = 0) -> str | None:
  """The joined text of a streamed completion; None when it drops the connection early."""
  text, seen = "", 0
  async with client.stream("POST", "/v1/completions", json={**payload, "stream": True}) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      seen += 1
      if drop_after and seen >= drop_after:
        return None  # leaving the block closes the connection mid-stream
      text += json.loads(line[6:])["choices"][0]["text"]
  return text


async def storm(url: str, prompts: list[str], expected: dict, n: int, clients: int, new: int):
  """n requests over `clients` concurrent clients -> counts by outcome; raises on a wrong one."""
  counts = {"answered": 0, "streamed": 0, "malformed": 0, "dropped": 0}
  limits = httpx.Limits(max_connections=clients)

  async def one(client, i):
    prompt = prompts[i % len(prompts)]
    if i % 8 == 3:
      payload = {**body(prompt, new), **MALFORMED[i // 8 % len(MALFORMED)]}
      r = await client.post("/v1/completions", json=payload)
      assert 400 <= r.status_code < 500 and "message" in r.json()["error"], (r.status_code, r.text)
      counts["malformed"] += 1
    elif i % 8 == 5:
      assert await streamed(client, body(prompt, new), drop_after=2) is None
      counts["dropped"] += 1
    elif i % 2:
      assert await streamed(client, body(prompt, new)) == expected[prompt], prompt
      counts["streamed"] += 1
    else:
      assert await answer(client, body(prompt, new)) == expected[prompt], prompt
      counts["answered"] += 1

  async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
    queue = list(range(n))

    async def worker():
      while queue:
        await one(client, queue.pop())

    await asyncio.gather(*(worker() for _ in range(clients)))
  return counts


async def expected_answers(url: str, prompts: list[str], new: int) -> dict:
  async with httpx.AsyncClient(base_url=url, timeout=600) as client:
    return {p: await answer(client, body(p, new)) for p in prompts}


def run(checkpoint: str, requests: int, clients: int, new: int = 24, slots: int = 8,
        max_len: int = 128) -> dict:  # fmt: skip
  """Starts a server on `checkpoint` (`max_len` tokens per slot), storms it, checks it; returns
  the figures."""
  proc, url = start_server(
    checkpoint, f"--slots={slots}", f"--max_queue={requests}", f"--max_seq_len={max_len}"
  )
  try:
    prompts = ["ROMEO.", "To be, or not", "Friends, Romans", "What light", "JULIET:", "O", "Now",
               "Good morrow"]  # fmt: skip
    expected = asyncio.run(expected_answers(url, prompts, new))
    asyncio.run(storm(url, prompts, expected, min(requests, 32), min(clients, 8), new))  # warm
    before = rss_bytes(proc.pid)
    start = time.perf_counter()
    counts = asyncio.run(storm(url, prompts, expected, requests, clients, new))
    wall = time.perf_counter() - start
    time.sleep(1.0)  # dropped streams' slots are freed at the engine's next step
    health = httpx.get(f"{url}/health", timeout=10).json()
    after = rss_bytes(proc.pid)
    assert health["status"] == "ok" and health["active"] == 0 and health["queued"] == 0, health
    growth = after / before - 1
    assert growth < 0.05, f"resident memory grew {growth:.1%} ({before:,} -> {after:,} bytes)"
    return {**counts, "wall_s": wall, "rss_before": before, "rss_after": after, "growth": growth}
  finally:
    proc.terminate()
    proc.wait(120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--requests", type=int, default=256)
  parser.add_argument("--clients", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=24)
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--max_seq_len", type=int, default=128, help="tokens per slot")
  args = parser.parse_args()
  if not os.path.isdir(args.checkpoint):
    sys.exit(f"error: --checkpoint={args.checkpoint} is not a directory")
  result = run(args.checkpoint, args.requests, args.clients, args.new_tokens, args.slots,
               args.max_seq_len)  # fmt: skip
  print(json.dumps(result, indent=2))
  print(f"ok: {args.requests} requests from {args.clients} clients in {result['wall_s']:.1f}s; "
        f"resident memory {result['growth']:+.1%}")  # fmt: skip


if __name__ == "__main__":
  main()
