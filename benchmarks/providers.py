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
* ``distill`` -- token-mean generalised JSD (β = 0.5, τ = 1, no hard term) between a teacher
  head (its own width H_t, no gradient) and the student's, every row scored. Naive
  materialises both models' logits (TRL GKD's ``generalized_jsd_loss``).
* ``grpo`` -- GRPO (TRL's default ``dapo`` loss, k3 KL with β = 0.04) on G completions of
  ``seq`` tokens, with precomputed reference and old (sampling) log-probs and one advantage
  per completion. Naive materialises the logits and applies TRL's formula.

A case may set ``softcap`` (Gemma-2's ``s * tanh(z / s)`` on the logits); every provider of the
``logprobs`` and ``ce`` modes applies it. Our own variants are generated from the library's
backend registry (every name but ``"auto"``), so a new backend is benchmarked without an edit
here: ``ours_<backend>`` (the library's default path), ``_gif`` / ``_recompute`` (gradients
formed in forward, 6NHV / recomputed in backward, 8NHV), ``_loss`` (``linear_logprobs_loss``,
the generic primitive's gradients-in-forward path) and ``_filter`` (``filter_eps`` at Cut
Cross-Entropy's default threshold).

A provider that cannot run here says why (``skip``); the driver prints and records the reason.
Nothing here downloads anything.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

MODES = ("logprobs", "ce", "dpo", "distill", "grpo")


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
    softcap: float | None = None  # logits -> softcap * tanh(logits / softcap) (Gemma-2)
    teacher_hidden: torch.Tensor | None = None   # distill only: [N, H_t], no grad
    teacher_weight: torch.Tensor | None = None   # distill only: [V, H_t], no grad
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
                seed: int = 0, pairs: int = 2, seq: int = 512,
                softcap: float | None = None, teacher_H: int = 1536,
                group: int = 8) -> Inputs:
    """Random inputs with logits of O(1) spread (weight ~ N(0, 1/H)). dpo: N = 2*pairs*seq;
    distill: a teacher of width ``teacher_H``; grpo: ``group`` completions of ``seq`` scored
    tokens (N = group*seq).

    Drawn on ``device`` (a GPU draws a 1 GB head in milliseconds; the CPU would take seconds),
    so a CUDA case's numbers differ from the same case's on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    def randint(*shape):
        return torch.randint(0, V, shape, generator=gen, device=device)

    weight = randn(V, H, scale=H ** -0.5).requires_grad_()
    if mode == "grpo":
        return _grpo_inputs(randn, randint, gen, weight, group, seq, V, device)
    if mode == "dpo":
        rows = 2 * pairs
        hidden = randn(rows, seq, H).requires_grad_()
        targets = randint(rows, seq)
        targets[:, : seq // 4] = -100  # the prompt: not scored
        return Inputs(hidden, weight, targets, torch.zeros(0, device=device),
                      ref_hidden=randn(rows, seq, H), ref_weight=randn(V, H, scale=H ** -0.5),
                      softcap=softcap)
    hidden = randn(N, H).requires_grad_()
    upstream = torch.randn(N, generator=gen, device=device)
    if mode == "distill":
        return Inputs(hidden, weight, randint(N), upstream, teacher_hidden=randn(N, teacher_H),
                      teacher_weight=randn(V, teacher_H, scale=teacher_H ** -0.5))
    return Inputs(hidden, weight, randint(N), upstream, softcap=softcap)


@dataclass
class Provider:
    """``build(inputs) -> forward`` where ``forward() -> scalar loss`` (backward is the worker's)."""

    name: str
    mode: str
    build: Callable[[Inputs], Callable[[], torch.Tensor]]
    doc: str
    cuda_only: str | None = None       # reason, when the variant needs CUDA
    needs: tuple[str, ...] = field(default_factory=tuple)  # modules build() imports
    interpretable: bool = False  # its CUDA code also runs under TRITON_INTERPRET=1 (slowly)


# ---------------------------------------------------------------------------------------------
# Naive baselines (materialise [N, V])
# ---------------------------------------------------------------------------------------------

def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _naive_logprobs_fn(hidden, weight, targets, upstream, softcap=None):
    from fused_losses.reference import linear_logprobs_reference

    out = linear_logprobs_reference(hidden, weight, targets, softcap=softcap)
    return (out.logprobs.float() * upstream).sum()


def _plain_logprobs_fn(hidden, weight, targets, upstream, softcap=None):
    logits = _capped((hidden @ weight.T).float(), softcap)
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logprobs * upstream).sum()


def _naive_ce_fn(hidden, weight, targets, softcap=None):
    return F.cross_entropy(_capped((hidden @ weight.T).float(), softcap), targets)


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
            return lambda: _naive_logprobs_fn(x.hidden, x.weight, x.targets, x.upstream,
                                              x.softcap)
        if mode == "logprobs_plain":
            return lambda: _plain_logprobs_fn(x.hidden, x.weight, x.targets, x.upstream,
                                              x.softcap)
        if mode == "ce":
            return lambda: _naive_ce_fn(x.hidden, x.weight, x.targets, x.softcap)
        return lambda: _naive_dpo_fn(x.hidden, x.weight, x.targets, x.ref_hidden,
                                     x.ref_weight, x.beta)
    return build


# The inductor by default; the dry run of gpu_session.py takes "aot_eager" (same Dynamo
# capture and autograd graphs, no code generation: minutes less on 2 CPU cores).
COMPILE_BACKEND_ENV = "FL_BENCH_COMPILE_BACKEND"


def _compile(fn):
    return torch.compile(fn, backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))


def _naive_compile(mode):
    def build(x: Inputs):
        if mode == "logprobs":
            fn = _compile(_naive_logprobs_fn)
            return lambda: fn(x.hidden, x.weight, x.targets, x.upstream, x.softcap)
        fn = _compile(_naive_ce_fn)
        return lambda: fn(x.hidden, x.weight, x.targets, x.softcap)
    return build


COMPILE_CHUNKS = 8  # torchtune's CEWithChunkedOutputLoss default (Cut Cross-Entropy's Table 1)


def _chunk_ce_sum(hidden, weight, targets, softcap):
    return F.cross_entropy(_capped((hidden @ weight.T).float(), softcap), targets,
                           reduction="sum")


def _compile_chunked(x: Inputs):
    """Mean cross-entropy over ``COMPILE_CHUNKS`` token chunks, each chunk's loss compiled:
    every chunk's logits are live at once for backward, but each is fused by the compiler."""
    fn = _compile(_chunk_ce_sum)

    def forward():
        parts = zip(x.hidden.chunk(COMPILE_CHUNKS), x.targets.chunk(COMPILE_CHUNKS))
        return sum(fn(h, x.weight, y, x.softcap) for h, y in parts) / x.targets.numel()
    return forward


# ---------------------------------------------------------------------------------------------
# torch's own F.linear_cross_entropy (chunked via LinearCrossEntropyOptions)
# ---------------------------------------------------------------------------------------------

def _torch_lce(mode, **option_kwargs):
    def build(x: Inputs):
        if x.softcap is not None:
            raise _Skip("F.linear_cross_entropy has no softcap")
        options = torch.nn.LinearCrossEntropyOptions(**option_kwargs)
        if mode == "logprobs":  # per-token NLL; its backward recomputes the chunks
            return lambda: (-F.linear_cross_entropy(x.hidden, x.weight, x.targets,
                                                    reduction="none", options=options)
                            * x.upstream).sum()
        return lambda: F.linear_cross_entropy(x.hidden, x.weight, x.targets,
                                              reduction="mean", options=options)
    return build


# ---------------------------------------------------------------------------------------------
# Ours: one family of variants per backend in the library's registry
# ---------------------------------------------------------------------------------------------

class _Skip(Exception):
    """Raised by a build function: the variant cannot run here; the message says why."""


def our_backends() -> tuple[str, ...]:
    """The library's backend names, ``"auto"`` excepted, read from its registry at run time."""
    import fused_losses

    registry = getattr(fused_losses, "BACKENDS", None)
    if registry is None:  # before the registry moved to the package's top level
        from fused_losses import primitive

        registry = primitive.BACKENDS
    return tuple(name for name in registry if name != "auto")


def _backend_module(backend: str, device: torch.device):
    try:
        from fused_losses.backends import resolve_backend
    except ImportError:
        from fused_losses.primitive import resolve_backend
    return resolve_backend(backend, device)


def _filter_eps(dtype: torch.dtype) -> float:
    """Cut Cross-Entropy's default threshold: machine epsilon / 32 (bf16: 2**-12)."""
    return torch.finfo(dtype).eps / 32


def _ours(mode, backend, *, filtered=False, **kwargs):
    def build(x: Inputs):
        import fused_losses

        if kwargs.get("grad_in_forward") and not hasattr(
                _backend_module(backend, x.hidden.device), "forward_backward"):
            raise _Skip(f"backend {backend!r} has no gradients-in-forward path "
                        "(its module has no forward_backward)")
        options = dict(kwargs, backend=backend)
        if filtered:
            options["filter_eps"] = _filter_eps(x.hidden.dtype)
        if x.softcap is not None:
            options["softcap"] = x.softcap
        if mode == "logprobs":
            return lambda: (fused_losses.linear_logprobs(
                x.hidden, x.weight, x.targets, **options).logprobs * x.upstream).sum()
        if mode == "logprobs_loss":
            def token_loss(stats, positions):
                return (stats.logprobs * x.upstream.index_select(0, positions)).sum()

            return lambda: fused_losses.linear_logprobs_loss(
                x.hidden, x.weight, x.targets, token_loss, **options)
        if mode == "ce":
            return lambda: fused_losses.linear_cross_entropy(
                x.hidden, x.weight, x.targets, reduction="mean", **options)
        if not hasattr(fused_losses, "dpo_loss"):
            raise _Skip("fused_losses.dpo_loss does not exist yet")
        return lambda: fused_losses.dpo_loss(
            x.hidden, x.weight, x.targets, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight,
            beta=x.beta, **options).loss
    return build


_TRITON_CUDA = "Triton kernels need CUDA (on CPU they run only under TRITON_INTERPRET, " \
               "for correctness, far too slow to time)"


def our_providers(backend: str) -> list[Provider]:
    """Every variant of one backend: which paths exist is decided when a variant is built."""
    cuda_only = None if backend == "torch" else _TRITON_CUDA
    call = f"backend={backend!r}"

    def make(name, mode, build, doc):
        return Provider(name, mode, build, doc, cuda_only=cuda_only, interpretable=True)

    return [
        make(f"ours_{backend}", "logprobs", _ours("logprobs", backend),
             f"(linear_logprobs({call}).logprobs * g).sum() (backward recomputes: 8NHV)"),
        make(f"ours_{backend}_loss", "logprobs", _ours("logprobs_loss", backend),
             f"linear_logprobs_loss({call}, loss_fn=(logprobs * g).sum()): gradients in "
             "forward"),
        make(f"ours_{backend}", "ce", _ours("ce", backend),
             f"linear_cross_entropy({call}), the library's default path"),
        make(f"ours_{backend}_gif", "ce", _ours("ce", backend, grad_in_forward=True),
             f"linear_cross_entropy({call}, grad_in_forward=True): 6NHV"),
        make(f"ours_{backend}_recompute", "ce", _ours("ce", backend, grad_in_forward=False),
             f"linear_cross_entropy({call}, grad_in_forward=False): 8NHV"),
        make(f"ours_{backend}_filter", "ce", _ours("ce", backend, filtered=True),
             f"linear_cross_entropy({call}, filter_eps=finfo(dtype).eps/32): skips "
             "gradient tiles below Cut Cross-Entropy's default threshold"),
        make(f"ours_{backend}", "dpo", _ours("dpo", backend),
             f"fused_losses.dpo_loss(ref_hidden=, ref_weight=, {call}) (its default path)"),
        make(f"ours_{backend}_recompute", "dpo", _ours("dpo", backend, grad_in_forward=False),
             f"fused_losses.dpo_loss(..., {call}, grad_in_forward=False)"),
    ]


# ---------------------------------------------------------------------------------------------
# Peers (never downloaded here: skipped with the reason when they do not import)
# ---------------------------------------------------------------------------------------------

def _liger_flce(x: Inputs):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="mean", accum_dtype=torch.float32,
                                               softcap=x.softcap)
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
                                 softcap=x.softcap, filter_eps=filter_eps) * x.upstream).sum()
        return lambda: cce(x.hidden, x.weight, x.targets, reduction="mean",
                           softcap=x.softcap, filter_eps=filter_eps)
    return build


