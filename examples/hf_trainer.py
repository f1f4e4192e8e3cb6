"""Hugging Face ``Trainer`` on a fused loss: patch the model before (or after) building it.

    python examples/hf_trainer.py

The Trainer calls ``model(**batch)`` with labels and, under gradient accumulation,
``num_items_in_batch``; the patched model returns the stock loss from the fused kernels,
computed inside its forward (so DDP and FSDP see it as the model's own).
"""
import tempfile

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import tiny
from fused_losses import patch_causal_lm

tokenizer, model = tiny.tokenizer(), tiny.model()
patch_causal_lm(model)

train = [tokenizer(text) for text in tiny.texts(32)]
args = TrainingArguments(
    output_dir=tempfile.mkdtemp(), max_steps=10, per_device_train_batch_size=4,
    gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=5, report_to=[],
    save_strategy="no", use_cpu=True, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=train,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
result = trainer.train()
print(f"final train loss {result.training_loss:.4f}")
assert torch.isfinite(torch.tensor(result.training_loss))
