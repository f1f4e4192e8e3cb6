"""PNG plots from a results JSON written by ``run.py`` (matplotlib, Agg; no display needed).

    python benchmarks/plot.py benchmarks/results/cpu_sweep.json

Per mode: forward+backward time and peak memory above the inputs against N and against V
(one line per variant) where the results sweep them; a bar chart for single-case results.
"""
from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_STYLE = {"naive": ("black", "o", "--"), "naive_compile": ("grey", "o", ":"),
          "torch_lce": ("tab:blue", "s", "-"), "torch_lce_ar1": ("tab:cyan", "s", "-"),
          "liger": ("tab:purple", "^", "-"), "liger_dpo": ("tab:purple", "^", "-"),
          "cce": ("tab:olive", "v", "-"), "cce_exact": ("tab:brown", "v", "-"),
          "ours_torch": ("tab:red", "D", "-"), "ours_torch_gif": ("tab:red", "D", "-"),
          "ours_torch_recompute": ("tab:orange", "D", "-"), "ours_triton": ("tab:green", "*", "-")}


def _style(name):
    color, marker, line = _STYLE.get(name, (None, ".", "-"))
    return dict(color=color, marker=marker, linestyle=line, label=name)


def _title(meta):
    return (f"{meta['device_name']} / {meta['cpu_model']} ({meta['torch_threads']} threads), "
            f"torch {meta['torch']}, {meta['date'][:10]}")


def _sweep_axes(rows, mode):
    """{"N": (fixed description, rows), "V": ...} for sweeps over N or V in this mode."""
    out = {}
    for axis in ("N", "V"):
        sub = [r for r in rows if r["mode"] == mode and r["status"] == "ok"
               and r["sweep"].split("_")[0] == axis]
        if len({r[axis] for r in sub}) > 1:
            out[axis] = sub
    return out


def plot_results(path: str) -> list[str]:
    with open(path) as f:
        doc = json.load(f)
    meta, rows = doc["meta"], doc["rows"]
    stem = os.path.splitext(path)[0]
    written = []
    for mode in sorted({r["mode"] for r in rows}):
        axes = _sweep_axes(rows, mode)
        if axes:
            written.append(_plot_sweeps(axes, mode, meta, f"{stem}_{mode}.png"))
        else:
            ok = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
            if ok:
                written.append(_plot_bars(ok, mode, meta, f"{stem}_{mode}.png"))
    return written


def _plot_sweeps(axes, mode, meta, out):
    fig, grid = plt.subplots(2, len(axes), figsize=(6.5 * len(axes), 8), squeeze=False)
    for col, (axis, sub) in enumerate(sorted(axes.items())):
        groups = sorted({r["sweep"] for r in sub})
        for group in groups:
            for name in dict.fromkeys(r["variant"] for r in sub):
                pts = sorted((r[axis], r["fwdbwd_ms"], r["peak_mb"]) for r in sub
                             if r["variant"] == name and r["sweep"] == group)
                if not pts:
                    continue
                style = _style(name if len(groups) == 1 else f"{name} {group}")
                style.update({k: v for k, v in _style(name).items() if k != "label"})
                x = [p[0] for p in pts]
                grid[0][col].plot(x, [p[1] for p in pts], **style)
                grid[1][col].plot(x, [p[2] for p in pts], **style)
        fixed = sub[0]
        other = ", ".join(f"{k}={fixed[k]}" for k in ("N", "H", "V") if k != axis)
        for row, label in enumerate(("forward+backward time (ms)", "peak memory above inputs (MB)")):
            ax = grid[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"{axis} ({other}, {fixed['dtype']})")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        grid[0][col].legend(fontsize=8)
    fig.suptitle(f"{mode}: {_title(meta)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_bars(ok, mode, meta, out):
    names = [r["variant"] for r in ok]
    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    fwd = [r["fwd_ms"] for r in ok]
    bwd = [r["bwd_ms"] for r in ok]
    colors = [_style(n)["color"] or "tab:gray" for n in names]
    t_ax.barh(names, fwd, color=colors, alpha=0.55, label="forward")
    t_ax.barh(names, bwd, left=fwd, color=colors, label="backward")
    for i, r in enumerate(ok):
        t_ax.errorbar(r["fwdbwd_ms"], i, xerr=[[r["fwdbwd_ms"] - r["fwdbwd_min"]],
                                               [r["fwdbwd_max"] - r["fwdbwd_ms"]]],
                      color="black", capsize=3)
        ratio = r.get("time_x_naive")
        t_ax.text(r["fwdbwd_max"], i, f" {ratio:.2f}x" if ratio else "", va="center", fontsize=8)
    t_ax.set_xlabel("time (ms): forward (light) + backward; bar = median, whisker = min..max")
    t_ax.legend(fontsize=8)
    m_ax.barh(names, [r["peak_mb"] for r in ok], color=colors)
    for i, r in enumerate(ok):
        ratio = r.get("mem_x_naive")
        m_ax.text(r["peak_mb"], i, f" {r['peak_mb']:.0f} MB" + (f" ({ratio:.2f}x)" if ratio
                                                                 else ""), va="center", fontsize=8)
    m_ax.set_xlabel("peak memory above inputs (MB), one forward+backward step")
    m_ax.set_yticks(range(len(names)), [""] * len(names))
    r0 = ok[0]
    size = f"N={r0['N']} H={r0['H']} V={r0['V']} {r0['dtype']}"
    fig.suptitle(f"{mode} ({size}): {_title(meta)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    for p in sys.argv[1:]:
        for written in plot_results(p):
            print(written)
