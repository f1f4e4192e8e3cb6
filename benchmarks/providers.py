"""Every benchmarked variant, in one place.

A provider turns a case's inputs into ``forward() -> scalar loss``; the worker times that call
and ``loss.backward()`` separately. Three modes, each with its own naive baseline (ratios are
always taken against the ``naive`` row of the same mode and case):

* ``logprobs`` -- the generic primitive: per-token target log-probs with an upstream gradient
  ``g`` (fixed, random) on them, i.e. ``(logprobs * g).sum().backward()``. Naive materialises
  ``[N, V]`` logits (``fused_losses.reference.linear_logprobs_reference``).
* ``ce`` -- mean cross-entropy. Naive is ``F.cross_entropy(h @ W.T, y)``.
* ``dpo`` -- sigmoid DPO on ``[2B, T]`` (chosen rows first, then rejected), reference model
  computed from reference hidden states (no gradient). Naive materialises both models' logits.
* ``grpo`` -- GRPO (TRL's default ``dapo`` loss, k3 KL with β = 0.04) on G completions of
  ``seq`` tokens, with precomputed reference and old (sampling) log-probs and one advantage
  per completion. Naive materialises the logits and applies TRL's formula.

A provider that cannot run here says why (``skip``); the driver prints and records the reason.
Nothing here downloads anything.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

MODES = ("logprobs", "ce", "dpo")
MODES += ("grpo",)


@dataclass
class Inputs:
    """One case's tensors. ``hidden``/``weight`` require grad; the rest are constants."""

    hidden: torch.Tensor          # [N, H] (dpo: [2B, T, H])
    weight: torch.Tensor          # [V, H]
    targets: torch.Tensor         # [N] (dpo: [2B, T], -100 on prompt tokens)
    upstream: torch.Tensor        # [N] fp32: dL/dlogprobs for the logprobs mode
    ref_hidden: torch.Tensor | None = None   # dpo only, no grad
    ref_weight: torch.Tensor | None = None   # dpo only, no grad
    beta: float = 0.1
    advantages: torch.Tensor | None = None     # grpo only: [G]
    ref_logprobs: torch.Tensor | None = None   # grpo only: [G, T] in the labels' layout
    old_logprobs: torch.Tensor | None = None   # grpo only: [G, T] in the labels' layout

    def params(self):
        return (self.hidden, self.weight)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values()
                   if isinstance(t, torch.Tensor))

    def grad_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params())


def make_inputs(mode: str, N: int, H: int, V: int, dtype: torch.dtype, device: str,
                seed: int = 0, pairs: int = 2, seq: int = 512, group: int = 8) -> Inputs:
    """Random inputs with logits of O(1) spread (weight ~ N(0, 1/H)). dpo: N = 2*pairs*seq;
    grpo: ``group`` completions of ``seq`` scored tokens (N = group*seq)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    weight = randn(V, H, scale=H ** -0.5).requires_grad_()
    if mode == "grpo":
        return _grpo_inputs(randn, gen, weight, group, seq, V, device)
    if mode == "dpo":
        rows = 2 * pairs
        hidden = randn(rows, seq, H).requires_grad_()
        targets = torch.randint(0, V, (rows, seq), generator=gen)
        targets[:, : seq // 4] = -100  # the prompt: not scored
        return Inputs(hidden, weight, targets.to(device), torch.zeros(0, device=device),
                      ref_hidden=randn(rows, seq, H), ref_weight=randn(V, H, scale=H ** -0.5))
    hidden = randn(N, H).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen).to(device)
    upstream = torch.randn(N, generator=gen).to(device)
    return Inputs(hidden, weight, targets, upstream)


@dataclass
class Provider:
    """``build(inputs) -> forward`` where ``forward() -> scalar loss`` (backward is the worker's)."""

    name: str
    mode: str
    build: Callable[[Inputs], Callable[[], torch.Tensor]]
    doc: str
    cuda_only: str | None = None       # reason, when the variant needs CUDA
    needs: tuple[str, ...] = field(default_factory=tuple)  # importable modules


# ---------------------------------------------------------------------------------------------
# Naive baselines (materialise [N, V])
# ---------------------------------------------------------------------------------------------

def _naive_logprobs_fn(hidden, weight, targets, upstream):
    from fused_losses.reference import linear_logprobs_reference

    return (linear_logprobs_reference(hidden, weight, targets).logprobs.float() * upstream).sum()


def _plain_logprobs_fn(hidden, weight, targets, upstream):
    logits = (hidden @ weight.T).float()
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logprobs * upstream).sum()


