"""The memory planner: presets, the breakdown's arithmetic, the search, the CLI, and the
loss/head term against a measured peak (two small cases; the full grid is
``python -m fused_losses.planner_validate``)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

import torch

from fused_losses import planner, planner_validate
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
    for backend in ("cublas", "triton", "torch"):
        for path in planner.PATHS:
            fused = head_bytes("fused", rows=rows, scored=rows, hidden=4096, vocab=vocab,
                               backend=backend, path=path)
            assert fused < 6 * GiB  # [V, H] and [N, H] buffers; nothing [N, V]


def test_the_one_pass_holds_the_fp32_dw_accumulator():
    # Llama-3-8B's head at 8192 tokens, bf16: the one pass holds dH and an fp32 dW
    # accumulator, and its peak is dW's bf16 cast (2 + 4 + 2 bytes per [V, H] entry): the
    # [1024, V] fp32 products are freed before it. The recompute path: dW (bf16) and dH's fp32
    # accumulator, then either the products chunk or dH's cast.
    n, h, v = 8192, 4096, 128256
    one_pass = head_bytes("fused", rows=n, scored=n, hidden=h, vocab=v, backend="cublas")
    recompute = head_bytes("fused", rows=n, scored=n, hidden=h, vocab=v, backend="cublas",
                           path="recompute")
    assert one_pass == pytest.approx(6 * v * h + 2 * n * h, rel=0.01)
    assert recompute == pytest.approx(2 * v * h + 4 * n * h + max(
        planner.kernel_configs.CUBLAS_CHUNK_BYTES, 2 * n * h), rel=0.01)


def test_groups_beyond_the_one_pass_budget_take_the_recompute_memory():
    # A DPO pair at 32k (65536 rows) is beyond any backend's one-pass budget at V = 128256.
    kwargs = dict(rows=65536, scored=65536, hidden=4096, vocab=128256)
    for backend in ("cublas", "triton", "torch"):
        assert planner.effective_path(backend, "one-pass", 65536, 128256) == "recompute"
        assert head_bytes("fused", backend=backend, path="one-pass", group=65536, **kwargs) \
            == head_bytes("fused", backend=backend, path="recompute", **kwargs)
    assert planner.effective_path("cublas", "one-pass", 1024, 128256) == "one-pass"
    assert planner.effective_path("cublas", "one-pass", None, 128256) == "one-pass"
    assert planner.effective_path("torch", "one-pass", 1024, 128256) == "recompute"
    model = PRESETS["llama3-8b"]
    assert planner.head_call(model, Setup(objective="dpo", seq_len=1024))["group"] == 2048
    assert planner.head_call(model, Setup(objective="ce"))["group"] is None
    assert planner.head_call(model, Setup(objective="grpo"))["group"] is None  # token ratios
    assert planner.head_call(model, Setup(objective="kto", seq_len=512))["group"] == 512
    assert planner.head_call(model, Setup(tp=2, gpus=8))["path"] == "recompute"


def test_every_registered_backend_has_a_term_and_unknown_names_are_errors(monkeypatch):
    from fused_losses.backends import BACKENDS

    assert set(planner._FUSED_TERMS) == set(BACKENDS) - {"auto"}
    kwargs = dict(rows=64, scored=64, hidden=32, vocab=100)
    assert head_bytes("fused", backend="auto", **kwargs) == \
        head_bytes("fused", backend=planner.CUDA_DEFAULT, **kwargs)
    with pytest.raises(ValueError, match="backend must be one of"):
        head_bytes("fused", backend="cuda", **kwargs)
    with pytest.raises(ValueError, match="path must be one of"):
        head_bytes("fused", path="logprobs", **kwargs)
    with pytest.raises(ValueError, match="dtype must be one of"):
        head_bytes("fused", dtype="float16", **kwargs)
    with pytest.raises(ValueError, match="impl must be"):
        head_bytes("fast", **kwargs)
    monkeypatch.delitem(planner._FUSED_TERMS, "triton")  # a backend without a term
    with pytest.raises(ValueError, match="no memory term"):
        head_bytes("fused", backend="triton", **kwargs)


def test_live_tensor_peak_counts_new_storages_alive_at_once():
    from fused_losses._memory import LiveTensorPeak

    base = torch.zeros(1000)
    with LiveTensorPeak() as tracker:
        a = torch.empty(1000)                 # 4000
        view, same = a.view(10, 100), a.add_(1)  # views and in-place ops allocate nothing
        b = torch.zeros(500)                  # 2000: 6000 live
        del a, view, same
        c = base * 2                          # a freed: 2000 + 4000
        torch.add(c, 1, out=c)                # out= allocates nothing
        with tracker.excluding():
            d = torch.ones(10_000)            # not counted
        del d
        e = torch.ones(25)                    # 100: 6100 live, the peak
    assert tracker.peak == 6100 and tracker.current == 6100
    del b, c, e


# Budgets that cut every path into a few chunks (2-6) at this size.
TINY = dict(rows=96, hidden=48, vocab=1001, dtype="float32", scored=0.75,
            chunk_bytes=64 << 10, torch_chunk_bytes=192 << 10)


# A head wide against its vocabulary, so that the [*, H] buffers the backends free early
# weigh: 4 one-pass chunks of 16 rows, 4 recompute chunks, torch chunks of 8 rows.
WIDE = dict(rows=64, hidden=256, vocab=301, dtype="bfloat16", scored=0.75,
            chunk_bytes=16 * 4 * 301, torch_chunk_bytes=8 * 4 * 301)


def _fused(backend, path, shape=TINY, **extra):
    return dict(shape, impl="fused", backend=backend, path=path, api="logprobs", **extra)


@pytest.mark.parametrize("case", [
    dict(TINY, impl="unfused", api="ce"),
    *[_fused(b, p) for b in ("torch", "triton", "cublas") for p in ("one-pass", "recompute")],
    _fused("cublas", "one-pass", group=24),
    # the products freed before dW's cast (+23% if not)
    _fused("triton", "one-pass", group=24, dtype="bfloat16", scored=1.0),
    _fused("cublas", "one-pass", group=48, one_pass_bytes=48 * 1001 * 4 - 1),  # beyond
    _fused("cublas", "recompute", dtype="bfloat16", scored=1.0),
    _fused("torch", "one-pass", dtype="bfloat16", softcap=30.0),
    # Memory the backends release early; keeping it fails here by 2-40%: a chunk's gathered
    # rows and dH rows before the next chunk's (one pass); the products' views, the gathered
    # rows and the fp32 dH before dH's cast and scatter (cuBLAS recompute); the gradient
    # chunk's view and the fp32 dH (Triton recompute); no [V, H] temporary in a 16-bit dW
    # update, and the workspace before dW's cast (torch).
    _fused("cublas", "one-pass", WIDE, dtype="float32"),
    _fused("cublas", "recompute", WIDE),
    _fused("cublas", "recompute", WIDE, scored=1.0),
    _fused("triton", "recompute", WIDE),
    *[_fused("torch", p, WIDE, scored=1.0) for p in ("one-pass", "recompute")],
], ids=lambda c: planner_validate.describe(c) + f" H={c['hidden']} {c['dtype']} "
   f"scored={c['scored']}")
def test_head_term_matches_the_measured_live_tensor_peak(case):
    # The exact live-tensor peak of the library's own step; the term counts every [*, H],
    # [*, V] and [V, H] tensor, the per-token vectors as a flat allowance.
    predicted, measured = planner_validate.predict(case), planner_validate.measure(case)
    assert abs(predicted - measured) <= 0.015 * measured, (predicted, measured)


def test_validation_summary_has_one_row_per_backend_and_path():
    # docs/planner.md's table is this summary of `python -m fused_losses.planner_validate`.
    mib = 1 << 20
    results = [dict(_fused("cublas", "one-pass"), predicted=99 * mib, measured=100 * mib,
                    error=-0.01),
               dict(_fused("cublas", "one-pass"), predicted=201 * mib, measured=200 * mib,
                    error=0.005),
               dict(_fused("torch", "one-pass", group=24), predicted=mib, measured=mib,
                    error=0.0)]
    lines = planner_validate.summary(results)
    assert lines[2:] == [
        "| torch | one-pass, groups of 24 rows | 1 | +0.00% to +0.00% | 1.000 / 1.000 |",
        "| cublas | one-pass | 2 | \N{MINUS SIGN}1.00% to +0.50% | 99.000 / 100.000 |"]


def test_skipped_kernels_allocate_what_run_kernels_allocate():
    # The validation skips the Triton launches (kernels write into tensors allocated before
    # them); running them in the interpreter measures the same bytes.
    case = dict(TINY, rows=32, hidden=16, vocab=301, chunk_bytes=24 << 10, impl="fused",
                backend="cublas", path="one-pass", api="ce")  # two chunks of 20 and 4 rows
    assert planner_validate.measure(case) == planner_validate.measure(case, run_kernels=True)


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


def test_cli_says_which_head_it_assumed_and_recommends_the_shorter_peak(capsys):
    dpo = ["plan", "--model", "llama3-8b", "--seq-len", "32768", "--gpus", "8", "--fsdp",
           "--activation-checkpointing", "--objective", "dpo"]
    assert cli_main(dpo) == 0
    out = capsys.readouterr().out
    assert f"backend {planner.CUDA_DEFAULT} (the CUDA default), path one-pass" in out
    assert "65,536 rows" in out and "recompute path's memory" in out  # a pair is too long
    assert cli_main(dpo + ["--backend", "triton", "--path", "recompute", "--json"]) == 0
    head = json.loads(capsys.readouterr().out)["head"]
    assert head == dict(head, backend="triton", path="recompute", path_taken="recompute")
    # Without checkpointing the head outgrows a layer's backward: the one pass's fp32 dW
    # accumulator costs length, and the planner says which path fits longer.
    ce = ["plan", "--model", "llama3-8b", "--seq-len", "4096", "--gpus", "1", "--objective",
          "ce", "--precision", "bf16", "--optimizer", "adamw-8bit"]
    assert cli_main(ce) == 0
    out = capsys.readouterr().out
    assert "recommended: --path recompute (grad_in_forward=False)" in out
    assert cli_main(ce + ["--path", "recompute"]) == 0
    assert "recommended" not in capsys.readouterr().out


def test_cli_errors_name_the_flag(capsys):
    assert cli_main(["plan", "--model", "nope"]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli_main(["plan", "--model", "llama3-8b", "--gpus", "6", "--tp", "4"]) == 2
    assert "--tp" in capsys.readouterr().err
    for flag, value in (("--backend", "cuda"), ("--path", "logprobs")):
        assert cli_main(["plan", "--model", "llama3-8b", flag, value]) == 2
        assert flag in capsys.readouterr().err
