"""Named model presets at the published sizes (GPT-2, Llama, Mistral, Qwen, Gemma, Phi-3,
OLMo 2)."""

from __future__ import annotations

from decoderjax.model.config import ModelConfig, RopeScaling

_GPT2 = dict(
  vocab_size=50257,
  max_seq_len=1024,
  position="learned",
  norm="layernorm",
  mlp="gelu",
  use_bias=True,
  tie_embeddings=True,
)


_LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu")


_QWEN = dict(**_LLAMA, vocab_size=151936, rope_theta=1_000_000.0, norm_eps=1e-6)


_GEMMA = dict(  # RMSNorm scaled by 1 + w, embeddings x sqrt(D), GeGLU, heads of 256
  position="rope", norm="rmsnorm", norm_eps=1e-6, norm_offset=True, mlp="geglu",
  embed_scale=True, head_dim=256,
)  # fmt: skip


_LLAMA31 = dict(  # what Llama-3.1's sizes share
  **_LLAMA,
  vocab_size=128256,
  max_seq_len=131072,
  num_kv_heads=8,
  rope_theta=500_000.0,
  rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
  tie_embeddings=False,
)


PRESETS: dict[str, ModelConfig] = {
  # Tiny shapes for tests and laptops.
  "tiny-gpt2": ModelConfig(
    **{**_GPT2, "vocab_size": 256, "max_seq_len": 128},
    num_layers=2,
    num_heads=4,
    embed_dim=64,
    mlp_dim=256,
  ),
  "tiny-llama": ModelConfig(
    **_LLAMA,
    vocab_size=256,
    max_seq_len=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    mlp_dim=128,
  ),
  # Published shapes.
  "gpt2": ModelConfig(**_GPT2, num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072),
  "gpt2-medium": ModelConfig(**_GPT2, num_layers=24, num_heads=16, embed_dim=1024, mlp_dim=4096),
  "smollm2-135m": ModelConfig(
    **_LLAMA,
    vocab_size=49152,
    max_seq_len=8192,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    embed_dim=576,
    mlp_dim=1536,
    rope_theta=100_000.0,
  ),
  "llama-3.2-1b": ModelConfig(
    **_LLAMA,
    vocab_size=128256,
    max_seq_len=131072,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=2048,
    mlp_dim=8192,
    rope_theta=500_000.0,
    rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
  ),
  "llama-3.1-8b": ModelConfig(
    **_LLAMA31, num_layers=32, num_heads=32, embed_dim=4096, mlp_dim=14336
  ),
  "llama-3.1-70b": ModelConfig(
    **_LLAMA31, num_layers=80, num_heads=64, embed_dim=8192, mlp_dim=28672
  ),
  "mistral-7b": ModelConfig(
    **_LLAMA,
    vocab_size=32000,
    max_seq_len=32768,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=4096,
    mlp_dim=14336,
    sliding_window=4096,
    tie_embeddings=False,
  ),
  "qwen2.5-0.5b": ModelConfig(
    **_QWEN,
    max_seq_len=32768,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    embed_dim=896,
    mlp_dim=4864,
    qkv_bias=True,
  ),
  "qwen3-0.6b": ModelConfig(
    **_QWEN,
    max_seq_len=40960,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    embed_dim=1024,
    mlp_dim=3072,
    qk_norm=True,
  ),
  "qwen3-8b": ModelConfig(
    **_QWEN,
    max_seq_len=40960,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    embed_dim=4096,
    mlp_dim=12288,
    qk_norm=True,
    tie_embeddings=False,
  ),
  "gemma-2b": ModelConfig(
    **_GEMMA,
    vocab_size=256000,
    max_seq_len=8192,
    num_layers=18,
    num_heads=8,
    num_kv_heads=1,
    embed_dim=2048,
    mlp_dim=16384,
  ),  # fmt: skip
  "gemma-2-2b": ModelConfig(
    **_GEMMA,
    vocab_size=256000,
    max_seq_len=8192,
    num_layers=26,
    num_heads=8,
    num_kv_heads=4,
    embed_dim=2304,
    mlp_dim=9216,
    norm_placement="both",
    sliding_window=4096,
    global_every=2,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
  ),  # fmt: skip
  "gemma-3-1b": ModelConfig(
    **_GEMMA,
    vocab_size=262144,
    max_seq_len=32768,
    num_layers=26,
    num_heads=4,
    num_kv_heads=1,
    embed_dim=1152,
    mlp_dim=6912,
    norm_placement="both",
    qk_norm=True,
    sliding_window=512,
    global_every=6,
    rope_theta=1_000_000.0,
    local_rope_theta=10_000.0,
  ),  # fmt: skip
  "phi-3-mini": ModelConfig(  # Phi-3-mini-4k: Llama-shaped (its q/k/v and gate/up come fused)
    **_LLAMA,
    vocab_size=32064,
    max_seq_len=4096,
    num_layers=32,
    num_heads=32,
    embed_dim=3072,
    mlp_dim=8192,
    sliding_window=2047,
    tie_embeddings=False,
  ),  # fmt: skip
  "olmo-2-1b": ModelConfig(  # norms after attention and the MLP; q/k norms over all heads
    **_LLAMA,
    vocab_size=100352,
    max_seq_len=4096,
    num_layers=16,
    num_heads=16,
    embed_dim=2048,
    mlp_dim=8192,
    rope_theta=500_000.0,
    norm_eps=1e-6,
    norm_placement="post",
    qk_norm=True,
    qk_norm_scope="all",
    tie_embeddings=False,
  ),  # fmt: skip
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """Returns the named preset, with `overrides` applied to its fields."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