TRL_TILE_COLUMNS = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in trl 1.16


def _trl_backward_context() -> str | None:
    """Import ``trl.trainer.utils``, which TRL's backward imports for one context manager.

    That module pulls in TRL's trainers (accelerate, datasets, ...). Where it does not import,
    a stand-in providing ``maybe_gather_lm_head_ctx`` as a null context takes its place: the
    real one returns a null context unless DeepSpeed ZeRO-3 is on, so the timed kernels are
    the same. Returns a note saying so, or None when the real module imported."""
    try:
        importlib.import_module("trl.trainer.utils")
        return None
    except Exception as err:  # noqa: BLE001 (any import-time failure of TRL's trainer stack)
        stand_in = types.ModuleType("trl.trainer.utils")
        stand_in.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        stand_in._CHUNKED_LOGPROB_CHUNK_SIZE = TRL_TILE_COLUMNS
        sys.modules["trl.trainer.utils"] = stand_in
        return (f"trl.trainer.utils did not import ({type(err).__name__}: {err}); its "
                "maybe_gather_lm_head_ctx (a null context without ZeRO-3) was stood in for")


def _trl(mode):
    """TRL's fused head (``trl.kernels.chunked_logprob``), called as its trainers call it:
    tiles of 4096 tokens x 32768 vocabulary columns, no optional outputs."""
    def build(x: Inputs):
        note = _trl_backward_context()
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        columns = getattr(sys.modules["trl.trainer.utils"], "_CHUNKED_LOGPROB_CHUNK_SIZE",
                          TRL_TILE_COLUMNS)

        def logprobs():
            out = ChunkedLogProbFunction.apply(x.hidden, x.weight, None, x.targets, 1.0,
                                               columns, x.softcap, 1.0, ())
            return out[0]

        if mode == "logprobs":
            forward = lambda: (logprobs() * x.upstream).sum()  # noqa: E731
        else:
            forward = lambda: -logprobs().sum() / x.targets.numel()  # noqa: E731
        forward.note = note
        return forward
    return build


