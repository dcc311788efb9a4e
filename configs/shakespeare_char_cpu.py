"""nanoGPT's CPU recipe for char-level Shakespeare: 4 layers, 4 heads, width 128, block 64.

nanoGPT documents validation loss 1.88 after 2,000 iterations of batch 12 (lr 1e-3 -> 1e-4,
dropout 0) on tiny Shakespeare. Same recipe and parameter count, with our default decoder block
(RoPE, RMSNorm, SwiGLU); `benchmarks/nanogpt_cpu_recipe.py` also runs nanoGPT's GPT-2 block.
  python -m decoderjax.train --config=configs/shakespeare_char_cpu.py --workdir=/tmp/char \
    --config.data.source=text --config.data.path=tinyshakespeare.txt
Without a data path it trains on the embedded Shakespeare corpus.
"""

from decoderjax.training.experiment import base_config


def get_config():
  config = base_config(
    "tiny-gpt2",
    vocab_size=0,  # the tokenizer's
    max_seq_len=64,
    num_layers=4,
    num_heads=4,
    embed_dim=128,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    mlp_dim=344,  # 3 x 128 x 344 ~ GPT-2's 2 x 128 x 512 MLP parameters
    use_bias=False,
    scan_layers=False,  # 4 layers: the unrolled step runs faster on CPU
  )
  config.data.update(source="default", path="", tokenizer="char", seq_len=64, val_fraction=0.1)
  config.optimizer.update(
    name="adamw",
    learning_rate=1e-3,
    end_learning_rate=1e-4,
    schedule="cosine",
    warmup_steps=100,
    b1=0.9,
    b2=0.99,
    weight_decay=0.1,
    clip_norm=1.0,
  )
  config.loss.update(z_loss=0.0, label_smoothing=0.0, grad_accum_steps=1)
  config.train.update(
    steps=2000,
    batch_size=12,
    seed=0,
    log_every=100,
    sample_every=0,
    sample_prompt="",
    sample_tokens=300,
    on_nonfinite="stop",
    peak_flops=0.0,
  )
  config.eval.update(every_steps=500, max_batches=0, batch_size=64)
  config.checkpoint.update(every_steps=1000, keep=2, keep_best=True, async_save=True)
  return config
