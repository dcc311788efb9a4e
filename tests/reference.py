"""An independent float64 NumPy forward pass of the decoder, written from the papers' equations.

It shares no code with decoderjax.model: loops over heads and positions instead of einsums, so a
mistake in the vectorized model (masks, GQA grouping, RoPE layout, norms) shows up as a mismatch.
"""

import math

import numpy as np


def _norm(x, p, cfg):
  if cfg.norm == "layernorm":
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.norm_eps) * p["scale"] + p.get("bias", 0)
  scale = 1 + p["scale"] if cfg.norm_offset else p["scale"]
  return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * scale


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _rope(x, pos, cfg):  # x [H] for one head at one position
  h = x.shape[-1]
  out = np.empty_like(x)
  for i in range(h // 2):
    freq = cfg.rope_theta ** (-2 * i / h)
    a = pos * freq
    out[i] = x[i] * math.cos(a) - x[i + h // 2] * math.sin(a)
    out[i + h // 2] = x[i + h // 2] * math.cos(a) + x[i] * math.sin(a)
  return out


def forward(params, cfg, tokens, segments=None):
  """tokens [T] (one sequence) -> logits [T, V]; segments [T] restart positions per document."""
  p = {k: np.asarray(v, np.float64) if not isinstance(v, dict) else v for k, v in params.items()}
  t_len = len(tokens)
  segments = np.ones(t_len, int) if segments is None else np.asarray(segments)
  pos = np.array([sum(segments[j] == segments[i] for j in range(i)) for i in range(t_len)])
  x = np.asarray(p["embedding"])[tokens]
  if cfg.embed_scale:
    x = x * math.sqrt(cfg.embed_dim)
  if cfg.position == "learned":
    x = x + np.asarray(p["position_embedding"])[pos]
  elif cfg.position == "sinusoidal":
    pe = np.zeros((t_len, cfg.embed_dim))
    for i in range(0, cfg.embed_dim, 2):
      pe[:, i] = np.sin(pos / 10000 ** (i / cfg.embed_dim))
      pe[:, i + 1] = np.cos(pos / 10000 ** (i / cfg.embed_dim))
    x = x + pe
  n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
  f64 = lambda tree: {
    a: np.asarray(b, np.float64) for a, b in tree.items() if not isinstance(b, dict)
  }  # the arrays of one level (attn/q_norm, a module of its own, is read on its own)
  for layer in range(cfg.num_layers):
    attn = f64(params[f"layers_{layer}"]["attn"])
    mlp = f64(params[f"layers_{layer}"]["mlp"])
    hx = _norm(x, f64(params[f"layers_{layer}"]["attn_norm"]), cfg)
    q = np.einsum("td,dnh->tnh", hx, attn["q"])
    kk = np.einsum("td,dnh->tnh", hx, attn["k"])
    v = np.einsum("td,dnh->tnh", hx, attn["v"])
    if "q_bias" in attn:
      q, kk, v = q + attn["q_bias"], kk + attn["k_bias"], v + attn["v_bias"]
    if cfg.qk_norm:  # Qwen3: each head's query and key vectors normalized over their H dims
      raw = params[f"layers_{layer}"]["attn"]
      q, kk = _norm(q, f64(raw["q_norm"]), cfg), _norm(kk, f64(raw["k_norm"]), cfg)
    out = np.zeros((t_len, n, h))
    for head in range(n):
      kv_head = head // (n // k)
      for i in range(t_len):
        qi = q[i, head]
        if cfg.position == "rope":
          qi = _rope(qi, pos[i], cfg)
        scores, values = [], []
        for j in range(i + 1):
          if segments[j] != segments[i]:
            continue
          if cfg.sliding_window is not None and pos[i] - pos[j] >= cfg.sliding_window:
            continue
          kj = kk[j, kv_head]
          if cfg.position == "rope":
            kj = _rope(kj, pos[j], cfg)
          s = qi @ kj / math.sqrt(h)
          if cfg.attn_logit_softcap:
            s = cfg.attn_logit_softcap * math.tanh(s / cfg.attn_logit_softcap)
          scores.append(s)
          values.append(v[j, kv_head])
        w = np.exp(np.array(scores) - max(scores))
        out[i, head] = (w / w.sum()) @ np.array(values)
    y = np.einsum("tnh,nhd->td", out, attn["o"])
    if "o_bias" in attn:
      y = y + attn["o_bias"]
    x = x + y
    hx = _norm(x, f64(params[f"layers_{layer}"]["mlp_norm"]), cfg)
    up = hx @ mlp["up"] + mlp.get("up_bias", 0)
    if cfg.mlp == "gelu":
      act = _gelu(up)
    else:
      gate = hx @ mlp["gate"]
      act = (gate / (1 + np.exp(-gate)) if cfg.mlp == "swiglu" else _gelu(gate)) * up
    x = x + act @ mlp["down"] + mlp.get("down_bias", 0)
  x = _norm(x, f64(params["final_norm"]), cfg)
  head = np.asarray(p["embedding"]).T if cfg.tie_embeddings else np.asarray(p["head"])
  logits = x @ head
  if cfg.final_logit_softcap:
    logits = cfg.final_logit_softcap * np.tanh(logits / cfg.final_logit_softcap)
  return logits
