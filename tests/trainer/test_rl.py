"""GRPO (sampled completions, a verifiable reward) and KTO (pairs as unpaired examples) in the
trainer: fused and unfused runs agree step by step, on the same samples; the reward and the
advantages follow their documented rules."""
from __future__ import annotations

import json

import pytest
import torch

from fused_losses.trainer import loop
from fused_losses.trainer.rewards import CORRECT, FORMAT, NUMBER, final_number, reward
from fused_losses.trainer.sampling import group_advantages

from .trainer_helpers import tiny_args

# Short completions: an untrained model's rewards then differ within a group (some hold a
# number, some do not), so the advantages, and the gradients, are not all zero.
GRPO = dict(batch_size=2, num_generations=4, max_completion_length=8)


def run(argv) -> dict:
    return loop.train(loop.parse_args(argv))


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True) \
        .state_dict()


def assert_same_run(fused_dir, unfused_dir, keys: tuple[str, ...]) -> None:
    """Step by step: every metric in ``keys`` (and the same samples, where there are any),
    then the trained weights."""
    a, b = records(fused_dir), records(unfused_dir)
    assert len(a) == len(b) == 3
    assert [m.get("samples/checksum") for m in a] == [m.get("samples/checksum") for m in b]
    for key in keys:
        torch.testing.assert_close(torch.tensor([m[key] for m in a]),
                                   torch.tensor([m[key] for m in b]), rtol=1e-4, atol=1e-5,
                                   msg=lambda text: f"{key}: {text}")
    # AdamW normalises each update, so an element whose gradient is rounding-sized can move
    # by up to lr (1e-3) either way: the weights agree to a tenth of that.
    fused = final_weights(fused_dir)
    for name, value in final_weights(unfused_dir).items():
        torch.testing.assert_close(fused[name], value, rtol=0, atol=1e-4,
                                   msg=lambda text: f"{name}: {text}")


@pytest.mark.parametrize("flags", [
    {},
    {"loss_type": "grpo", "beta": 0.1, "loss_kwargs": '{"entropy_coef": 0.01}'},
    {"loss_type": "dr_grpo", "loss_kwargs": '{"importance_sampling_level": "sequence"}'},
], ids=["dapo", "grpo-kl-entropy", "dr_grpo-gspo"])
def test_grpo_fused_and_unfused_agree_step_by_step(tmp_path, tok_cache, flags):
    fused = run(tiny_args(tmp_path / "f", "grpo", impl="fused", **GRPO, **flags))
    unfused = run(tiny_args(tmp_path / "u", "grpo", impl="unfused", **GRPO, **flags))
    assert_same_run(tmp_path / "f", tmp_path / "u",
                    ("loss", "grad_norm", "reward", "clip_ratio/region_mean"))
    assert any(m["grad_norm"] > 0 for m in records(tmp_path / "f"))  # something was learnt
    assert all(0 < m["generation/tokens"] <= 2 * 4 * 8 for m in records(tmp_path / "f"))
    assert fused["eval/reward"] == pytest.approx(unfused["eval/reward"])
    assert fused["train_tokens_per_s"] > 0


def test_grpo_and_kto_train_a_soft_capped_model_on_its_own_logits(tmp_path, tok_cache):
    """Gemma-2 caps its logits: both steps applied the bare head, so at step 1, where the
    policy is its reference, GRPO's KL and KTO's rewards (scored by the reference with the
    cap) were not 0; now both implementations agree step by step on the capped logits."""
    grpo = dict(GRPO, loss_type="grpo", beta=0.1, loss_kwargs='{"entropy_coef": 0.01}')
    for objective, flags, keys in [
            ("grpo", grpo, ("loss", "grad_norm", "reward", "kl", "entropy")),
            ("kto", {"beta": 0.5}, ("loss", "grad_norm", "rewards/chosen", "rewards/rejected"))]:
        for impl in ("fused", "unfused"):
            run(tiny_args(tmp_path / objective / impl, objective, arch="gemma2", impl=impl,
                          **flags))
        assert_same_run(tmp_path / objective / "fused", tmp_path / objective / "unfused", keys)
        first = records(tmp_path / objective / "fused")[0]
        for key in ("kl",) if objective == "grpo" else ("rewards/chosen", "rewards/rejected"):
            assert abs(first[key]) < 1e-6, (objective, key, first[key])


