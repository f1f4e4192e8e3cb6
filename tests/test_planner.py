"""The memory planner: presets, the breakdown's arithmetic, the search, the CLI, and the
loss/head term against a measured peak (two small cases; the full grid is
``python -m fused_losses.planner_validate``)."""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest

from fused_losses import planner
from fused_losses._memory import reset_peak_rss
from fused_losses.cli import main as cli_main
from fused_losses.planner import GiB, PRESETS, Setup, breakdown, head_bytes


@pytest.mark.parametrize("name, billions", [
    ("llama3-8b", 8.03), ("qwen2.5-7b", 7.62), ("gemma2-2b", 2.61), ("llama3.2-1b", 1.24),
    ("mistral-7b", 7.25), ("qwen2.5-0.5b", 0.49), ("llama3-70b", 70.55),
])
def test_preset_parameter_counts_match_published_sizes(name, billions):
    assert PRESETS[name].params() / 1e9 == pytest.approx(billions, abs=0.01)


def test_config_json_gives_the_preset(tmp_path):
    config = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                  vocab_size=128256, tie_word_embeddings=False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model = planner.load_model(str(path))
    assert model.params() == PRESETS["llama3-8b"].params()
    with pytest.raises(ValueError, match="--model"):
        planner.load_model(str(tmp_path / "missing.json"))


def test_unfused_head_is_three_fp32_logit_copies():
    # 32k-token DPO pair on Llama-3-8B: 65536 rows x 128256 vocab x 12 B.
    rows, vocab = 65536, 128256
    got = head_bytes("unfused", rows=rows, scored=rows, hidden=4096, vocab=vocab)
    assert got == pytest.approx(12 * rows * vocab, rel=1e-3)
    fused = head_bytes("fused", rows=rows, scored=rows, hidden=4096, vocab=vocab)
    assert fused < 5 * GiB  # dW fp32 + its bf16 cast + dH; no [N, V]


def test_breakdown_scales_with_fsdp_and_tp():
    model = PRESETS["llama3-8b"]
    base = Setup(gpus=8, fsdp=True, checkpointing=True)
    one = breakdown(model, replace(base, gpus=1), fused=True)
    eight = breakdown(model, base, fused=True)
    assert eight["optimizer state"] == pytest.approx(one["optimizer state"] / 8)
    assert eight["activations"] == pytest.approx(one["activations"])
    tp2 = breakdown(model, replace(base, tp=2), fused=True)
    assert tp2["activations"] == pytest.approx(eight["activations"] / 2)
    assert tp2["loss/head"] < eight["loss/head"]
    mixed = breakdown(model, replace(base, gpus=1), fused=True)
    assert mixed["parameters"] + mixed["gradients"] + mixed["optimizer state"] == \
        pytest.approx(16 * model.params())


def test_fused_fits_longer_and_on_fewer_gpus():
    model = PRESETS["llama3-8b"]
    setup = Setup(gpus=8, fsdp=True, checkpointing=True, objective="dpo")
    long_unfused = planner.max_seq_len(model, setup, fused=False)
    long_fused = planner.max_seq_len(model, setup, fused=True)
    assert 0 < long_unfused < long_fused
    assert planner.fits(model, replace(setup, seq_len=long_fused), True)
    assert not planner.fits(model, replace(setup, seq_len=long_fused + 1), True)
    fewest_fused = planner.min_gpus(model, setup, fused=True)
    fewest_unfused = planner.min_gpus(model, setup, fused=False)
    assert fewest_fused is not None
    assert fewest_unfused is None or fewest_unfused > fewest_fused
    # Without FSDP an 8B model's mixed-precision state (128 GB) fits on no 80 GB GPU.
    assert planner.max_seq_len(model, replace(setup, fsdp=False, gpus=1), fused=True) == 0
    assert planner.min_gpus(model, replace(setup, fsdp=False), fused=True) is None


def test_cli_table_json_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    rc = cli_main(["plan", "--model", "gemma2-2b", "--seq-len", "8192", "--gpus", "2",
                   "--objective", "sft", "--fsdp", "--activation-checkpointing",
                   "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    for row in planner.ROWS:
        assert row in out
    assert "longest seq-len" in out and "fewest GPUs" in out
    assert png.stat().st_size > 10_000
    rc = cli_main(["plan", "--model", "qwen2.5-7b", "--tp", "2", "--gpus", "8", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["fused"]["GiB"]["loss/head"] < data["unfused"]["GiB"]["loss/head"]


def test_cli_errors_name_the_flag(capsys):
    assert cli_main(["plan", "--model", "nope"]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli_main(["plan", "--model", "llama3-8b", "--gpus", "6", "--tp", "4"]) == 2
    assert "--tp" in capsys.readouterr().err


@pytest.mark.skipif(not (sys.platform.startswith("linux") and reset_peak_rss()),
                    reason="needs /proc/self/clear_refs and VmHWM (Linux)")
@pytest.mark.parametrize("impl", ["unfused", "fused"])
def test_head_prediction_within_15_percent_of_measured_peak(impl):
    from fused_losses.planner_validate import measure, predict

    case = dict(path="logprobs", impl=impl, rows=1024, hidden=256, vocab=32000,
                dtype="float32")
    predicted, measured = predict(case), measure(case)
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)
