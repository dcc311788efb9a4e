"""Instruction tuning (SFT) with LoRA adapters; the base model stays frozen.

  python -m decoderjax.train --config=configs/finetune_sft_lora.py --workdir=/tmp/ft_sft \
    --config.init_from=MODEL_DIR --config.data.path=train.jsonl --config.data.eval_path=val.jsonl

Records are {"prompt", "completion"} or chat {"messages": [...]} (rendered with the base model's
chat template); the loss covers completion / assistant tokens only. Each step's 8 examples are
packed, whole, into rows no longer than 512 tokens (docs/finetuning.md). The workdir holds only the
adapters; `python -m decoderjax.generate --checkpoint=WORKDIR` merges them on load and
`python -m decoderjax.convert --to=decoderjax --input=WORKDIR --output=DIR` writes a merged model.
"""

from decoderjax.training.experiment import finetune_base_config


def get_config():
  config = finetune_base_config(method="lora", task="sft")
  config.data.update(seq_len=512, pack=True)
  config.finetune.update(lora_rank=8, lora_alpha=16.0, lora_dropout=0.05, lora_targets="q,k,v,o")
  config.optimizer.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=20)
  return config
