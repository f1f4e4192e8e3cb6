"""PNG plots from a results JSON written by ``run.py`` (matplotlib, Agg; no display needed).

    python benchmarks/plot.py benchmarks/results/cpu_sweep.json

Per mode: forward+backward time and peak memory above the inputs against N and against V
(one line per variant) where the results sweep them; a bar chart for single-case results.
``plot_session`` draws a GPU session's results (``gpu_session.py``): one bar chart per case,
every mode in it, time against the 6NHV floor.
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
          "ours_torch_recompute": ("tab:orange", "D", "-"), "ours_triton": ("tab:green", "*", "-"),
          "ours_cublas": ("tab:cyan", "*", "-"), "trl": ("tab:pink", "P", "-"),
          "compile_chunked": ("dimgrey", "o", ":")}


def _style(name):
    """A variant's colour, marker and line; ``ours_triton_filter`` falls back to
    ``ours_triton`` (the longest known prefix)."""
    known = max((k for k in _STYLE if name == k or name.startswith(k + "_")), key=len,
                default=None)
    color, marker, line = _STYLE.get(known, (None, ".", "-"))
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


def _plot_bars(ok, mode, meta, out, labels=None, floor_ms=None):
    """Time (forward + backward) and peak memory bars per row; ratios to naive, or to the
    6NHV floor when ``floor_ms`` is given (drawn as a line)."""
    names = labels or [r["variant"] for r in ok]
    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.32 * len(ok)))
    fwd = [r["fwd_ms"] for r in ok]
    bwd = [r["bwd_ms"] for r in ok]
    colors = [_style(r["variant"])["color"] or "tab:gray" for r in ok]
    t_ax.barh(names, fwd, color=colors, alpha=0.55, label="forward")
    t_ax.barh(names, bwd, left=fwd, color=colors, label="backward")
    for i, r in enumerate(ok):
        t_ax.errorbar(r["fwdbwd_ms"], i, xerr=[[r["fwdbwd_ms"] - r["fwdbwd_min"]],
                                               [r["fwdbwd_max"] - r["fwdbwd_ms"]]],
                      color="black", capsize=3)
        ratio = r.get("x_floor") if floor_ms else r.get("time_x_naive")
        t_ax.text(r["fwdbwd_max"], i, f" {ratio:.2f}x" if ratio else "", va="center", fontsize=8)
    if floor_ms:
        t_ax.axvline(floor_ms, color="black", linestyle=":", label=f"6NHV floor {floor_ms:.1f} ms")
    t_ax.set_xlabel("time (ms): forward (light) + backward; median, whisker min..max"
                    + (";\nratio to the floor" if floor_ms else ""))
    t_ax.legend(fontsize=8)
    m_ax.barh(names, [r["peak_mb"] for r in ok], color=colors)
    if floor_ms:  # the gradients of hidden and weight, which every implementation produces
        m_ax.barh(names, [r["grads_mb"] for r in ok], color="white", alpha=0.5, hatch="//",
                  label="of which: gradients of hidden and weight")
        m_ax.legend(fontsize=8)
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


def plot_session(doc: dict, out_dir: str) -> list[str]:
    """``session_<case>.png`` per case of a GPU session's ``doc`` (its JSON)."""
    meta = dict(doc["meta"])
    meta["device_name"] = (meta.get("device") or {}).get("name", meta.get("device_name"))
    written = []
    for case in dict.fromkeys(r["sweep"] for r in doc["rows"]):
        ok = [r for r in doc["rows"] if r["sweep"] == case and r["status"] == "ok"]
        if not ok:
            continue
        first = ok[0]
        title = case + (f", softcap {first['softcap']}" if first.get("softcap") else "")
        path = os.path.join(out_dir, f"session_{case}.png")
        written.append(_plot_bars(ok, title, meta, path,
                                  labels=[f"{r['mode']}: {r['variant']}" for r in ok],
                                  floor_ms=first.get("floor_ms")))
    return written


if __name__ == "__main__":
    for p in sys.argv[1:]:
        for written in plot_results(p):
            print(written)
