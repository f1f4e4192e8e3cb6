"""Trainers step by step: HF ``Trainer`` on a patched model equals the stock model; TRL's
``SFTTrainer`` and ``DPOTrainer`` on our head equal TRL's own head, patched before the
trainer is built or after (``patch_trainer``), with and without bf16 autocast."""
import sys
from pathlib import Path

import pytest
import torch

from fused_losses import patch_causal_lm
from fused_losses.integrations import patch_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import tiny  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 3


def _head_calls(model):
    """Counts calls of the model's output embedding: TRL's own head never calls it."""
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    return calls


def _logged(trainer, keys):
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == STEPS
    return {key: torch.tensor([entry[key] for entry in history]) for key in keys}


def _compare(got, want, rtol, atol=1e-6):
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{key}: {m}")


def _common(tmp_path, name, **extra):
    # TRL's configs default to bf16 autocast where the CPU has it; the head comparisons run
    # in float32 (the bf16 test below asks for it).
    return {**dict(output_dir=str(tmp_path / name), max_steps=STEPS, learning_rate=1e-2,
                   logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                   bf16=False), **extra}


def test_hf_trainer_equals_the_stock_model(tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = tiny.tokenizer()
    train = [tokenizer(text) for text in tiny.texts(24)]
    runs = {}
    for name in ("stock", "patched"):
        model = tiny.model().double()
        if name == "patched":
            patch_causal_lm(model)
            calls = _head_calls(model)
        args = TrainingArguments(**_common(tmp_path, name, per_device_train_batch_size=4,
                                           gradient_accumulation_steps=2, optim="sgd",
                                           learning_rate=0.5))
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer.train()
        runs[name] = (_logged(trainer, ("loss", "grad_norm")), model)
    assert calls
    # The stock loss rounds float64 logits to float32 (HF's logits.float()); ours stays in
    # float64: SGD (not AdamW, whose normalised steps magnify rounding in tiny gradients)
    # keeps the weights within that rounding.
    _compare(runs["patched"][0], runs["stock"][0], rtol=1e-6)
    for (name, p), q in zip(runs["patched"][1].named_parameters(),
                            runs["stock"][1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")


def _sft(tmp_path, name, order):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = tiny.model()
    if order == "before":
        patch_causal_lm(model)
    args = SFTConfig(**_common(tmp_path, name, per_device_train_batch_size=8))
    trainer = SFTTrainer(model=model, args=args, processing_class=tiny.tokenizer(),
                         train_dataset=Dataset.from_list(tiny.prompt_completions(24)))
    if order == "after":
        patch_trainer(trainer)
    calls = _head_calls(model)
    trainer.train()
    assert bool(calls) == (order != "trl")
    return _logged(trainer, ("loss", "grad_norm", "entropy", "mean_token_accuracy"))


def test_sft_trainer_on_our_head_equals_trls_head(tmp_path):
    want = _sft(tmp_path, "trl", "trl")
    for order in ("before", "after"):
        _compare(_sft(tmp_path, order, order), want, rtol=1e-5)


def _dpo(tmp_path, name, order, **extra):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference = tiny.model(seed=0), tiny.model(seed=0)
    if order == "before":
        patch_causal_lm(policy)
        patch_causal_lm(reference)
    args = DPOConfig(**_common(tmp_path, name, per_device_train_batch_size=4, beta=0.1,
                               **extra))
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         processing_class=tiny.tokenizer(),
                         train_dataset=Dataset.from_list(tiny.preferences(12)))
    if order == "after":
        patch_trainer(trainer)
    calls = _head_calls(policy), _head_calls(reference)
    trainer.train()
    assert all(bool(c) == (order != "trl") for c in calls)
    return _logged(trainer, ("loss", "grad_norm", "rewards/margins", "rewards/chosen",
                             "logps/chosen", "logps/rejected", "logits/chosen", "entropy",
                             "mean_token_accuracy"))


def test_dpo_trainer_on_our_head_equals_trls_head(tmp_path):
    want = _dpo(tmp_path, "trl", "trl")
    for order in ("before", "after"):
        _compare(_dpo(tmp_path, order, order), want, rtol=1e-5, atol=1e-5)


def test_dpo_under_bf16_autocast_starts_at_a_zero_margin_in_either_order(tmp_path):
    """accelerate wraps the reference model's forward in autocast in DPOTrainer.__init__;
    replacing the forward after that dropped the wrapper (the reference ran in fp32, the
    policy in bf16: a step-0 margin of 1e-4). The patch keeps it in either order."""
    runs = {order: _dpo(tmp_path, f"bf16-{order}", order, bf16=True)
            for order in ("before", "after")}
    for logged in runs.values():
        assert logged["rewards/margins"][0].item() == 0.0
    _compare(runs["after"], runs["before"], rtol=0, atol=0)
