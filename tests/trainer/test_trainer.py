"""End-to-end trainer tests on tiny random models (in-process where possible)."""
from __future__ import annotations

import json

import pytest
import torch

from fused_losses.trainer import loop
from fused_losses.trainer.data import DataError, read_jsonl

from .rounding import metric_tolerances, step_tolerances
from .trainer_helpers import TINY, losses, tiny_args


def run(argv) -> dict:
    return loop.train(loop.parse_args(argv))


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A second random tiny Llama: the 'SFT model' whose log-prob ratio gives token rewards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY["llama"])
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    path = tmp_path_factory.mktemp("reward_model")
    lm.save_pretrained(path)
    return str(path)


OBJECTIVES = [("sft", {}), ("sft", {"divergence": "kl"}), ("sft", {"divergence": "reverse_kl"}),
              ("sft", {"divergence": "kl", "loss_kwargs": '{"value_mode": "token"}'}),
              ("dpo", {}), ("dpo", {"loss_type": "ipo"}), ("dpo", {"loss_type": "apo_zero"}),
              ("dpo", {"loss_type": "bco_pair"}),
              ("simpo", {}), ("orpo", {}), ("orpo", {"beta": 0.5}), ("cpo", {}), ("dil", {}),
              ("dil", {"variant": "bce"}), ("ift", {}), ("reinforce", {}),
              ("reinforce", {"loss_kwargs": '{"whiten": true}'}),
              ("reinforce", {"loss_kwargs": '{"kl_coef": 0.1}'})]


# Metrics computed from per-token log-probs (of the policy and the frozen models)
LOGPROB_METRICS = ("reward", "return", "kl", "logps/")


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective,flags", OBJECTIVES,
                         ids=[o + "".join(f"-{v}" for v in f.values()).replace('"', "")
                              for o, f in OBJECTIVES])
def test_fused_and_unfused_agree_step_by_step(tmp_path, tok_cache, reward_model, objective, flags):
    """Same losses within what fp32 rounding allows (``rounding.py`` derives the bound for
    each configuration), and the same metrics, step by step and held out."""
    if objective == "reinforce":
        flags = {**flags, "reward_model": reward_model}
    argv = tiny_args(tmp_path / "f", objective, impl="fused", **flags)
    fused = run(argv)
    unfused = run(tiny_args(tmp_path / "u", objective, impl="unfused", **flags))
    a, b = records(tmp_path / "f"), records(tmp_path / "u")
    assert len(a) == len(b) == 3
    bounds = step_tolerances(argv, steps=4)  # the held-out loss: a fourth step's arithmetic
    for x, y, bound in zip(a, b, bounds):
        assert abs(x["loss"] - y["loss"]) <= bound, (x["step"], x["loss"], y["loss"], bound)
        assert x.keys() == y.keys()
    # Step 1 runs the same weights: the metrics made of log-probs agree to rounding too.
    shared = [k for k in a[0] if k.startswith(LOGPROB_METRICS) and k != "rewards/accuracies"]
    for key, tolerance in metric_tolerances(argv, shared).items():
        assert abs(a[0][key] - b[0][key]) <= tolerance, (key, a[0][key], b[0][key], tolerance)
    assert abs(fused["eval/loss"] - unfused["eval/loss"]) <= bounds[3]
    assert fused.keys() == unfused.keys()
    if objective in ("dpo", "dil", "simpo", "orpo", "cpo"):
        assert 0.0 <= fused["eval/rewards/accuracies"] <= 1.0


@pytest.mark.parametrize("objective,flags", [
    ("sft", {"divergence": "kl"}), ("sft", {"divergence": "kl", "loss_kwargs": '{"value_mode": "token"}'}),
    ("sft", {"divergence": "pearson_chi2", "beta": 0.5}), ("simpo", {}),
    ("dpo", {"loss_kwargs": '{"average_log_prob": true}'})])