def test_grpo_samples_and_scores_at_the_losss_temperature(tmp_path, tok_cache, monkeypatch):
    """generate sampled at temperature 1 whatever --temperature the loss divided by, and the
    reference scored at 1: now all three use it (the KL is 0 while the policy is its
    reference), and the unfused step implements it."""
    from transformers.generation.utils import GenerationMixin

    temperatures, generate = [], GenerationMixin.generate

    def recording(self, *args, **kwargs):
        temperatures.append(kwargs.get("temperature"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    flags = dict(GRPO, beta=0.1, temperature=0.7)
    run(tiny_args(tmp_path / "f", "grpo", impl="fused", **flags))
    run(tiny_args(tmp_path / "u", "grpo", impl="unfused", **flags))
    assert temperatures and set(temperatures) == {0.7}  # training and held-out batches
    assert_same_run(tmp_path / "f", tmp_path / "u", ("loss", "grad_norm", "reward", "kl"))
    assert abs(records(tmp_path / "f")[0]["kl"]) < 1e-6


def test_kto_fused_and_unfused_agree_step_by_step(tmp_path, tok_cache):
    run(tiny_args(tmp_path / "f", "kto", impl="fused", beta=0.5))
    run(tiny_args(tmp_path / "u", "kto", impl="unfused", beta=0.5))
    assert_same_run(tmp_path / "f", tmp_path / "u",
                    ("loss", "grad_norm", "rewards/chosen", "rewards/rejected"))
    estimates = [m["kl"] for m in records(tmp_path / "f")]
    assert estimates[0] == 0 and max(estimates) > 0  # z starts at 0 (reference = policy)


def test_grpo_compare_report(tmp_path, tok_cache):
    from fused_losses.trainer import report

    for impl in ("fused", "unfused"):
        run(tiny_args(tmp_path / impl, "grpo", impl=impl, **GRPO))
    table = report.write_compare(tmp_path, "grpo")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["samples_agree"] is True
    for impl in ("fused", "unfused"):
        assert data[impl]["generation_tokens_per_s"] > 0 and data[impl]["train_tokens_per_s"] > 0
    assert "tokens/s, generation" in table and "the same at every step" in table
    assert (tmp_path / "reward_curves.png").stat().st_size > 0


@pytest.mark.parametrize("text,answer,expected", [
    (" 3 + 4 = 7. 7 x 2 = 14. The answer is 14 apples.", 14, CORRECT),
    (" 3 + 4 = 7. The answer is 15 apples.", 14, FORMAT),
    (" The answer is 15, no, 14", 14, CORRECT),  # the final number counts
    (" 7 x 2 = 13", 14, NUMBER),
    (" apples and pears", 14, 0.0),
    ("", 14, 0.0),
])
def test_reward_rules(text, answer, expected):
    assert reward(text, answer) == expected
    assert final_number(" -3 then 12 and 40.") == 40 and final_number("none") is None


def test_group_advantages_are_trls():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.2, 0.2, 0.0, 0.05, 0.05, 0.05, 0.05])
    grouped = rewards.view(2, 4)
    want = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1).unsqueeze(1)
                                                        + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4), want.reshape(-1))
    assert torch.all(group_advantages(rewards, 4)[4:] == 0)  # equal rewards: no signal


@pytest.mark.parametrize("objective,flags,message", [
    ("grpo", {"num_generations": 1}, "--num-generations must be >= 2 for grpo"),
    ("kto", {"precompute_ref": True}, "--precompute-ref is not available for kto"),
    ("grpo", {"loss_type": "ppo"}, "loss_type must be one of"),
    ("grpo", {"precompute_ref": True, "beta": 0.1}, "--precompute-ref is not available for grpo"),
    ("grpo", {"temperature": 0}, "temperature must be a finite number > 0 for grpo"),
    ("grpo", {"loss_kwargs": '{"temperature": -1}'}, "temperature must be a finite number > 0"),
])
def test_cli_errors(tmp_path, capsys, objective, flags, message):
    assert loop.main(tiny_args(tmp_path, objective, **flags)) == 2
    assert message in capsys.readouterr().err


def test_grpo_refuses_a_temperature_a_soft_capped_model_cannot_take(tmp_path, tok_cache, capsys):
    # generate divides the capped logits by τ; the primitive caps z/τ: not the same
    # distribution, so the pair is refused at set-up, before anything is written.
    assert loop.main(tiny_args(tmp_path / "run", "grpo", arch="gemma2", temperature=0.7,
                               **GRPO)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--temperature 0.7 with --model-config: Gemma2ForCausalLM soft-caps its logits " \
           "(final_logit_softcapping 1)" in err
    assert not (tmp_path / "run").exists()