# ---------------------------------------------------------------------------------------------
# GRPO: G completions, labels [G, 1 + seq] in Hugging Face layout (column 0 is the last prompt
# token: ignored), so each completion scores exactly ``seq`` tokens.
# ---------------------------------------------------------------------------------------------

GRPO_BETA = 0.04  # Liger's default; TRL's is 0 (no reference at all)


def _grpo_inputs(randn, randint, gen, weight, group, seq, V, device) -> Inputs:
    hidden = randn(group, seq + 1, weight.shape[1]).requires_grad_()
    labels = randint(group, seq + 1)
    labels[:, 0] = -100
    # Log-probs near what the random head gives (about -log V - 0.5), so ratios sit around 1
    # and some tokens are clipped; labels layout: column 0 is never scored.
    typical = -float(torch.log(torch.tensor(float(V)))) - 0.5

    def logprobs(spread):
        values = typical + spread * torch.randn(group, seq + 1, generator=gen, device=device)
        values[:, 0] = 0.0
        return values

    return Inputs(hidden, weight, labels, torch.zeros(0, device=device), beta=GRPO_BETA,
                  advantages=torch.randn(group, generator=gen, device=device),
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


def our_grpo_providers(backend: str) -> list[Provider]:
    cuda_only = None if backend == "torch" else _TRITON_CUDA
    call = f"backend={backend!r}"
    return [
        Provider(f"ours_{backend}", "grpo", _ours_grpo(backend),
                 f"fused_losses.grpo_loss(old_logprobs=, ref_logprobs=, beta=0.04, {call}) "
                 "(its default path)", cuda_only=cuda_only, interpretable=True),
        Provider(f"ours_{backend}_recompute", "grpo",
                 _ours_grpo(backend, grad_in_forward=False),
                 f"fused_losses.grpo_loss(..., {call}, grad_in_forward=False)",
                 cuda_only=cuda_only, interpretable=True),
    ]


_CCE_CUDA = "cut-cross-entropy's Triton kernels need CUDA (they fail under the interpreter)"
_LIGER_CUDA = "Liger's Triton kernels need CUDA (they fail under the interpreter)"
_TRL_NEEDS = ("trl.kernels.chunked_logprob", "trl.trainer.utils")


# ---------------------------------------------------------------------------------------------
# Distillation: token-mean generalised JSD (β = 0.5, τ = 1) of a teacher and a student head
# ---------------------------------------------------------------------------------------------

DISTILL_BETA = 0.5


def _naive_distill(x: Inputs):
    def forward():
        log_q = torch.log_softmax((x.hidden @ x.weight.T).float(), dim=-1)
        with torch.no_grad():
            log_p = torch.log_softmax((x.teacher_hidden @ x.teacher_weight.T).float(), dim=-1)
        log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - DISTILL_BETA),
                                             log_p + math.log(DISTILL_BETA)]), dim=0)
        jsd = DISTILL_BETA * F.kl_div(log_m, log_p, reduction="none", log_target=True) \
            + (1 - DISTILL_BETA) * F.kl_div(log_m, log_q, reduction="none", log_target=True)
        return jsd.sum() / x.targets.numel()
    return forward