def test_fused_and_unfused_agree_when_the_first_label_is_scored(tmp_path, tok_cache, objective,
                                                                flags):
    # An empty prompt scores labels[:, 0], which no position predicts; the unfused SFT step
    # counted it as a token (a spurious phi(u_0) term: 0.91 apart in loss).
    path = tmp_path / "data.jsonl"
    answers = [f" {a} + {b} = {a + b}." for a in range(4) for b in range(5)]
    rows = ([{"prompt": "", "completion": x} for x in answers] if objective == "sft" else
            [{"prompt": "", "chosen": x, "rejected": x[:-2] + "1."} for x in answers])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = tiny_args(tmp_path / "f", objective, impl="fused", data=path, eval_size=4, **flags)
    run(argv)
    run(tiny_args(tmp_path / "u", objective, impl="unfused", data=path, eval_size=4, **flags))
    bounds = step_tolerances(argv, steps=3)
    for x, y, bound in zip(losses(tmp_path / "f"), losses(tmp_path / "u"), bounds):
        assert abs(x - y) <= bound, (x, y, bound)


def test_bco_pair_running_mean_is_carried_across_steps(tmp_path, tok_cache):
    # delta after step k is the mean of the k batch-mean rewards so far (TRL's running mean),
    # not each step's own batch mean. A pair's rewards are beta*rho_w, beta*rho_l: the batch
    # mean reward is the mean of the logged chosen and rejected means.
    run(tiny_args(tmp_path, "dpo", loss_type="bco_pair", max_steps=4))
    logged = records(tmp_path)
    assert [r["bco/count"] for r in logged] == [1, 2, 3, 4]
    means = [(r["rewards/chosen"] + r["rewards/rejected"]) / 2 for r in logged]
    for k, record in enumerate(logged, 1):
        assert record["bco/delta"] == pytest.approx(sum(means[:k]) / k, rel=1e-5, abs=1e-7)


def test_qwen2_architecture(tmp_path, tok_cache):
    run(tiny_args(tmp_path / "f", "dpo", arch="qwen2", impl="fused"))
    run(tiny_args(tmp_path / "u", "dpo", arch="qwen2", impl="unfused"))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "f")),
                               torch.tensor(losses(tmp_path / "u")), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective,flags", [
    ("sft", {}), ("dpo", {}),
    ("sft", {"divergence": "kl", "loss_kwargs": '{"value_mode": "sequence"}'})])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, tok_cache, objective, flags):
    # grad_clip 0: clipping acts on the summed gradient either way, but keep the test about sums.
    run(tiny_args(tmp_path / "k1", objective, grad_accum=1, grad_clip=0, **flags))
    run(tiny_args(tmp_path / "k4", objective, grad_accum=4, grad_clip=0, **flags))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "k1")),
                               torch.tensor(losses(tmp_path / "k4")), rtol=1e-5, atol=1e-6)


def test_metrics_log_and_too_long_records_are_counted(tmp_path, tok_cache):
    summary = run(tiny_args(tmp_path, "sft", max_length=100, too_long="truncate"))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all("loss" in x and "tokens_per_s" in x for x in lines)
    counts = summary["data"]["train"]
    assert counts["truncated"] > 0 and counts["kept"] == counts["records"]
    summary = run(tiny_args(tmp_path / "drop", "sft", max_length=100, too_long="drop"))
    counts = summary["data"]["train"]
    assert counts["dropped"] > 0 and counts["kept"] + counts["dropped"] == counts["records"]


def test_user_jsonl(tmp_path, tok_cache):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q{i}: 2+{i}?", "chosen": f" {2 + i}", "rejected": f" {3 + i}"}
            for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = run(tiny_args(tmp_path / "out", "dpo", data=path, eval_size=4))
    assert summary["data"]["train"]["records"] == 16


