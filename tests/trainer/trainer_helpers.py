"""Tiny models and argv helpers for the trainer tests."""
from __future__ import annotations

import json
from pathlib import Path

TINY = {"llama": dict(model_type="llama", vocab_size=1024, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False),
        "qwen2": dict(model_type="qwen2", vocab_size=1024, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, tie_word_embeddings=False),
        # Soft-capped logits (final_logit_softcapping), tied head. The cap at 1 with weights
        # drawn 15 times wider than the default keeps logits of order 1, where the cap bends
        # them; a sliding window past --max-length keeps padded positions attending to some
        # token (a window of only padding gives NaN in the model's own forward).
        "gemma2": dict(model_type="gemma2", vocab_size=1024, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                       max_position_embeddings=256, sliding_window=256,
                       final_logit_softcapping=1.0, initializer_range=0.3),
        # Logits divided by 4 (logits_scaling): a linear transform, which distillation folds
        # into the hidden states.
        "granite": dict(model_type="granite", vocab_size=1024, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=False, logits_scaling=4.0)}


# A distillation teacher: wider than the student (H = 48 vs 32), the same vocabulary; its head
# scaled so that its distributions are peaked (random init gives nearly uniform ones, and a
# near-zero loss).
TEACHER = dict(TINY["llama"], hidden_size=48, intermediate_size=96)
TEACHER_HEAD_SCALE = 30.0


def save_tiny(path: Path, spec: dict, seed: int, head_scale: float = 1.0) -> str:
    """A random model of ``spec`` saved as a transformers directory (a --teacher, ...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(head_scale)
    lm.save_pretrained(path)
    return str(path)


def tiny_args(out: Path, objective: str, arch: str = "llama", **flags) -> list[str]:
    """argv for a fast run on a tiny random model."""
    base = {"objective": objective, "output_dir": str(out), "model_config": json.dumps(TINY[arch]),
            "max_steps": 3, "batch_size": 4, "train_size": 64, "eval_size": 8,
            "max_length": 160, "warmup_steps": 1, "threads": 1}
    base.update(flags)
    argv = []
    for key, value in base.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv + ["--no-progress"]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_model(arch: str = "llama", seed: int = 0):
    """The tiny random model the runs above train, built in-process."""
    from fused_losses.trainer.model import build_model

    return build_model("", json.dumps(TINY[arch]), seed)[0]


def train_until_first_checkpoint(argv: list[str], monkeypatch) -> None:
    """Run ``argv`` in-process and stop it right after its first checkpoint is written, as a
    kill would (the resume tests' interrupted run, without a subprocess)."""
    import pytest

    from fused_losses.trainer import checkpoint, loop

    class Stop(Exception):
        pass

    save = checkpoint.save

    def save_then_stop(*args):
        save(*args)
        raise Stop

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save", save_then_stop)
        with pytest.raises(Stop):
            loop.train(loop.parse_args(argv))
