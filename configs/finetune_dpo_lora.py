"""Preference tuning (DPO) with LoRA adapters: the reference model is the frozen base itself
(the adapters switched off), so no second copy of the weights is held.

  python -m decoderjax.train --config=configs/finetune_dpo_lora.py --workdir=/tmp/ft_dpo \
    --config.init_from=MODEL_DIR --config.data.path=pairs.jsonl

Records are {"prompt", "chosen", "rejected"} texts, or chats {"chosen": [messages], "rejected":
[messages]} rendered with the base model's chat template; the loss covers the responses only.
`--config.loss.preference=ipo|simpo|orpo` picks another loss, `--config.loss.beta` its strength
(docs/finetuning.md#preference-tuning).
"""

from decoderjax.training.experiment import finetune_base_config


def get_config():
  config = finetune_base_config(method="lora", task="preference")
  config.data.update(seq_len=512, pack=True)
  config.finetune.update(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="q,k,v,o")
  config.optimizer.update(learning_rate=5e-4, end_learning_rate=5e-5, warmup_steps=10)
  config.loss.update(preference="dpo", beta=0.1)
  return config
