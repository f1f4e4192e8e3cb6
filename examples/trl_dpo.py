"""TRL's ``DPOTrainer`` on our kernels, policy and reference alike.

    python examples/trl_dpo.py

``patch_trainer`` patches the trainer's policy and reference models after ``__init__``
(patching both models before building the trainer works too). Both must run the same
head: at step 0 the policy equals the reference, so the logged reward margin is exactly 0.
"""
import tempfile

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import tiny
from fused_losses.integrations import patch_trainer

tokenizer = tiny.tokenizer()
policy, reference = tiny.model(seed=0), tiny.model(seed=0)

args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=6, per_device_train_batch_size=4,
                 learning_rate=3e-3, beta=0.1, logging_steps=1, report_to=[],
                 save_strategy="no", use_cpu=True, seed=0)
trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                     train_dataset=Dataset.from_list(tiny.preferences(24)))
patch_trainer(trainer)
trainer.train()
history = trainer.state.log_history[:-1]
for entry in history:
    print(f"step {entry['step']}: loss {entry['loss']:.4f}, "
          f"margin {entry['rewards/margins']:+.4f}")
assert history[0]["rewards/margins"] == 0.0, "policy and reference must start equal"