def _naive_ce_fn(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def _seq_logps_naive(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    valid = targets != -100
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
    return (logp.squeeze(-1) * valid).sum(-1)  # [2B]


def _naive_dpo_fn(hidden, weight, targets, ref_hidden, ref_weight, beta):
    with torch.no_grad():
        ref = _seq_logps_naive(ref_hidden, ref_weight, targets)
    policy = _seq_logps_naive(hidden, weight, targets)
    delta = policy - ref
    chosen, rejected = delta.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def _naive(mode):
    def build(x: Inputs):
        if mode == "logprobs":
            return lambda: _naive_logprobs_fn(x.hidden, x.weight, x.targets, x.upstream)
        if mode == "logprobs_plain":
            return lambda: _plain_logprobs_fn(x.hidden, x.weight, x.targets, x.upstream)
        if mode == "ce":
            return lambda: _naive_ce_fn(x.hidden, x.weight, x.targets)
        return lambda: _naive_dpo_fn(x.hidden, x.weight, x.targets, x.ref_hidden,
                                     x.ref_weight, x.beta)
    return build


def _naive_compile(mode):
    def build(x: Inputs):
        if mode == "logprobs":
            fn = torch.compile(_naive_logprobs_fn)
            return lambda: fn(x.hidden, x.weight, x.targets, x.upstream)
        fn = torch.compile(_naive_ce_fn)
        return lambda: fn(x.hidden, x.weight, x.targets)
    return build


# ---------------------------------------------------------------------------------------------
# torch's own F.linear_cross_entropy (chunked via LinearCrossEntropyOptions)
# ---------------------------------------------------------------------------------------------

def _torch_lce(mode, **option_kwargs):
    def build(x: Inputs):
        options = torch.nn.LinearCrossEntropyOptions(**option_kwargs)
        if mode == "logprobs":  # per-token NLL; its backward recomputes the chunks
            return lambda: (-F.linear_cross_entropy(x.hidden, x.weight, x.targets,
                                                    reduction="none", options=options)
                            * x.upstream).sum()
        return lambda: F.linear_cross_entropy(x.hidden, x.weight, x.targets,
                                              reduction="mean", options=options)
    return build


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------

def _ours(mode, backend, **kwargs):
    def build(x: Inputs):
        import fused_losses

        if mode == "logprobs":
            return lambda: (fused_losses.linear_logprobs(
                x.hidden, x.weight, x.targets, backend=backend, **kwargs).logprobs
                * x.upstream).sum()
        if mode == "ce":
            return lambda: fused_losses.linear_cross_entropy(
                x.hidden, x.weight, x.targets, reduction="mean", backend=backend, **kwargs)
        if not hasattr(fused_losses, "dpo_loss"):
            raise _Skip("fused_losses.dpo_loss does not exist yet")
        return lambda: fused_losses.dpo_loss(
            x.hidden, x.weight, x.targets, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight,
            beta=x.beta, backend=backend, **kwargs).loss
    return build


# ---------------------------------------------------------------------------------------------
# Peers (never downloaded here: skipped with the reason when they do not import)
# ---------------------------------------------------------------------------------------------

class _Skip(Exception):
    """Raised by a build function: the variant cannot run here; the message says why."""


def _liger_flce(x: Inputs):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="mean", accum_dtype=torch.float32)
    return lambda: loss_fn(x.weight, x.hidden, x.targets)


def _liger_dpo(x: Inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # compiled=True (its default) and use_ref_model: the reference from ref hidden states.
    loss_fn = LigerFusedLinearDPOLoss(beta=x.beta, compiled=True, use_ref_model=True)

    def forward():
        loss, _aux = loss_fn(x.weight, x.hidden, x.targets, None, x.ref_hidden, x.ref_weight)
        return loss
    return forward


def _cce(mode, filter_eps):
    def build(x: Inputs):
        from cut_cross_entropy import linear_cross_entropy as cce

        if mode == "logprobs":
            return lambda: (-cce(x.hidden, x.weight, x.targets, reduction="none",
                                 filter_eps=filter_eps) * x.upstream).sum()
        return lambda: cce(x.hidden, x.weight, x.targets, reduction="mean",
                           filter_eps=filter_eps)
    return build


# ---------------------------------------------------------------------------------------------
# GRPO: G completions, labels [G, 1 + seq] in Hugging Face layout (column 0 is the last prompt
# token: ignored), so each completion scores exactly ``seq`` tokens.
# ---------------------------------------------------------------------------------------------

GRPO_BETA = 0.04  # Liger's default; TRL's is 0 (no reference at all)


def _grpo_inputs(randn, gen, weight, group, seq, V, device) -> Inputs:
    hidden = randn(group, seq + 1, weight.shape[1]).requires_grad_()
    labels = torch.randint(0, V, (group, seq + 1), generator=gen)
    labels[:, 0] = -100
    # Log-probs near what the random head gives (about -log V - 0.5), so ratios sit around 1
    # and some tokens are clipped; labels layout: column 0 is never scored.
    typical = -torch.log(torch.tensor(float(V))) - 0.5

    def logprobs(spread):
        values = typical + spread * torch.randn(group, seq + 1, generator=gen)
        values[:, 0] = 0.0
        return values.to(device)

    return Inputs(hidden, weight, labels.to(device), torch.zeros(0, device=device),
                  beta=GRPO_BETA, advantages=torch.randn(group, generator=gen).to(device),
                  ref_logprobs=logprobs(0.5), old_logprobs=logprobs(0.2))


def _naive_grpo_fn(x: Inputs):
    """TRL's default GRPO loss (dapo) on materialised [G, seq, V] logits."""
    logits = (x.hidden[:, :-1] @ x.weight.T).float()
    targets = x.targets[:, 1:]
    mask = (targets != -100).float()
    logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
    logps = logps.squeeze(-1)
    ratio = torch.exp(logps - x.old_logprobs[:, 1:])
    adv = x.advantages.unsqueeze(1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    gap = x.ref_logprobs[:, 1:] - logps
    per_token = per_token + x.beta * (torch.exp(gap) - gap - 1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _liger_grpo(x: Inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # Aligned layout: hidden[:, t] predicts labels[:, t+1]. The whole [G, 1 + seq, H] tensor
    # goes in (a [:, :-1] view would be copied per chunk and its gradient scattered back);
    # its last position is masked out, so Liger computes one unscored row per completion.
    selected = torch.nn.functional.pad(x.targets[:, 1:], (0, 1), value=-100)
    attention_mask = (selected != -100).float()
    ref = torch.nn.functional.pad(x.ref_logprobs[:, 1:], (0, 1))
    old = torch.nn.functional.pad(x.old_logprobs[:, 1:], (0, 1))
    loss_fn = LigerFusedLinearGRPOLoss(beta=x.beta, compiled=True, use_ref_model=True,
                                       loss_type="dapo")

    def forward():
        loss, _metrics = loss_fn(x.hidden, x.weight, selected.clamp(min=0), attention_mask,
                                 x.advantages, None, ref_per_token_logps=ref,
                                 old_per_token_logps=old)
        return loss
    return forward


def _ours_grpo(backend, **kwargs):
    def build(x: Inputs):
        import fused_losses

        if not hasattr(fused_losses, "grpo_loss"):
            raise _Skip("fused_losses.grpo_loss does not exist yet")
        return lambda: fused_losses.grpo_loss(
            x.hidden, x.weight, x.targets, x.advantages, old_logprobs=x.old_logprobs,
            ref_logprobs=x.ref_logprobs, beta=x.beta, backend=backend, **kwargs).loss
    return build


_TRITON_CUDA = "Triton kernels need CUDA (on CPU they run only under TRITON_INTERPRET, " \
               "for correctness, far too slow to time)"

PROVIDERS: list[Provider] = [
    # -- generic primitive ---------------------------------------------------------------------
    Provider("naive", "logprobs", _naive("logprobs"),
             "linear_logprobs_reference (log_softmax+gather on [N,V]), (logprobs*g).sum()"),
    Provider("naive_plain", "logprobs", _naive("logprobs_plain"),
             "log_softmax(h @ W.T).gather(y), no ignore/temperature handling (the reference "
             "also divides by temperature=1 and masks: ~2 extra [N,V] passes)"),
    Provider("naive_compile", "logprobs", _naive_compile("logprobs"),
             "torch.compile of the naive log-probs"),
    Provider("torch_lce", "logprobs", _torch_lce("logprobs"),
             "-F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions())"),
    Provider("ours_torch", "logprobs", _ours("logprobs", "torch"),
             "fused_losses.linear_logprobs(backend='torch')"),
    Provider("ours_triton", "logprobs", _ours("logprobs", "triton"),
             "fused_losses.linear_logprobs(backend='triton')", cuda_only=_TRITON_CUDA),
    Provider("cce_exact", "logprobs", _cce("logprobs", None),
             "-cut_cross_entropy.linear_cross_entropy(reduction='none', filter_eps=None)",
             cuda_only="cut-cross-entropy is Triton/CUDA only", needs=("cut_cross_entropy",)),
    Provider("cce", "logprobs", _cce("logprobs", "auto"),
             "-cut_cross_entropy.linear_cross_entropy(reduction='none') (gradient filtering)",
             cuda_only="cut-cross-entropy is Triton/CUDA only", needs=("cut_cross_entropy",)),
    # -- mean cross-entropy ----------------------------------------------------------------------
    Provider("naive", "ce", _naive("ce"), "F.cross_entropy(h @ W.T, y)"),
    Provider("naive_compile", "ce", _naive_compile("ce"), "torch.compile of the naive loss"),
    Provider("torch_lce", "ce", _torch_lce("ce"),
             "F.linear_cross_entropy(options=LinearCrossEntropyOptions()) (auto chunking)"),
    Provider("torch_lce_ar1", "ce", _torch_lce("ce", chunking_method="aspect_ratio"),
             "F.linear_cross_entropy, chunking_method='aspect_ratio' (2x larger chunks)"),
    Provider("ours_torch_gif", "ce", _ours("ce", "torch", grad_in_forward=True),
             "fused_losses.linear_cross_entropy(backend='torch', grad_in_forward=True)"),
    Provider("ours_torch_recompute", "ce", _ours("ce", "torch", grad_in_forward=False),
             "fused_losses.linear_cross_entropy(backend='torch', grad_in_forward=False)"),
    Provider("ours_triton", "ce", _ours("ce", "triton"),
             "fused_losses.linear_cross_entropy(backend='triton')", cuda_only=_TRITON_CUDA),
    Provider("liger", "ce", _liger_flce,
             "LigerFusedLinearCrossEntropyLoss(accum_dtype=fp32)", cuda_only=_TRITON_CUDA,
             needs=("liger_kernel",)),
    Provider("cce_exact", "ce", _cce("ce", None),
             "cut_cross_entropy.linear_cross_entropy(filter_eps=None)",
             cuda_only="cut-cross-entropy is Triton/CUDA only", needs=("cut_cross_entropy",)),
    Provider("cce", "ce", _cce("ce", "auto"),
             "cut_cross_entropy.linear_cross_entropy() (gradient filtering, its default)",
             cuda_only="cut-cross-entropy is Triton/CUDA only", needs=("cut_cross_entropy",)),
    # -- DPO ---------------------------------------------------------------------------------
    Provider("naive", "dpo", _naive("dpo"),
             "materialised log_softmax of policy and reference, sigmoid DPO"),
    Provider("liger_dpo", "dpo", _liger_dpo,
             "LigerFusedLinearDPOLoss(compiled=True, use_ref_model=True)",
             needs=("liger_kernel",)),
    Provider("ours_torch", "dpo", _ours("dpo", "torch"),
             "fused_losses.dpo_loss(ref_hidden=, ref_weight=, backend='torch') (its default: "
             "gradients in forward on the torch backend since ba51ecb)"),
    Provider("ours_torch_recompute", "dpo", _ours("dpo", "torch", grad_in_forward=False),
             "fused_losses.dpo_loss(..., backend='torch', grad_in_forward=False)"),
    Provider("ours_triton", "dpo", _ours("dpo", "triton"),
             "fused_losses.dpo_loss(backend='triton')", cuda_only=_TRITON_CUDA),
]
PROVIDERS += [
    # -- GRPO ---------------------------------------------------------------------------------
    Provider("naive", "grpo", lambda x: lambda: _naive_grpo_fn(x),
             "materialised log_softmax, TRL's dapo "
             "GRPO loss with k3 KL (beta=0.04), old and reference log-probs"),
    Provider("liger_grpo", "grpo", _liger_grpo,
             "LigerFusedLinearGRPOLoss(loss_type='dapo', beta=0.04, compiled=True), "
             "ref_per_token_logps and old_per_token_logps given", needs=("liger_kernel",)),
    Provider("ours_torch", "grpo", _ours_grpo("torch"),
             "fused_losses.grpo_loss(old_logprobs=, ref_logprobs=, beta=0.04, backend='torch') "
             "(default: gradients in forward, a chunk per completion)"),
    Provider("ours_torch_recompute", "grpo", _ours_grpo("torch", grad_in_forward=False),
             "fused_losses.grpo_loss(..., backend='torch', grad_in_forward=False)"),
    Provider("ours_triton", "grpo", _ours_grpo("triton"),
             "fused_losses.grpo_loss(backend='triton')", cuda_only=_TRITON_CUDA),
]


def chunk_variant(mode: str, chunk_size: int) -> Provider:
    """``ours_torch`` with an explicit ``chunk_size`` (the investigation sweep)."""
    if mode == "ce":
        build = _ours("ce", "torch", grad_in_forward=True, chunk_size=chunk_size)
    elif mode == "grpo":  # e.g. ours_torch_c128: 16 MB logit chunks instead of 64 MiB
        build = _ours_grpo("torch", chunk_size=chunk_size)
    else:
        build = _ours(mode, "torch", chunk_size=chunk_size)
    return Provider(f"ours_torch_c{chunk_size}", mode, build,
                    f"ours_torch with chunk_size={chunk_size}")


def get(mode: str, name: str) -> Provider:
    if name.startswith("ours_torch_c") and name[len("ours_torch_c"):].isdigit():
        return chunk_variant(mode, int(name[len("ours_torch_c"):]))
    for p in PROVIDERS:
        if p.mode == mode and p.name == name:
            return p
    valid = [p.name for p in PROVIDERS if p.mode == mode]
    raise ValueError(f"no provider {name!r} for mode {mode!r}; valid: {valid}")


def names(mode: str) -> list[str]:
    return [p.name for p in PROVIDERS if p.mode == mode]


def skip_reason(p: Provider, device: str) -> str | None:
    """Why ``p`` cannot run on ``device`` (decided without importing it), or None."""
    if p.cuda_only and not device.startswith("cuda"):
        return p.cuda_only
    for mod in p.needs:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install it; benchmarks never download)"
    return None