def test_malformed_jsonl_names_file_and_line(tmp_path, tok_cache, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        read_jsonl(path, "sft")
    path.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing key\(s\) \['rejected'\]"):
        read_jsonl(path, "preference")
    code = loop.main(tiny_args(tmp_path / "out", "dpo", data=path))
    assert code == 2 and "bad.jsonl:1" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--output-dir", "x"], "--objective is required"),
    (["--objective", "nope", "--output-dir", "x"], "invalid choice"),
    (["--objective", "sft"], "--output-dir is required"),
    (["--objective", "sft", "--output-dir", "x", "--impl", "both"], "invalid choice"),
    (["--objective", "sft", "--output-dir", "x", "--batch-size", "6", "--grad-accum", "4"],
     "not divisible"),
    (["--objective", "sft", "--output-dir", "x", "--max-steps", "0"], "--max-steps must be >= 1"),
    (["--objective", "dpo", "--output-dir", "x", "--loss-kwargs", "{oops"], "not valid JSON"),
    (["--objective", "reinforce", "--output-dir", "x"], "needs --reward-model"),
    (["--objective", "sft", "--output-dir", "x", "--max-steps", "ten"], "invalid int value"),
])
def test_cli_errors(capsys, argv, message):
    assert loop.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_objective_option_is_a_clear_error(tmp_path, tok_cache, capsys):
    assert loop.main(tiny_args(tmp_path / "a", "dpo", loss_type="nope")) == 2
    assert "loss_type must be one of" in capsys.readouterr().err
    assert loop.main(tiny_args(tmp_path / "b", "dpo", impl="unfused",
                               loss_kwargs='{"softcap": 30.0}')) == 2
    assert "--impl unfused does not implement ['softcap']" in capsys.readouterr().err


def test_cli_errors_at_setup(tmp_path, tok_cache, capsys):
    assert loop.main(["--objective", "sft", "--output-dir", str(tmp_path / "a"),
                      "--model", "no-such-model"]) == 2
    assert "neither a local directory nor a preset" in capsys.readouterr().err
    assert loop.main(["--objective", "sft", "--output-dir", str(tmp_path / "b"),
                      "--model-config", '{"hidden_size": 8}']) == 2
    assert "model_type" in capsys.readouterr().err
    assert loop.main(tiny_args(tmp_path / "c", "sft", resume=True)) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_help(capsys):
    assert loop.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--objective", "--impl", "--compare", "--model", "--model-config", "--data",
                 "--max-steps", "--save-every", "--resume", "--output-dir"):
        assert flag in text


def test_config_maps_one_to_one_onto_the_cli(tmp_path):
    cfg = loop.parse_args(tiny_args(tmp_path, "dpo", beta=0.2, fsdp=True))
    assert loop.parse_args(loop.to_argv(cfg)) == cfg


def test_precomputed_reference_matches_live_reference(tmp_path, tok_cache):
    run(tiny_args(tmp_path / "live", "dpo"))
    run(tiny_args(tmp_path / "cached", "dpo", precompute_ref=True))
    assert (tmp_path / "cached" / "ref_logprobs_fused.pt").exists()
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "cached")),
                               torch.tensor(losses(tmp_path / "live")), rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_losses(tmp_path, tok_cache):
    run(tiny_args(tmp_path / "plain", "sft"))
    run(tiny_args(tmp_path / "ckpt", "sft", activation_checkpointing=True))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ckpt")),
                               torch.tensor(losses(tmp_path / "plain")), rtol=1e-5, atol=1e-6)


def test_compare_report(tmp_path, tok_cache):
    """The report --compare writes from its two runs (run here in-process to stay fast)."""
    from fused_losses.trainer import report

    for impl in ("fused", "unfused"):
        run(tiny_args(tmp_path / impl, "dpo", impl=impl))
    table = report.write_compare(tmp_path, "dpo")
    data = json.loads((tmp_path / "report.json").read_text())
    for impl in ("fused", "unfused"):
        assert data[impl]["peak_memory_mb"] > 0 and data[impl]["tokens_per_s"] > 0
    assert data["max_abs_loss_diff"] < 1e-4 and data["losses_agree"]
    for name in ("report.md", "loss_curves.png", "peak_memory.png", "tokens_per_s.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "peak memory" in table and "held-out reward acc." in table


def test_compare_refuses_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert loop.main(["--objective", "sft", "--compare", "--output-dir", str(tmp_path)]) == 2
    assert "without torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("objective, flags", [("dpo", {}), ("dpo", {"precompute_ref": True}),
                                              ("kto", {})], ids=["dpo", "dpo-precomputed",
                                                                 "kto"])
def test_the_reference_is_scored_at_the_objectives_temperature(tmp_path, objective, flags):
    """At step 1 the policy is its reference: with --temperature both are scored at it, so
    every implicit reward is 0 (with the reference at 1 they were not)."""
    run(tiny_args(tmp_path, objective, max_steps=1, temperature=0.7, **flags))
    first = records(tmp_path)[0]
    for key in ("rewards/chosen", "rewards/rejected"):
        assert abs(first[key]) < 1e-5, (key, first[key])
