"""TRL's ``SFTTrainer`` on our kernels: patch the model, then build the trainer as usual.

    python examples/trl_sft.py

TRL >= 1.16 computes its loss from ``model(..., fused_lm_head=True)``; the patched model
answers that call with our fused kernels (TRL's own fused head, which the trainer adds in
``__init__``, is bypassed), with the trainer's options. ``patch_trainer(trainer)`` after
building it does the same.
"""
import tempfile

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import tiny
from fused_losses import patch_causal_lm

tokenizer, model = tiny.tokenizer(), tiny.model()
patch_causal_lm(model)

args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=6, per_device_train_batch_size=8,
                 learning_rate=3e-3, logging_steps=3, report_to=[], save_strategy="no",
                 use_cpu=True, seed=0)
trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                     train_dataset=Dataset.from_list(tiny.prompt_completions(32)))
trainer.train()
for entry in trainer.state.log_history[:-1]:
    print(f"step {entry['step']}: loss {entry['loss']:.4f}, "
          f"token accuracy {entry['mean_token_accuracy']:.3f}")