def _liger_jsd(x: Inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    # compiled=True is its default; no hard loss, so the soft loss alone is timed
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                      beta=DISTILL_BETA, compiled=True)
    return lambda: loss_fn(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, x.targets)


def _trl_chunked(x: Inputs):
    note = _trl_backward_context()  # chunked_divergence imports trl.trainer.utils too
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    # as trl.trainer.distillation_trainer._chunked_divergence_loss with every row valid
    def forward():
        divergence, _entropy = ChunkedDivergenceFunction.apply(
            x.hidden, x.weight, None, x.teacher_hidden, x.teacher_weight, None, DISTILL_BETA,
            1.0)
        return divergence.sum() / x.targets.numel()
    forward.note = note
    return forward


def _ours_distill(backend, **kwargs):
    def build(x: Inputs):
        import fused_losses

        if not hasattr(fused_losses, "linear_divergence_loss"):
            raise _Skip("fused_losses.linear_divergence_loss does not exist yet")
        if kwargs.get("grad_in_forward") is False:
            from fused_losses.divergence import resolve_implementation

            if not hasattr(resolve_implementation(backend, x.hidden.device),
                           "forward_backward"):
                raise _Skip(f"backend {backend!r} always recomputes in backward: this is "
                            f"ours_{backend}")
        # distill_loss's own steps on aligned rows: the summed divergence over scored tokens
        return lambda: fused_losses.linear_divergence_loss(
            x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, x.targets,
            divergence="jsd", beta=DISTILL_BETA, backend=backend, **kwargs)[0] \
            / x.targets.numel()
    return build


