"""The long-context claim, measured: the longest sequence for which one training step of a
Llama-3-8B-shaped model fits on one GPU, fused vs unfused loss, next to the planner's answer.

    python benchmarks/long_context.py OUT_DIR                # one H200: ~3-5 minutes
    python benchmarks/long_context.py --dry-run OUT_DIR      # CPU, a tiny model, ~1 minute

Not part of the 7-minute ``gpu_session.py``: its own device call. One training step = forward,
backward and an AdamW step (bf16 parameters, gradients and moments: the planner's
``--precision bf16``), activation checkpointing (Hugging Face's, non-reentrant), SDPA
attention, batch 1, SFT (every token scored). Unfused: ``LlamaForCausalLM(..., labels=)``,
Hugging Face's own loss on materialised logits; fused: the decoder's last hidden states into
``fused_losses.linear_cross_entropy`` with ``lm_head.weight``.

Full depth does not have to run: ``--layers L`` real decoder layers are built and the other
``32 - L`` are stood in for by a ballast allocation of exactly the planner's per-layer terms
(parameters + gradients + AdamW moments, and the checkpointed layer input, ``2 H`` bytes a
token). A length "fits" when a step completes (CUDA: no out-of-memory error; the dry run's
CPU has none, so there a step fits when its peak resident memory plus the ballast stays under
``--dry-budget-mb``). Search: from the planner's prediction, up by 1.25x or down by 0.8x until
the answer flips, then bisection to ``--granularity`` tokens.

Writes ``long_context.json`` (every trial: length, fits, peak bytes, seconds) and
``long_context.md`` into OUT_DIR.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import replace

import torch

from fused_losses import linear_cross_entropy, planner
from fused_losses._memory import reset_peak_rss, status_kib

DTYPE = torch.bfloat16
# (model preset, full depth): the dry run's tiny Llama keeps the same code path.
FULL = planner.PRESETS["llama3-8b"]
TINY = planner.ModelDims("tiny-llama-4", 64, 4, 4, 2, 128, 32000)


class OutOfMemory(Exception):
    """A step did not fit (CUDA's out-of-memory error, or the dry run's budget)."""


def build(dims: planner.ModelDims, layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=dims.hidden, intermediate_size=dims.intermediate,
                         num_hidden_layers=layers, num_attention_heads=dims.heads,
                         num_key_value_heads=dims.kv_heads, vocab_size=dims.vocab,
                         head_dim=dims.hd, tie_word_embeddings=dims.tied,
                         max_position_embeddings=1 << 21, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if hasattr(model, "activation_checkpointing_enable"):  # its newer name (transformers 5.2x)
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5)


def step(model, optimizer, tokens: int, fused: bool, device: str) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    if fused:
        hidden = model.model(input_ids=ids).last_hidden_state
        loss = linear_cross_entropy(hidden[0, :-1], model.lm_head.weight, ids[0, 1:])
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def ballast_bytes(dims: planner.ModelDims, missing: int, tokens: int) -> int:
    """The planner's per-layer terms for ``missing`` layers (bf16 params/grads/moments, one
    checkpointed [tokens, H] input each)."""
    state = 2 + 2 + planner.OPTIMIZER_BYTES[("adamw", "bf16")]
    return missing * (dims.layer_params() * state + 2 * dims.hidden * tokens)


class Trial:
    """One step at ``tokens`` with the ballast; raises OutOfMemory when it does not fit."""

    def __init__(self, model, optimizer, dims, layers, device, dry_budget):
        self.model, self.optimizer, self.dims = model, optimizer, dims
        self.missing = dims.layers - layers
        self.device, self.dry_budget = device, dry_budget
        if device == "cpu":  # the emulated device: RSS above now, plus the model's state
            gc.collect()
            self.cpu_base = status_kib("VmRSS") * 1024
            self.cpu_state = sum(p.numel() * p.element_size() for p in model.parameters()) * (
                2 + planner.OPTIMIZER_BYTES[("adamw", "bf16")]) // 2  # params, grads, moments

    def __call__(self, tokens: int, fused: bool) -> dict:
        extra = ballast_bytes(self.dims, self.missing, tokens)
        gc.collect()
        t0 = time.time()
        cuda = self.device.startswith("cuda")
        ballast = None
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                ballast = torch.empty(extra, dtype=torch.uint8, device=self.device)
            else:
                reset_peak_rss()
            loss = step(self.model, self.optimizer, tokens, fused, self.device)
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            else:
                peak = status_kib("VmHWM") * 1024 - self.cpu_base + self.cpu_state + extra
                if peak > self.dry_budget:
                    raise OutOfMemory(f"peak {peak} > dry-run budget {self.dry_budget}")
        except torch.cuda.OutOfMemoryError as err:
            self.optimizer.zero_grad(set_to_none=True)
            raise OutOfMemory(str(err).splitlines()[0]) from None
        finally:
            del ballast
        return {"tokens": tokens, "fits": True, "peak_bytes": peak, "ballast_bytes": extra,
                "loss": loss, "seconds": round(time.time() - t0, 2)}


def search(trial, fused: bool, start: int, granularity: int, deadline: float, say) -> dict:
    """Longest length (a multiple of ``granularity``) whose step fits, from ``start``."""
    trials = []

    def fits(tokens: int) -> bool:
        try:
            record = trial(tokens, fused)
        except OutOfMemory as err:
            record = {"tokens": tokens, "fits": False, "error": str(err)[:200]}
        trials.append(record)
        say(f"{'fused' if fused else 'unfused'} T={tokens}: "
            + (f"fits, peak {record['peak_bytes'] / 2**30:.2f} GiB ({record['seconds']} s)"
               if record["fits"] else f"does not fit ({record['error'][:80]})"))
        return record["fits"]

    def snap(tokens: float) -> int:
        return max(granularity, int(tokens) // granularity * granularity)

    lo = hi = None  # the longest length seen to fit, the shortest seen not to
    tokens = snap(start)
    while time.time() < deadline:  # bracket: up by 1.25x or down by 0.8x until it flips
        if fits(tokens):
            lo = tokens
            if hi is not None:
                break
            tokens = max(snap(tokens * 1.25), tokens + granularity)
        else:
            hi = tokens
            if lo is not None or tokens == granularity:
                break
            tokens = min(snap(tokens * 0.8), tokens - granularity)
    while lo is not None and hi is not None and hi - lo > granularity \
            and time.time() < deadline:  # bisect; lo and hi are multiples of granularity
        mid = snap((lo + hi) / 2)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"longest_fitting": lo, "smallest_failing": hi, "trials": trials,
            "complete": lo is not None and hi is not None and hi - lo <= granularity}


def planner_setup(gpu_mem_gib: float, backend: str, reserve_gib: float) -> planner.Setup:
    """The planner's question for this measurement: one GPU, checkpointing, bf16, and the
    loss this script runs, ``linear_cross_entropy`` (mean, every token its own group: the
    planner's objective ``"ce"``) on its default path (the one pass) and backend."""
    return planner.Setup(seq_len=1, micro_batch=1, gpus=1, gpu_mem=gpu_mem_gib,
                         reserve=reserve_gib, objective="ce", checkpointing=True,
                         precision="bf16", optimizer="adamw", backend=backend,
                         path="one-pass")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, emulated budget")
    ap.add_argument("--layers", type=int, default=None,
                    help="real decoder layers (default: 4 on a GPU, 2 in the dry run)")
    ap.add_argument("--impls", default="fused,unfused")
    ap.add_argument("--granularity", type=int, default=None,
                    help="tokens (default 1024; dry run 256)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for all searches (default 240; dry run 90)")
    ap.add_argument("--dry-budget-mb", type=float, default=160,
                    help="dry run: the emulated device memory")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    dims = FULL if cuda else TINY
    layers = args.layers or (4 if cuda else 2)
    granularity = args.granularity or (1024 if cuda else 256)
    budget_s = args.budget_s or (240 if cuda else 90)
    impls = args.impls.split(",")
    if not 1 <= layers <= dims.layers or set(impls) - {"fused", "unfused"}:
        print(f"--layers must be in [1, {dims.layers}] and --impls fused,unfused",
              file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    os.environ.setdefault("TRITON_INTERPRET", "0" if cuda else "1")
    backend = "auto" if cuda else "torch"  # what linear_cross_entropy runs here
    if cuda:
        gpu_mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        name = torch.cuda.get_device_name()
    else:
        gpu_mem, name = args.dry_budget_mb / 1024, "cpu (emulated budget)"
    start = time.time()
    log = open(os.path.join(args.out_dir, "long_context.log"), "w")

    def say(line):
        line = f"[{time.time() - start:6.1f}s] {line}"
        print(line, flush=True)
        log.write(line + "\n")

    doc = {"device": name, "torch": torch.__version__, "model": dims.name,
           "full_layers": dims.layers, "real_layers": layers, "granularity": granularity,
           "gpu_mem_gib": gpu_mem, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": " ".join(sys.argv), "results": {}}
    model, optimizer = build(dims, layers, device)
    step(model, optimizer, 2 * granularity, True, device)  # AdamW's moments exist from here
    trial = Trial(model, optimizer, dims, layers, device, args.dry_budget_mb * 2**20)
    # The planner keeps 2 GiB back for the CUDA context and allocator slack; the dry run's
    # emulated budget has none.
    setup = planner_setup(gpu_mem, backend, planner.Setup.reserve if cuda else 0.0)
    deadline = start + budget_s
    for i, impl in enumerate(impls):
        fused = impl == "fused"
        predicted = planner.max_seq_len(dims, setup, fused)
        say(f"{impl}: the planner predicts {predicted} tokens on {gpu_mem:.1f} GiB")
        share = deadline - (deadline - time.time()) * (len(impls) - i - 1) / (len(impls) - i)
        found = search(trial, fused, predicted, granularity, share, say)
        measured = found["longest_fitting"]
        at = [t for t in found["trials"] if t["fits"] and t["tokens"] == measured]
        planned_peak = (planner.breakdown(dims, replace(setup, seq_len=measured), fused)["peak"]
                        if measured else None)
        found.update(predicted_tokens=predicted, planner_peak_bytes_at_longest=planned_peak,
                     measured_peak_bytes_at_longest=at[0]["peak_bytes"] if at else None,
                     tokens_error=(predicted - measured) / measured if measured else None)
        doc["results"][impl] = found
        say(f"{impl}: longest measured {measured} (first failure {found['smallest_failing']}), "
            f"planner {predicted}" + (f" ({found['tokens_error']:+.1%})" if measured else ""))
        with open(os.path.join(args.out_dir, "long_context.json"), "w") as f:
            json.dump(doc, f, indent=1)
    with open(os.path.join(args.out_dir, "long_context.md"), "w") as f:
        f.write(markdown(doc))
    say(f"wrote {args.out_dir}/long_context.{{json,md}}")
    return 0


def markdown(doc: dict) -> str:
    out = [f"# Longest training step on one {doc['device']}: {doc['model']}, "
           f"{doc['real_layers']} real layers + {doc['full_layers'] - doc['real_layers']} as "
           f"the planner's per-layer terms", "",
           "bf16 parameters, gradients and AdamW moments; activation checkpointing; batch 1; "
           f"SFT; lengths to {doc['granularity']} tokens. `{doc['command']}`", "",
           "| loss | longest step that fits (tokens) | first that does not | planner predicts | "
           "error | measured peak GiB | planner peak GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for impl, r in doc["results"].items():
        def gib(x):
            return f"{x / 2**30:.2f}" if x else "-"
        err = f"{r['tokens_error']:+.1%}" if r["tokens_error"] is not None else "-"
        out.append(f"| {impl} | {r['longest_fitting'] or '-'} | {r['smallest_failing'] or '-'} "
                   f"| {r['predicted_tokens']} | {err} | "
                   f"{gib(r['measured_peak_bytes_at_longest'])} | "
                   f"{gib(r['planner_peak_bytes_at_longest'])} |")
    both = doc["results"]
    if all(both.get(k, {}).get("longest_fitting") for k in ("fused", "unfused")):
        ratio = both["fused"]["longest_fitting"] / both["unfused"]["longest_fitting"]
        out += ["", f"Fused / unfused: {ratio:.2f}x the sequence length."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
