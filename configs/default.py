"""The quick-start model: a small char-level Llama-style decoder on the embedded Shakespeare corpus.

About 3 minutes on a 2-core CPU (validation loss about 1.6):
  python -m decoderjax.train --config=configs/default.py --workdir=/tmp/decoderjax
"""

from decoderjax.training.experiment import base_config


def get_config():
  config = base_config(
    "tiny-llama",
    vocab_size=0,  # the tokenizer's
    max_seq_len=128,  # the rows it trains on: generation slides its window past them
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    embed_dim=128,
    mlp_dim=384,
    scan_layers=False,  # 4 layers: unrolled runs faster on CPU and still compiles in seconds
  )
  config.data.update(source="default", path="", tokenizer="char", seq_len=128, val_fraction=0.05)
  config.optimizer.update(
    name="adamw",
    learning_rate=2e-3,
    end_learning_rate=2e-4,
    schedule="cosine",
    warmup_steps=100,
    weight_decay=0.1,
    clip_norm=1.0,
  )
  config.loss.update(z_loss=0.0, label_smoothing=0.0, grad_accum_steps=1)
  config.train.update(
    steps=1000,
    batch_size=16,
    seed=0,
    log_every=100,
    sample_every=0,
    sample_prompt="ROMEO.",
    sample_tokens=250,
    on_nonfinite="stop",
    peak_flops=0.0,
  )
  config.eval.update(every_steps=500, max_batches=20, batch_size=32)
  config.checkpoint.update(every_steps=500, keep=2, keep_best=True, async_save=True)
  return config
