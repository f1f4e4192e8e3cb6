"""The ``--compare`` report: report.json, report.md and PNG plots (matplotlib, Agg backend).

Reads ``DIR/{fused,unfused}/metrics.jsonl`` and ``summary.json`` written by the two runs.
"""
from __future__ import annotations

import json
from pathlib import Path

IMPLS = ("fused", "unfused")
# The two runs see the same data and weights; their loss curves differ only by float32
# rounding of different summation orders, amplified a little by training. This is the bound the
# report checks against.
LOSS_TOLERANCE = 1e-2


def _read(run: Path) -> tuple[list[dict], dict]:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    return metrics, json.loads((run / "summary.json").read_text())


def write_compare(out: Path, objective: str) -> str:
    """Write report.json, report.md and the plots; return the side-by-side table."""
    runs = {impl: _read(out / impl) for impl in IMPLS}
    curves = {impl: [m["loss"] for m in runs[impl][0]] for impl in IMPLS}
    diffs = [abs(a - b) for a, b in zip(curves["fused"], curves["unfused"])]
    max_diff = max(diffs) if diffs else None
    per_impl = {}
    for impl in IMPLS:
        summary = runs[impl][1]
        per_impl[impl] = {k: summary.get(k) for k in
                          ("peak_memory_mb", "tokens_per_s", "train_tokens_per_s",
                           "eval/loss", "eval/rewards/accuracies", "eval/reward")}
        per_impl[impl]["final_loss"] = curves[impl][-1] if curves[impl] else None
        per_impl[impl]["generation_tokens_per_s"] = _generation_rate(runs[impl][0])
    fused, unfused = per_impl["fused"], per_impl["unfused"]
    ratios = {key: _ratio(fused[key + suffix], unfused[key + suffix])
              for key, suffix in (("peak_memory", "_mb"), ("tokens_per_s", ""),
                                  ("train_tokens_per_s", ""),
                                  ("generation_tokens_per_s", ""))}
    summary = runs["fused"][1]
    report = {"objective": objective, **per_impl, "ratio_fused_over_unfused": ratios,
              "max_abs_loss_diff": max_diff, "loss_tolerance": LOSS_TOLERANCE,
              "losses_agree": max_diff is not None and max_diff <= LOSS_TOLERANCE,
              "steps": len(diffs), "model": summary.get("model"), "data": summary.get("data"),
              "batch_size": summary.get("batch_size"), "device": summary.get("device"),
              "torch_threads": summary.get("torch_threads"),
              "samples_agree": _samples_agree(runs)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plots = _plots(out, runs, curves)
    table = _table(report)
    (out / "report.md").write_text(_markdown(report, table, plots))
    return table


def _generation_rate(metrics: list[dict]) -> float | None:
    """Sampled tokens per second of sampling, first step excluded (as for tokens/s); None
    for a run that samples nothing."""
    timed = [m for m in metrics[1:] if "generation/seconds" in m]
    seconds = sum(m["generation/seconds"] for m in timed)
    return sum(m["generation/tokens"] for m in timed) / seconds if seconds else None


def _samples_agree(runs: dict) -> bool | None:
    """Whether both runs sampled the same completions at every step (on-policy objectives:
    the samples follow the weights, which agree to rounding); None when nothing is sampled."""
    sums = [[m.get("samples/checksum") for m in runs[impl][0]] for impl in IMPLS]
    if not any(x is not None for x in sums[0]):
        return None
    return sums[0] == sums[1]


def _ratio(a, b):
    return a / b if a is not None and b else None


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def _table(r: dict) -> str:
    rows = [("peak memory (MB)", "peak_memory_mb", ".0f", "peak_memory"),
            ("tokens/s", "tokens_per_s", ".0f", "tokens_per_s")]
    if r["fused"].get("generation_tokens_per_s") is not None:  # sampling, then training
        rows += [("  tokens/s, generation", "generation_tokens_per_s", ".0f",
                  "generation_tokens_per_s"),
                 ("  tokens/s, training", "train_tokens_per_s", ".0f", "train_tokens_per_s")]
    rows += [("final train loss", "final_loss", ".4f", None),
             ("held-out loss", "eval/loss", ".4f", None)]
    if r["fused"].get("eval/rewards/accuracies") is not None:
        rows.append(("held-out reward acc.", "eval/rewards/accuracies", ".3f", None))
    if r["fused"].get("eval/reward") is not None:
        rows.append(("held-out reward", "eval/reward", ".3f", None))
    lines = [f"{r['objective']}: {'':22}{'fused':>10} {'unfused':>10} {'fused/unf':>10}"]
    for label, key, spec, ratio in rows:
        ratio_text = _fmt(r["ratio_fused_over_unfused"][ratio], ".2f") if ratio else ""
        lines.append(f"  {label:<26}{_fmt(r['fused'][key], spec):>10} "
                     f"{_fmt(r['unfused'][key], spec):>10} {ratio_text:>10}")
    verdict = "agree" if r["losses_agree"] else "DISAGREE"
    lines.append(f"  max |loss diff| over {r['steps']} steps: {_fmt(r['max_abs_loss_diff'], '.2e')}"
                 f" ({verdict}, tolerance {r['loss_tolerance']:g})")
    if r.get("samples_agree") is not None:
        lines.append("  sampled completions: " + ("the same at every step" if r["samples_agree"]
                                                  else "DIFFER at some step"))
    return "\n".join(lines)


def _markdown(r: dict, table: str, plots: list[str]) -> str:
    model, data = r.get("model") or {}, r.get("data") or {}
    lines = [f"# fused vs unfused: {r['objective']}", "",
             f"Model: {model.get('type')} with V={model.get('vocab_size')}, "
             f"H={model.get('hidden_size')}, {model.get('layers')} layers, "
             f"{model.get('parameters')} parameters; batch {r['batch_size']}; "
             f"device {r['device']}, {r['torch_threads']} threads.",
             f"Data: train {_counts(data.get('train'))}; held-out {_counts(data.get('eval'))}.",
             "", "Peak memory: CUDA allocator peak; on CPU the peak RSS above the RSS once the "
             "model is built, plus the model's weights (so weights, reference copies, gradients, "
             "optimizer state, activations and logits count; the interpreter and libraries do "
             "not). Tokens/s: non-padding tokens per second of optimizer steps, first step "
             "excluded, reference forwards included; for an on-policy objective also split "
             "into generation (sampled tokens per second of sampling) and training (all "
             "tokens per second of the rest of the step).", "",
             "```", table, "```", ""]
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _counts(c: dict | None) -> str:
    if not c:
        return "n/a"
    return (f"{c['records']} records, {c['kept']} kept, {c['truncated']} truncated, "
            f"{c['dropped']} dropped (too long)")


def _plots(out: Path, runs: dict, curves: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, style in zip(IMPLS, ("-", "--")):
        steps = [m["step"] for m in runs[impl][0]]
        ax.plot(steps, curves[impl], style, label=impl)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.set_title("loss curves (overlaid)")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    names.append("loss_curves.png")
    plt.close(fig)
    if any("reward" in m for m in runs["fused"][0]):
        names.append(_reward_plot(out, runs, plt))
    for key, label, fname in (("peak_memory_mb", "peak memory (MB)", "peak_memory.png"),
                              ("tokens_per_s", "tokens / s", "tokens_per_s.png")):
        values = [runs[impl][1].get(key) or 0.0 for impl in IMPLS]
        fig, ax = plt.subplots(figsize=(4, 3.5))
        bars = ax.bar(IMPLS, values, color=["tab:blue", "tab:orange"])
        ratio = values[0] / values[1] if values[1] else float("nan")
        ax.bar_label(bars, fmt="%.0f")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: fused/unfused = {ratio:.2f}x")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        names.append(fname)
        plt.close(fig)
    return names


def _reward_plot(out: Path, runs: dict, plt) -> str:
    """Mean reward of each step's sampled completions, both runs overlaid."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, style in zip(IMPLS, ("-", "--")):
        steps = [m["step"] for m in runs[impl][0] if "reward" in m]
        ax.plot(steps, [m["reward"] for m in runs[impl][0] if "reward" in m], style,
                label=impl)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward of the sampled completions")
    ax.legend()
    ax.set_title("reward curves (overlaid)")
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=100)
    plt.close(fig)
    return "reward_curves.png"