def our_distill_providers(backend: str) -> list[Provider]:
    """The distillation primitive on ``backend``: its default path (gradients in forward
    where the implementation has a one pass: torch, cublas) and the recompute path."""
    cuda_only = None if backend == "torch" else _TRITON_CUDA
    call = f"backend={backend!r}"
    return [
        Provider(f"ours_{backend}", "distill", _ours_distill(backend),
                 f"fused_losses.linear_divergence_loss({call}) (distill_loss's default path)",
                 cuda_only=cuda_only, interpretable=True),
        Provider(f"ours_{backend}_recompute", "distill",
                 _ours_distill(backend, grad_in_forward=False),
                 f"fused_losses.linear_divergence_loss({call}, grad_in_forward=False)",
                 cuda_only=cuda_only, interpretable=True),
    ]



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
    Provider("cce_exact", "logprobs", _cce("logprobs", None),
             "-cut_cross_entropy.linear_cross_entropy(reduction='none', filter_eps=None)",
             cuda_only=_CCE_CUDA, needs=("cut_cross_entropy",)),
    Provider("cce", "logprobs", _cce("logprobs", "auto"),
             "-cut_cross_entropy.linear_cross_entropy(reduction='none') (gradient filtering)",
             cuda_only=_CCE_CUDA, needs=("cut_cross_entropy",)),
    Provider("trl", "logprobs", _trl("logprobs"),
             "(trl.kernels.chunked_logprob.ChunkedLogProbFunction(...)[0] * g).sum(): cuBLAS "
             "tiles + Triton fold (torch fold off CUDA)", needs=_TRL_NEEDS),
    # -- mean cross-entropy ----------------------------------------------------------------------
    Provider("naive", "ce", _naive("ce"), "F.cross_entropy(h @ W.T, y)"),
    Provider("naive_compile", "ce", _naive_compile("ce"), "torch.compile of the naive loss"),
    Provider("compile_chunked", "ce", _compile_chunked,
             f"torch.compile of cross-entropy over {COMPILE_CHUNKS} token chunks (torchtune's "
             "recipe)"),
    Provider("torch_lce", "ce", _torch_lce("ce"),
             "F.linear_cross_entropy(options=LinearCrossEntropyOptions()) (auto chunking)"),
    Provider("torch_lce_ar1", "ce", _torch_lce("ce", chunking_method="aspect_ratio"),
             "F.linear_cross_entropy, chunking_method='aspect_ratio' (2x larger chunks)"),
    Provider("liger", "ce", _liger_flce,
             "LigerFusedLinearCrossEntropyLoss(accum_dtype=fp32)", cuda_only=_LIGER_CUDA,
             needs=("liger_kernel.transformers",)),
    Provider("cce_exact", "ce", _cce("ce", None),
             "cut_cross_entropy.linear_cross_entropy(filter_eps=None)",
             cuda_only=_CCE_CUDA, needs=("cut_cross_entropy",)),
    Provider("cce", "ce", _cce("ce", "auto"),
             "cut_cross_entropy.linear_cross_entropy() (gradient filtering, its default)",
             cuda_only=_CCE_CUDA, needs=("cut_cross_entropy",)),
    Provider("trl", "ce", _trl("ce"),
             "-ChunkedLogProbFunction(...)[0].mean(): TRL's fused head as its SFT loss uses it",
             needs=_TRL_NEEDS),
    # -- DPO ---------------------------------------------------------------------------------
    Provider("naive", "dpo", _naive("dpo"),
             "materialised log_softmax of policy and reference, sigmoid DPO"),
    Provider("liger_dpo", "dpo", _liger_dpo,
             "LigerFusedLinearDPOLoss(compiled=True, use_ref_model=True)",
             needs=("liger_kernel.chunked_loss",)),
] + [p for backend in our_backends() for p in our_providers(backend)]
PROVIDERS += [
    # -- distillation --------------------------------------------------------------------------
    Provider("naive", "distill", _naive_distill,
             "materialised log_softmax of both models, TRL GKD's generalized_jsd_loss"),
    Provider("liger_jsd", "distill", _liger_jsd,
             "LigerFusedLinearJSDLoss(weight_hard_loss=0, compiled=True)",
             needs=("liger_kernel.chunked_loss",)),
    Provider("trl_chunked", "distill", _trl_chunked,
             "trl.kernels.chunked_divergence.ChunkedDivergenceFunction (torch tiles on CPU)",
             needs=("trl.kernels.chunked_divergence", "trl.trainer.utils")),
] + [p for backend in our_backends() for p in our_distill_providers(backend)]
PROVIDERS += [
    # -- GRPO ---------------------------------------------------------------------------------
    Provider("naive", "grpo", lambda x: lambda: _naive_grpo_fn(x),
             "materialised log_softmax, TRL's dapo GRPO loss with k3 KL (beta=0.04), old and "
             "reference log-probs"),
    Provider("liger_grpo", "grpo", _liger_grpo,
             "LigerFusedLinearGRPOLoss(loss_type='dapo', beta=0.04, compiled=True), "
             "ref_per_token_logps and old_per_token_logps given",
             needs=("liger_kernel.chunked_loss",)),
] + [p for backend in our_backends() for p in our_grpo_providers(backend)]


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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def skip_reason(p: Provider, device: str) -> str | None:
    """Why ``p`` cannot run on ``device`` (decided without importing it), or None."""
    if p.cuda_only and not device.startswith("cuda") and not (
            p.interpretable and _interpreting()):
        return p.cuda_only
    for mod in p.needs:
        if importlib.util.find_spec(mod.partition(".")[0]) is None:
            return f"{mod} is not installed (pip install it; benchmarks never download)"
    return None
