"""Vocab-parallel log-probs on gloo/CPU: 2 and 3 ranks against the single-process primitive.

One spawn per world size runs every check (spawning torch is the slow part); each check's
outcome on each rank comes back as a file and becomes its own pytest test. V = 1001 is
divisible by neither 2 nor 3, so shards are uneven; H = 37 and N = 14 fit no block.
"""
from __future__ import annotations

import json
import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_losses import linear_logprobs
from fused_losses.vocab_parallel import routes_here, vocab_parallel_logprobs

N_LEAD, H, V = (2, 7), 37, 1001
OUTPUTS = ("logprobs", "lse", "argmax", "entropy", "logits_mean")
TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


# ---------------------------------------------------------------------------------------------
# Helpers run inside each rank
# ---------------------------------------------------------------------------------------------

def _inputs(dtype, *, bias=False, seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*N_LEAD, H, generator=g, dtype=torch.float64) / H ** 0.25
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.25
    targets = torch.randint(0, V, N_LEAD, generator=g)
    targets[torch.rand(N_LEAD, generator=g) < ignore_frac] = -100
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    return hidden.to(dtype), weight.to(dtype), targets, None if b is None else b.to(dtype)


def _even_layout(rank, world):
    per, extra = divmod(V, world)  # the first `extra` ranks get one row more
    sizes = [per + (r < extra) for r in range(world)]
    return sum(sizes[:rank]), sizes[rank]


def _upstream(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N_LEAD, generator=g, dtype=torch.float64) for _ in range(4)]


def _loss(out, coefs, which):
    total = 0.0
    for name, c in zip(("logprobs", "lse", "entropy", "logits_mean"), coefs):
        if name in which and getattr(out, name) is not None:
            total = total + (getattr(out, name).double() * c).sum()
    return total


def _run_pair(dtype, *, bias=False, layout=None, grads_of=OUTPUTS, **options):
    """Sharded and single-process results for one configuration, with gradients."""
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, weight, targets, b = _inputs(dtype, bias=bias)
    start, size = layout(rank, world) if layout else _even_layout(rank, world)
    flags = dict(return_lse=True, return_argmax=True, return_entropy=True,
                 return_logits_mean=True)
    flags.update(options)
    coefs = _upstream()

    full = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    ref = linear_logprobs(full[0], full[1], targets, full[2], backend="torch", **flags)
    _loss(ref, coefs, grads_of).backward()

    part = [hidden.clone().requires_grad_(), weight[start:start + size].clone().requires_grad_(),
            None if b is None else b[start:start + size].clone().requires_grad_()]
    out = vocab_parallel_logprobs(part[0], part[1], targets, part[2], backend="torch",
                                  process_group=None,
                                  vocab_start=start if layout else None, **flags)
    _loss(out, coefs, grads_of).backward()
    return ref, out, full, part, (start, size)


def _compare(ref, out, full, part, span, dtype):
    tol = TOL[dtype]
    start, size = span
    for name in OUTPUTS:
        a, e = getattr(out, name), getattr(ref, name)
        if e is None:
            assert a is None, name
            continue
        if name == "argmax":
            assert torch.equal(a, e), f"argmax: {a} vs {e}"
        else:
            torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(part[0].grad, full[0].grad, rtol=tol, atol=tol,
                               msg=lambda m: f"d hidden: {m}")
    torch.testing.assert_close(part[1].grad, full[1].grad[start:start + size], rtol=tol,
                               atol=tol, msg=lambda m: f"d weight shard: {m}")
    if part[2] is not None:
        torch.testing.assert_close(part[2].grad, full[2].grad[start:start + size], rtol=tol,
                                   atol=tol, msg=lambda m: f"d bias shard: {m}")


# ---------------------------------------------------------------------------------------------
# Checks (each runs on every rank; collectives first, assertions last)
# ---------------------------------------------------------------------------------------------

def check_all_outputs_fp64():
    _compare(*_run_pair(torch.float64), torch.float64)


def check_bias_temperature_softcap_fp64():
    _compare(*_run_pair(torch.float64, bias=True, temperature=0.7, softcap=3.0), torch.float64)


