"""An independent float64 NumPy forward pass of the decoder, written from the papers' equations.

It shares no code with decoderjax.model.decoder: loops over heads and positions instead of
einsums, so a mistake in the vectorized model (masks, GQA grouping, RoPE layout, norms) shows
up as a mismatch.
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


def _rope(x, pos, theta):  # x [H] for one head at one position
  h = x.shape[-1]
  out = np.empty_like(x)
  for i in range(h // 2):
    freq = theta ** (-2 * i / h)
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
  pre, post = cfg.norm_placement in ("pre", "both"), cfg.norm_placement in ("post", "both")
  for layer in range(cfg.num_layers):
    norms = {name: f64(tree) for name, tree in params[f"layers_{layer}"].items() if "norm" in name}
    attn = f64(params[f"layers_{layer}"]["attn"])
    mlp = f64(params[f"layers_{layer}"]["mlp"])
    # Gemma 2/3: layer i is global when it is listed in global_layers or (i + 1) is a multiple of
    # global_every, else it slides (with its own RoPE base, Gemma 3); with neither every layer
    # slides (Mistral).
    window = cfg.sliding_window
    if layer in cfg.global_layers or (cfg.global_every and (layer + 1) % cfg.global_every == 0):
      window = None
    theta = cfg.local_rope_theta if window is not None and cfg.local_rope_theta else cfg.rope_theta
    scale = cfg.attn_scale if cfg.attn_scale is not None else 1 / math.sqrt(h)
    hx = _norm(x, norms["attn_norm"], cfg) if pre else x
    q = np.einsum("td,dnh->tnh", hx, attn["q"])
    kk = np.einsum("td,dnh->tnh", hx, attn["k"])
    v = np.einsum("td,dnh->tnh", hx, attn["v"])
    if "q_bias" in attn:
      q, kk, v = q + attn["q_bias"], kk + attn["k_bias"], v + attn["v_bias"]
    raw = params[f"layers_{layer}"]["attn"]
    if cfg.qk_norm and cfg.qk_norm_scope == "head":  # Qwen3: over each head's H dims
      q, kk = _norm(q, f64(raw["q_norm"]), cfg), _norm(kk, f64(raw["k_norm"]), cfg)
    elif cfg.qk_norm:  # OLMo 2: over the whole projection, all heads together
      q = _norm(q.reshape(t_len, n * h), f64(raw["q_norm"]), cfg).reshape(t_len, n, h)
      kk = _norm(kk.reshape(t_len, k * h), f64(raw["k_norm"]), cfg).reshape(t_len, k, h)
    out = np.zeros((t_len, n, h))
    for head in range(n):
      kv_head = head // (n // k)
      for i in range(t_len):
        qi = q[i, head]
        if cfg.position == "rope":
          qi = _rope(qi, pos[i], theta)
        scores, values = [], []
        for j in range(i + 1):
          if segments[j] != segments[i]:
            continue
          if window is not None and pos[i] - pos[j] >= window:
            continue
          kj = kk[j, kv_head]
          if cfg.position == "rope":
            kj = _rope(kj, pos[j], theta)
          s = qi @ kj * scale
          if cfg.attn_logit_softcap:
            s = cfg.attn_logit_softcap * math.tanh(s / cfg.attn_logit_softcap)
          scores.append(s)
          values.append(v[j, kv_head])
        w = np.exp(np.array(scores) - max(scores))
        out[i, head] = (w / w.sum()) @ np.array(values)
    y = np.einsum("tnh,nhd->td", out, attn["o"])
    if "o_bias" in attn:
      y = y + attn["o_bias"]
    x = x + (_norm(y, norms["attn_post_norm"], cfg) if post else y)
    hx = _norm(x, norms["mlp_norm"], cfg) if pre else x
    up = hx @ mlp["up"] + mlp.get("up_bias", 0)
    if cfg.mlp == "gelu":
      act = _gelu(up)
    else:
      gate = hx @ mlp["gate"]
      act = (gate / (1 + np.exp(-gate)) if cfg.mlp == "swiglu" else _gelu(gate)) * up
    y = act @ mlp["down"] + mlp.get("down_bias", 0)
    x = x + (_norm(y, norms["mlp_post_norm"], cfg) if post else y)
  x = _norm(x, f64(params["final_norm"]), cfg)
  head = np.asarray(p["embedding"]).T if cfg.tie_embeddings else np.asarray(p["head"])
  logits = x @ head
  if cfg.final_logit_softcap:
    logits = cfg.final_logit_softcap * np.tanh(logits / cfg.final_logit_softcap)
  return logits
