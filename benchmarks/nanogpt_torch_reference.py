"""nanoGPT's CPU recipe re-implemented in PyTorch, scored with decoderjax's validation estimator.

An independent reference for `nanogpt_cpu_recipe.py`: the same GPT (LayerNorm without bias, GELU
MLP, learned positions, tied head, N(0, 0.02) init with 0.02/sqrt(2L) on residual projections),
the same AdamW groups (decay on matrices and embeddings), warmup + cosine schedule and random
training windows as nanoGPT's train.py, written from its description. Validation loss is the mean
over every consecutive block-64 window of the last 10% (decoderjax's estimator), and also
nanoGPT's own estimate (20 random batches), so the two projects' figures can be compared.

  python benchmarks/nanogpt_torch_reference.py --data=../shared/data/tinyshakespeare.txt

The shape flags (--layers, --heads, --width, --block, --batch, --dropout) give other nanoGPT
configs, e.g. the "baby GPT" of benchmarks/train_memory.py.
"""

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional


class Block(nn.Module):
  def __init__(self, width, heads, dropout=0.0):
    super().__init__()
    self.heads, self.dropout = heads, dropout
    self.drop = nn.Dropout(dropout)
    self.ln1 = nn.LayerNorm(width, bias=False)
    self.qkv = nn.Linear(width, 3 * width, bias=False)
    self.out = nn.Linear(width, width, bias=False)
    self.ln2 = nn.LayerNorm(width, bias=False)
    self.up = nn.Linear(width, 4 * width, bias=False)
    self.down = nn.Linear(4 * width, width, bias=False)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
    q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
    p = self.dropout if self.training else 0.0
    y = functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    x = x + self.drop(self.out(y.transpose(1, 2).reshape(b, t, d)))
    return x + self.drop(self.down(functional.gelu(self.up(self.ln2(x)))))


class GPT(nn.Module):
  def __init__(self, vocab, block, layers, heads, width, dropout=0.0):
    super().__init__()
    self.tok = nn.Embedding(vocab, width)
    self.pos = nn.Embedding(block, width)
    self.drop = nn.Dropout(dropout)
    self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
    self.ln_f = nn.LayerNorm(width, bias=False)
    self.head = nn.Linear(width, vocab, bias=False)
    self.head.weight = self.tok.weight  # tied
    for name, p in self.named_parameters():
      if p.dim() == 2:
        std = 0.02 / math.sqrt(2 * layers) if name.endswith(("out.weight", "down.weight")) else 0.02
        nn.init.normal_(p, std=std)

  def forward(self, idx, targets):
    x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))
    for block in self.blocks:
      x = block(x)
    logits = self.head(self.ln_f(x))
    return functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=1337)
  parser.add_argument("--json")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--block", type=int, default=64)
  parser.add_argument("--batch", type=int, default=12)
  parser.add_argument("--dropout", type=float, default=0.0)
  parser.add_argument("--no_eval", action="store_true", help="train steps only (memory runs)")
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  text = open(args.data, encoding="utf-8").read()
  chars = sorted(set(text))
  ids = np.array([chars.index(c) for c in text], dtype=np.int64)
  cut = int(0.9 * len(ids))
  train, val = torch.from_numpy(ids[:cut]), torch.from_numpy(ids[cut:])
  block, batch, lr, min_lr, warmup = args.block, args.batch, 1e-3, 1e-4, min(100, args.steps // 2)

  def get_batch(split):
    starts = torch.randint(len(split) - block, (batch,))
    return (
      torch.stack([split[s : s + block] for s in starts]),
      torch.stack([split[s + 1 : s + 1 + block] for s in starts]),
    )

  def lr_at(it):
    if it < warmup:
      return lr * (it + 1) / (warmup + 1)
    ratio = (it - warmup) / (args.steps - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)

  model = GPT(len(chars), block, args.layers, args.heads, args.width, args.dropout)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW(
    [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
    lr=lr,
    betas=(0.9, 0.99),
  )
  times = []
  for it in range(args.steps):
    start = time.perf_counter()
    for group in opt.param_groups:
      group["lr"] = lr_at(it)
    x, y = get_batch(train)
    loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    loss.item()
    times.append(time.perf_counter() - start)

  if args.no_eval:
    print(json.dumps({"ms_per_iter_median": 1000 * statistics.median(times[1:] or times)}))
    return
  model.eval()
  with torch.no_grad():
    n = (len(val) - 1) // block
    windows = torch.stack([val[i * block : i * block + block + 1] for i in range(n)])
    losses = [model(w[:, :-1], w[:, 1:]).item() for w in windows.split(64)]
    sizes = [len(w) for w in windows.split(64)]
    full = sum(v * s for v, s in zip(losses, sizes, strict=True)) / sum(sizes)
    nanogpt = statistics.mean(model(*get_batch(val)).item() for _ in range(20))
  result = {
    "val_loss_full": full,
    "val_loss_nanogpt_estimate": nanogpt,
    "ms_per_iter_median": 1000 * statistics.median(times[100:]),
  }
  print(json.dumps(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