def check_fp32_small_chunks():
    _compare(*_run_pair(torch.float32, bias=True, chunk_size=3, softcap=5.0), torch.float32)


def check_logprobs_gradient_only():
    # Only dL/dlogp flows: the -p part must still reach ranks that do not own the target.
    _compare(*_run_pair(torch.float64, return_lse=False, return_entropy=False,
                        return_logits_mean=False, return_argmax=False,
                        grads_of=("logprobs",)), torch.float64)


def check_each_gradient_alone():
    for name in ("lse", "entropy", "logits_mean"):
        _compare(*_run_pair(torch.float64, bias=True, temperature=1.3, grads_of=(name,)),
                 torch.float64)


def check_uneven_explicit_vocab_start():
    # Rank r holds a slice of size proportional to r + 1 (deliberately unbalanced), placed
    # in reverse rank order so vocab_start is not the rank-order prefix sum.
    def layout(rank, world):
        weights = [r + 1 for r in range(world)]
        sizes = [V * w // sum(weights) for w in weights]
        sizes[-1] += V - sum(sizes)
        order = list(reversed(range(world)))
        starts, acc = {}, 0
        for r in order:
            starts[r] = acc
            acc += sizes[r]
        return starts[rank], sizes[rank]
    _compare(*_run_pair(torch.float64, bias=True, layout=layout), torch.float64)


def check_triton_backend_interpreted():
    # The Triton kernels (same interface) under the interpreter, fp32, against the torch
    # backend on the full weight. Skipped where triton is not installed.
    try:
        import triton  # noqa: F401
    except ImportError:
        return "skipped: triton not importable"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "skipped: TRITON_INTERPRET is not 1"
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, weight, targets, b = _inputs(torch.float32, bias=True)
    start, size = _even_layout(rank, world)
    flags = dict(return_lse=True, return_argmax=True, return_entropy=True,
                 return_logits_mean=True, temperature=0.8, softcap=4.0)
    coefs = _upstream()
    full = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    ref = linear_logprobs(*full[:2], targets, full[2], backend="torch", **flags)
    _loss(ref, coefs, OUTPUTS).backward()
    part = [hidden.clone().requires_grad_(), weight[start:start + size].clone().requires_grad_(),
            b[start:start + size].clone().requires_grad_()]
    out = vocab_parallel_logprobs(*part[:2], targets, part[2], backend="triton", **flags)
    _loss(out, coefs, OUTPUTS).backward()
    for name in OUTPUTS:
        a, e = getattr(out, name), getattr(ref, name)
        if name == "argmax":
            assert torch.equal(a, e), (a, e)
        else:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    for got, want, name in ((part[0].grad, full[0].grad, "hidden"),
                            (part[1].grad, full[1].grad[start:start + size], "weight"),
                            (part[2].grad, full[2].grad[start:start + size], "bias")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def check_argmax_ties_across_ranks():
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, weight, targets, _ = _inputs(torch.float64)
    lo, hi = 3, V - 2  # on the first and the last rank
    weight[hi] = weight[lo]
    hidden[0, :] = weight[lo] * 4.0  # rows 0..6 all peak at both lo and hi
    start, size = _even_layout(rank, world)
    out = vocab_parallel_logprobs(hidden, weight[start:start + size], targets,
                                  return_argmax=True, backend="torch")
    ref = linear_logprobs(hidden, weight, targets, return_argmax=True, backend="torch")
    assert torch.equal(out.argmax, ref.argmax), (out.argmax, ref.argmax)
    scored = targets[0] != -100
    assert bool((out.argmax[0][scored] == lo).all()), out.argmax[0]


def check_dtensor_colwise_parallel_lm_head():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    hidden, weight, targets, bias = _inputs(torch.float64, bias=True)
    coefs = _upstream()

    ref_h, ref_w, ref_b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    flags = dict(return_lse=True, return_argmax=True, return_entropy=True,
                 return_logits_mean=True, backend="torch", temperature=0.9)
    ref = linear_logprobs(ref_h, ref_w, targets, ref_b, **flags)
    _loss(ref, coefs, OUTPUTS).backward()

    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(H, V, dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight.copy_(weight)
        model.lm_head.bias.copy_(bias)
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    w, b = model.lm_head.weight, model.lm_head.bias
    assert isinstance(w, DTensor) and w.placements[0].is_shard(0), w
    assert not routes_here() and routes_here(vocab_start=0)  # DTensors opt in explicitly
    h = hidden.clone().requires_grad_()
    out = vocab_parallel_logprobs(h, w, targets, b, **flags)
    _loss(out, coefs, OUTPUTS).backward()

    for name in OUTPUTS:
        a, e = getattr(out, name), getattr(ref, name)
        if name == "argmax":
            assert torch.equal(a, e)
        else:
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-9, atol=1e-9)
    for param, want in ((w, ref_w.grad), (b, ref_b.grad)):
        assert isinstance(param.grad, DTensor), type(param.grad)
        torch.testing.assert_close(param.grad.full_tensor(), want, rtol=1e-9, atol=1e-9)
    # The ColwiseParallel module's own (materialising) forward agrees on the local logits.
    logits = model.lm_head(hidden)
    local = logits.to_local() if hasattr(logits, "to_local") else logits
    torch.testing.assert_close(local, hidden @ w.to_local().T + b.to_local())


def check_bf16_against_fp64():
    # bf16 inputs (dH all-reduced in bf16) against the float64 single-process reference, at
    # the bf16 tolerance of tests/helpers.py; the single-process bf16 result is held to the
    # same bound, so sharding adds no error beyond bf16's own.
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, weight, targets, b = _inputs(torch.float64, bias=True)
    start, size = _even_layout(rank, world)
    coefs = _upstream()
    flags = dict(return_lse=True, return_entropy=True, return_logits_mean=True,
                 backend="torch", softcap=5.0)
    runs = {}
    for name, dtype, span in (("ref", torch.float64, (0, V)), ("single", torch.bfloat16, (0, V)),
                              ("sharded", torch.bfloat16, (start, size))):
        lo, n = span
        leaves = [t.to(dtype).detach().requires_grad_()
                  for t in (hidden, weight[lo:lo + n], b[lo:lo + n])]
        fn = vocab_parallel_logprobs if name == "sharded" else linear_logprobs
        out = fn(leaves[0], leaves[1], targets, leaves[2], **flags)
        _loss(out, coefs, OUTPUTS).backward()
        runs[name] = (out, leaves)
    ref_out, ref_leaves = runs["ref"]
    for name in ("single", "sharded"):
        out, leaves = runs[name]
        for field in ("logprobs", "lse", "entropy", "logits_mean"):
            torch.testing.assert_close(getattr(out, field).double(), getattr(ref_out, field),
                                       rtol=5e-2, atol=8e-2, msg=lambda m: f"{name} {field}: {m}")
        grads = ((leaves[0].grad, ref_leaves[0].grad),
                 (leaves[1].grad, ref_leaves[1].grad[start:start + size] if name == "sharded"
                  else ref_leaves[1].grad),
                 (leaves[2].grad, ref_leaves[2].grad[start:start + size] if name == "sharded"
                  else ref_leaves[2].grad))
        for got, want in grads:
            torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=8e-2)


def check_all_targets_ignored():
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, weight, _, _ = _inputs(torch.float64)
    targets = torch.full(N_LEAD, -100)
    start, size = _even_layout(rank, world)
    h, w = hidden.clone().requires_grad_(), weight[start:start + size].clone().requires_grad_()
    out = vocab_parallel_logprobs(h, w, targets, return_lse=True, return_argmax=True,
                                  return_entropy=True, backend="torch")
    (out.logprobs.sum() + out.lse.sum() + out.entropy.sum()).backward()
    assert not out.logprobs.any() and not out.lse.any()
    assert bool((out.argmax == -100).all())
    assert not h.grad.any() and not w.grad.any()


def _dpo_from_token_logps(logps, ref_logps, mask, beta=0.1):
    """Sigmoid DPO on summed per-token log-probs; first half chosen, second rejected."""
    seq = (logps * mask).sum(-1)
    ref = (ref_logps * mask).sum(-1)
    half = seq.shape[0] // 2
    h = (seq[:half] - ref[:half]) - (seq[half:] - ref[half:])
    return -torch.nn.functional.logsigmoid(beta * h).mean()


def check_dpo_end_to_end():
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    pairs, T = 2, 9
    hidden = torch.randn(2 * pairs, T, H, generator=g, dtype=torch.float64) / H ** 0.25
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.25
    labels = torch.randint(0, V, (2 * pairs, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    ref_logps = -torch.rand(2 * pairs, T, generator=g, dtype=torch.float64) * 5
    mask = (labels != -100).double()
    start, size = _even_layout(rank, world)

    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = linear_logprobs(h_ref, w_ref, labels, backend="torch").logprobs
    loss_ref = _dpo_from_token_logps(lp, ref_logps, mask)
    loss_ref.backward()

    h, w = hidden.clone().requires_grad_(), weight[start:start + size].clone().requires_grad_()
    lp = vocab_parallel_logprobs(h, w, labels, backend="torch").logprobs
    loss = _dpo_from_token_logps(lp, ref_logps, mask)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad[start:start + size], rtol=1e-9, atol=1e-12)

    # The library's own objective, through the two keywords on linear_logprobs.
    import fused_losses

    parallel = dict(process_group=dist.group.WORLD, vocab_start=start)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lib = _library_dpo(fused_losses.dpo_loss, h_ref, w_ref, labels, ref_logps, {})
    lib.loss.backward()
    h, w = hidden.clone().requires_grad_(), weight[start:start + size].clone().requires_grad_()
    par = _library_dpo(fused_losses.dpo_loss, h, w, labels, ref_logps, parallel)
    par.loss.backward()
    torch.testing.assert_close(par.loss, lib.loss, rtol=1e-10, atol=1e-12)
    for name, value in lib.metrics.items():  # rewards, logps, logits/chosen (mean logit)
        torch.testing.assert_close(par.metrics[name], value, rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"metric {name}: {m}")
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad[start:start + size], rtol=1e-9, atol=1e-12)


def _library_dpo(dpo_loss, hidden, weight, labels, ref_logps, parallel):
    return dpo_loss(hidden, weight, labels, ref_logprobs=ref_logps, backend="torch",
                    **parallel)


def check_errors_name_the_argument():
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, weight, targets, _ = _inputs(torch.float64)
    start, size = _even_layout(rank, world)
    bad = targets.clone()
    bad[0, 0] = V  # one past the global vocabulary, inside no shard
    try:
        vocab_parallel_logprobs(hidden, weight[start:start + size], bad, backend="torch")
    except ValueError as e:
        assert "targets" in str(e) and f"[0, {V})" in str(e), e
    else:
        raise AssertionError("out-of-range target not rejected")
    try:  # every rank claims to start at 0: overlapping shards
        vocab_parallel_logprobs(hidden, weight[start:start + size], targets, vocab_start=0,
                                backend="torch")
    except ValueError as e:
        assert "vocab_start" in str(e), e
    else:
        raise AssertionError("overlapping shards not rejected")


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items()
          if name.startswith("check_") and callable(fn)}


# ---------------------------------------------------------------------------------------------
# Process launch
# ---------------------------------------------------------------------------------------------

def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    try:
        for name, check in CHECKS.items():
            try:
                note = check()
                results[name] = note if isinstance(note, str) else "ok"
            except Exception:  # reported per check by the parent
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULTS: dict[int, list[dict]] = {}


def _results(world, tmp_path_factory):
    if world not in _RESULTS:
        out_dir = str(tmp_path_factory.mktemp(f"vp{world}"))
        mp.spawn(_worker, args=(world, _free_port(), out_dir), nprocs=world, join=True)
        _RESULTS[world] = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                _RESULTS[world].append(json.load(f))
    return _RESULTS[world]


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel(world, check, tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    results = _results(world, tmp_path_factory)
    outcomes = [res.get(check, "not run") for res in results]
    if all(o.startswith("skipped") for o in outcomes):
        pytest.skip(outcomes[0])
    failures = [f"rank {r}:\n{o}" for r, o in enumerate(outcomes) if o != "ok"]
    assert not failures, "\n".join(failures)
