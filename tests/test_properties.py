"""Property tests, deterministic (derandomized, no example database: they never flake).

1. The primitive on both backends against its float64 reference over random shapes and
   options (``test_*_backend_properties``).
2. Every public function over random inputs and options, valid and not: a call either raises
   a ``TypeError``/``ValueError`` that names the bad argument, or returns finite outputs equal
   to the float64 reference, values and gradients (``test_contract_*``). At most one argument
   of an example is bad, so the error has exactly one thing to name. Inputs come with empty
   batches, all or no positions ignored, NaN wherever a per-token input is not read, and
   other memory layouts (strides). Objectives run on the torch backend with small shapes;
   each function gets a few seconds.
3. ``test_every_public_callable_has_a_contract``: every callable of ``fused_losses.__all__``
   (but the result types, plain NamedTuples) is checked here, so none can be forgotten.
"""
from __future__ import annotations

import functools
import html
import math
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import fused_losses
from fused_losses import (LogProbs, cpo_loss, dil_loss, distill_loss, dpo_loss, grpo_loss,
                          ift_loss, kto_loss, linear_cross_entropy, linear_divergence,
                          linear_divergence_loss, linear_logprobs, linear_logprobs_loss,
                          mismatched_pairs, orpo_loss, patch_causal_lm, ppo_loss,
                          reinforce_loss, render_token_rewards, sft_loss, simpo_loss,
                          token_logprobs, token_rewards, unpatch_causal_lm)
from fused_losses.divergence import DIVERGENCES as DISTILL_DIVERGENCES
from fused_losses.objectives import (DIL_LOSSES, DIVERGENCES, DPO_LOSSES, KTO_LOSSES,
                                     TOKEN_WEIGHTS, phi_safe)
from fused_losses.reference import linear_cross_entropy_reference, linear_logprobs_reference
from tests.divergence import naive as naive_divergence
from tests.helpers import HAS_TRITON, assert_close, check_against_reference, make_inputs
from tests.objectives import naive

F64 = torch.float64
INF, NAN = math.inf, math.nan

# public name -> the test that checks its contract (filled by @covers; see the last test)
COVERED: dict[str, str] = {}


def covers(*names: str):
    """Record that the decorated test checks the contract of these public names."""
    def record(test):
        COVERED.update(dict.fromkeys(names, test.__name__))
        return test
    return record


shapes = st.fixed_dictionaries(dict(
    n=st.integers(1, 20), h=st.integers(1, 40), v=st.integers(1, 150),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]), bias=st.booleans(),
    temperature=st.sampled_from([1.0, 0.5, 2.0]), softcap=st.sampled_from([None, 1.5, 30.0]),
    seed=st.integers(0, 2**16)))


def _run(backend, dtype, case):
    torch.manual_seed(case["seed"])
    hidden, weight, targets, bias = make_inputs(case["n"], case["h"], case["v"], dtype,
                                                bias=case["bias"], ignore_frac=case["ignore_frac"])
    check_against_reference(backend, dtype, hidden, weight, targets, bias,
                            temperature=case["temperature"], softcap=case["softcap"])


def deterministic(examples: int):
    """Hypothesis settings that make a test a fixed list of examples."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@deterministic(40)
@given(case=shapes)
def test_torch_backend_properties(case):
    _run("torch", torch.float64, case)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@deterministic(12)
@given(case=shapes)
def test_triton_backend_properties(case):
    _run("triton", torch.float32, case)


# ---------------------------------------------------------------------------------------------
# The contract of every public function
# ---------------------------------------------------------------------------------------------

class Opt(NamedTuple):
    """A keyword option: values to pass when valid (else it is left out), values that must
    be refused, and other options a refused value needs in order to be read at all."""

    name: str
    valid: tuple
    invalid: tuple = ()
    needs: dict = {}


# Refusal pools, by kind of option.
POSITIVE = (0.0, -1.0, INF, NAN, True, "1")
FINITE = (INF, -INF, NAN, True, "1")
NONNEGATIVE = (-0.5, INF, NAN, True)
UNIT = (-0.1, 1.5, INF, NAN, True)  # [0, 1]
SMOOTHING = (-0.1, 0.5, 0.7, NAN, True)  # [0, 0.5)
BOOL = (1, 0, "yes", None)
CHOICE = ("nope", None, 3)
COUNT = (0, -5, INF, NAN, True, "7", torch.tensor([2, 3]), torch.tensor(0))

# The primitive's options, as every function passes them through.
TEMPERATURE = Opt("temperature", (1.0, 0.5, 2.0), (0.0, -1.0, NAN, INF, True, "2"))
GRAD_PATH = Opt("grad_in_forward", (None, False), ("yes", 1))
GRAD_PATHS = Opt("grad_in_forward", (None, False, True), GRAD_PATH.invalid)  # True: forced
CHUNKS = Opt("chunk_size", (None, 3), (0, -2, 2.5))
IGNORE_INDEX = Opt("ignore_index", (-100,), (None, "x", 1.5))
BACKEND = Opt("backend", ("torch",), ("cuda", None))


def _draw_kwargs(data, options, culprit=None, bad=None, exclusive=(), implies=()):
    """The keyword options of one call: ``culprit`` (if any) set to ``bad`` (and what it
    needs to be read), every other option left out or drawn from its valid values.
    ``exclusive``: (ours, alias) pairs never both passed; ``implies``: (option, value,
    other, its value) where a value is valid only with the other option given."""
    kwargs = {}
    forced = next((o.needs for o in options if o.name == culprit), {})
    for o in options:
        if o.name == culprit:
            kwargs[o.name] = bad
        elif o.name in forced:
            kwargs[o.name] = forced[o.name]
        elif data.draw(st.booleans(), label=f"pass {o.name}"):
            kwargs[o.name] = data.draw(st.sampled_from(o.valid), label=o.name)
    for ours, alias in exclusive:  # both valid: TRL's alias and ours would conflict
        if ours in kwargs and alias in kwargs and culprit not in (ours, alias):
            del kwargs[ours]
    for name, value, other, needed in implies:
        if kwargs.get(name) == value and other not in kwargs:
            kwargs[other] = needed
    return kwargs


def _refusals(options, mutations):
    """Every (option, refused value) and every bad input: one parametrized case each."""
    return [pytest.param(o.name, bad, id=f"{o.name}={bad!r}") for o in options
            for bad in o.invalid] + [pytest.param(m, None, id=m) for m in mutations]


def _expect_refusal(call, named: str):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert named in str(info.value), f"the error does not name {named!r}: {info.value}"


def _gradients(total, leaves):
    """d total / d leaves; Nones when ``total`` does not depend on them at all (a reference
    with nothing scored is a constant)."""
    if not total.requires_grad:
        return [None] * len(leaves)
    return torch.autograd.grad(total, leaves, allow_unused=True)


def _close(got, want, leaves, ref_leaves, scale=10.0):
    """Finite, and equal to the float64 reference in value and every gradient. ``got`` and
    ``want`` are tensors or equal-length lists of them (the gradient is then that of their
    weighted sum, weights 1, 1/2, 1/3, ...)."""
    got, want = (list(x) if isinstance(x, (list, tuple)) else [x] for x in (got, want))
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all(), g
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        assert_close(g, w, F64, scale=scale, name="value")
    mine, theirs = (_gradients(sum(t.sum() / (k + 1) for k, t in enumerate(ts)), wrt)
                    for ts, wrt in ((got, leaves), (want, ref_leaves)))
    for g, w, leaf in zip(mine, theirs, leaves):
        g = torch.zeros_like(leaf) if g is None else g
        w = torch.zeros_like(leaf) if w is None else w
        assert torch.isfinite(g).all()
        assert_close(g, w, F64, scale=scale, name="gradient")


def _leaves(*tensors):
    """Two independent copies of each tensor, requiring grad: ours and the reference's."""
    return ([t.detach().clone().requires_grad_() for t in tensors],
            [t.detach().clone().requires_grad_() for t in tensors])


def _laid_out(data, hidden, weight):
    """The same values in another memory layout half the time: ``hidden`` [B, T, H] stored
    time-major, ``weight`` column-major (a transposed table). Views, so gradients reach the
    leaves."""
    if not data.draw(st.booleans(), label="strided"):
        return hidden, weight
    return hidden.transpose(0, 1).contiguous().transpose(0, 1), weight.T.contiguous().T


def _batch(data, paired: bool):
    """Float64 (hidden, weight, labels, generator) with ragged scored spans and holes (none,
    some or every label ignored); a preference batch has 0 to 2 pairs, another 0 to 3 rows."""
    rows = 2 * data.draw(st.integers(0, 2), label="pairs") if paired \
        else data.draw(st.integers(0, 3), label="rows")
    length = data.draw(st.integers(2, 6), label="T")
    size = data.draw(st.integers(2, 6), label="H")
    vocab = data.draw(st.integers(2, 23), label="V")
    holes = data.draw(st.sampled_from((0.3, 0.0, 1.0)), label="ignored fraction")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    hidden = torch.randn(rows, length, size, dtype=F64, generator=g)
    weight = torch.randn(vocab, size, dtype=F64, generator=g)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < holes] = -100
    return hidden, weight, labels, g


def _read(labels):
    """Where a per-token input in the labels layout is read: scored labels, column 0 never."""
    read = labels != -100
    read[:, 0] = False
    return read


def _poisoned(values, read, poison: bool):
    """``values``, with NaN wherever they are not ``read`` when ``poison``."""
    if not poison:
        return values
    return torch.where(read.reshape(read.shape + (1,) * (values.dim() - read.dim())), values,
                       torch.full_like(values, NAN))


def _per_token(labels, g, poison):
    """A per-token input in the labels layout; ``poison``: NaN wherever it is not read."""
    return _poisoned(0.5 * torch.randn(labels.shape, dtype=F64, generator=g), _read(labels),
                     poison)


def _cleaned(inputs: dict) -> dict:
    """The inputs as a reference reads them: poison (NaN where nothing reads) set to 0."""
    return {k: torch.where(v.isnan(), 0.0, v)
            if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def _via(fn, module_cls, data, kwargs):
    """The functional, or its module (options at construction, tensors at the call)."""
    if module_cls is None or not data.draw(st.booleans(), label="via module"):
        return lambda *args, **tensors: fn(*args, **tensors, **kwargs)
    return lambda *args, **tensors: module_cls(**kwargs)(*args, **tensors)


def _teacher(data, hidden, vocab, predicts, g, poison):
    """A teacher head of its own width over ``hidden``'s tokens: states [..., H_t] (NaN where
    no prediction is scored, when ``poison``) and a [V, H_t] weight."""
    width = data.draw(st.integers(1, 6), label="H_t")
    states = torch.randn(*hidden.shape[:-1], width, dtype=F64, generator=g)
    return dict(teacher_hidden=_poisoned(states, predicts, poison),
                teacher_weight=torch.randn(vocab, width, dtype=F64, generator=g))


TEACHER_MUTATIONS = {
    "teacher_hidden shape": ("teacher_hidden", lambda t: dict(
        t, teacher_hidden=t["teacher_hidden"][:, :-1])),
    "teacher_weight vocabulary": ("teacher_weight", lambda t: dict(
        t, teacher_weight=torch.cat((t["teacher_weight"], t["teacher_weight"][:1])))),
}


# ------------------------------------------------------------------------------- the primitive

# A bad input: name -> (the argument the error must name, arguments -> bad arguments).
PRIMITIVE_MUTATIONS = {
    "targets dtype": ("targets", lambda a: dict(a, targets=a["targets"].float())),
    "weight shape": ("weight", lambda a: dict(
        a, weight=torch.randn(a["weight"].shape[0], a["weight"].shape[1] + 1, dtype=F64))),
    "hidden dtype": ("hidden", lambda a: dict(a, hidden=a["hidden"].long())),
}


class PrimitiveContract(NamedTuple):
    """A primitive's contract (aligned targets, no shift): its options, bad inputs and
    float64 reference on materialised logits."""

    fn: object
    options: list
    reference: object  # (the reference's arguments, kwargs) -> list of tensors to compare
    outputs: object  # (out, kwargs) -> list of tensors, in the reference's order
    mutations: dict = PRIMITIVE_MUTATIONS
    extras: object = None  # (data, arguments, generator, poison, kwargs) -> more arguments

    def refusals(self):
        return _refusals(self.options, self.mutations)

    def check(self, data, culprit=None, bad=None):
        hidden, weight, targets, g = _batch(data, paired=False)  # aligned: no shift here
        kwargs = {"backend": "torch", **_draw_kwargs(data, self.options, culprit, bad)}
        args = dict(hidden=hidden, weight=weight, targets=targets)
        if self.extras is not None:
            poison = data.draw(st.booleans(), label="NaN where not read")
            valid = {k: v for k, v in kwargs.items() if k != culprit}
            args.update(self.extras(data, args, g, poison, valid))
        if culprit in self.mutations:
            named, mutate = self.mutations[culprit]
            return _expect_refusal(lambda: self.fn(**mutate(args), **kwargs), named)
        if culprit is not None:
            return _expect_refusal(lambda: self.fn(**args, **kwargs), culprit)
        (h, w), (rh, rw) = _leaves(args.pop("hidden"), args.pop("weight"))
        hidden, weight = _laid_out(data, h, w)
        got = self.outputs(self.fn(hidden=hidden, weight=weight, **args, **kwargs), kwargs)
        _close(got, self.reference(dict(_cleaned(args), hidden=rh, weight=rw), kwargs),
               [h, w], [rh, rw])


STATISTICS = ("logprobs", "lse", "entropy", "logits_mean")


def _logprobs_reference(args, kwargs):
    ref = linear_logprobs_reference(
        args["hidden"], args["weight"], args["targets"],
        temperature=kwargs.get("temperature", 1.0), softcap=kwargs.get("softcap"),
        return_lse=True, return_entropy=True, return_logits_mean=True)
    return [getattr(ref, name) for name in STATISTICS
            if name == "logprobs" or kwargs.get(f"return_{name}")]


SOFTCAP = Opt("softcap", (None, 2.0), (0.0, -1.0, NAN, INF, True))
FILTER = Opt("filter_eps", (None,), (-1.0,))


def _cross_entropy_reference(args, kwargs):
    options = {k: v for k, v in kwargs.items()
               if k not in ("backend", "chunk_size", "grad_in_forward")}
    return [linear_cross_entropy_reference(args["hidden"], args["weight"], args["targets"],
                                           **options)]


def _chunk_loss(data, args, g, poison, kwargs):
    """A ``loss_fn`` for linear_logprobs_loss (with its ``groups``): weights per position on
    one statistic, or a per-row non-linearity of the row's summed log-probs."""
    targets = args["targets"]
    rows, length = targets.shape
    weights = torch.randn(targets.numel(), dtype=F64, generator=g)
    kinds = ["logprobs", "lse", "per row"] + [name for name in ("entropy", "logits_mean")
                                              if kwargs.get(f"return_{name}")]
    kind = data.draw(st.sampled_from(kinds), label="loss_fn")
    if kind != "per row":
        return dict(loss_fn=lambda stats, positions: (
            getattr(stats, kind) * weights[positions]).sum())

    def per_row(stats, positions):  # counts only the rows present, as loss_fn must
        row = positions // length
        sums = stats.logprobs.new_zeros(rows).index_add(0, row, stats.logprobs)
        present = torch.zeros(rows, dtype=torch.bool).index_fill(0, row, True)
        return torch.where(present, -F.logsigmoid(sums), 0.0).sum()
    return dict(loss_fn=per_row, groups=torch.arange(rows).unsqueeze(-1).expand(rows, length))


def _logprobs_loss_reference(args, kwargs):
    ref = linear_logprobs_reference(
        args["hidden"], args["weight"], args["targets"],
        temperature=kwargs.get("temperature", 1.0), softcap=kwargs.get("softcap"),
        return_lse=True, return_entropy=True, return_logits_mean=True)
    positions = (args["targets"].reshape(-1) != -100).nonzero().squeeze(-1)
    stats = LogProbs(*(None if t is None else t.reshape(-1)[positions] for t in ref))
    return [args["loss_fn"](stats, positions)]


def _with_a_scored_token(args, needs_grad=True):
    """The arguments with a scored token (only then is a ``loss_fn`` called for certain),
    every token its own group, and a hidden that needs a gradient or not."""
    hidden, targets = args["hidden"], args["targets"].clone()
    if targets.numel() == 0:
        hidden = hidden.new_zeros(1, *hidden.shape[1:])
        targets = targets.new_full((1, targets.shape[1]), -100)
    targets.view(-1)[0] = 0
    return dict(args, hidden=hidden.detach().requires_grad_(needs_grad), targets=targets,
                groups=None)


_LEARNABLE = torch.ones((), dtype=F64, requires_grad=True)
LOSS_FN_MUTATIONS = {
    "loss_fn not scalar": ("loss_fn", lambda a: dict(
        _with_a_scored_token(a), loss_fn=lambda stats, positions: stats.logprobs)),
    "loss_fn not scalar, no gradient": ("loss_fn", lambda a: dict(
        _with_a_scored_token(a, needs_grad=False),
        loss_fn=lambda stats, positions: stats.logprobs)),
    "loss_fn reads a learnable tensor": ("loss_fn", lambda a: dict(
        _with_a_scored_token(a),
        loss_fn=lambda stats, positions: _LEARNABLE * stats.logprobs.sum())),
    "groups shape": ("groups", lambda a: dict(
        a, groups=torch.zeros(a["targets"].numel() + 1, dtype=torch.long))),
}


def _teacher_of_targets(data, args, g, poison, kwargs):
    return _teacher(data, args["hidden"], args["weight"].shape[0], args["targets"] != -100, g,
                    poison)


def _divergences(args, kwargs):
    """Per-token (divergence, student log-probs) on materialised float64 logits."""
    return naive_divergence.per_token(
        args["hidden"], args["weight"], args["teacher_hidden"], args["teacher_weight"],
        args["targets"], kind=kwargs.get("divergence", "jsd"), beta=kwargs.get("beta", 0.5),
        temperature=kwargs.get("temperature", 1.0))


DIVERGENCE_OPTIONS = [Opt("divergence", DISTILL_DIVERGENCES, CHOICE),
                      Opt("beta", (0.5, 0.0, 1.0, 0.3), UNIT), TEMPERATURE, CHUNKS,
                      IGNORE_INDEX, BACKEND]
HARD_WEIGHT = Opt("hard_weight", (0.0, 0.5), FINITE)


def _divergence_reference(args, kwargs):
    divergence, logprobs = _divergences(args, kwargs)
    return [divergence] + ([logprobs] if kwargs.get("return_logprobs") else [])


def _divergence_outputs(out, kwargs):
    if not kwargs.get("return_logprobs"):
        assert out.logprobs is None
        return [out.divergence]
    return [out.divergence, out.logprobs]


def _divergence_loss_reference(args, kwargs):
    divergence, logprobs = _divergences(args, kwargs)
    loss = divergence.sum() - kwargs.get("hard_weight", 0.0) * logprobs.sum()
    return [loss, divergence.detach()]


PRIMITIVES = {
    "linear_logprobs": PrimitiveContract(
        linear_logprobs,
        [TEMPERATURE, SOFTCAP, CHUNKS, IGNORE_INDEX, BACKEND, FILTER, Opt("return_lse", (True,)),
         Opt("return_entropy", (True, False)), Opt("return_logits_mean", (True, False))],
        _logprobs_reference,
        lambda out, kwargs: [getattr(out, name) for name in STATISTICS
                             if name == "logprobs" or kwargs.get(f"return_{name}")]),
    "linear_cross_entropy": PrimitiveContract(
        linear_cross_entropy,
        [TEMPERATURE, CHUNKS, IGNORE_INDEX, GRAD_PATHS,
         Opt("reduction", ("mean", "sum", "none"), CHOICE),
         Opt("label_smoothing", (0.0, 0.2), (-0.1, 1.5, NAN, True)),
         Opt("lse_square_scale", (0.0, 1e-2), (-1.0, NAN, INF, True))],
        _cross_entropy_reference, lambda out, kwargs: [out]),
    "linear_logprobs_loss": PrimitiveContract(
        linear_logprobs_loss,
        [TEMPERATURE, SOFTCAP, CHUNKS, IGNORE_INDEX, BACKEND, FILTER,
         Opt("return_entropy", (True, False)), Opt("return_logits_mean", (True, False))],
        _logprobs_loss_reference, lambda out, kwargs: [out],
        mutations={**PRIMITIVE_MUTATIONS, **LOSS_FN_MUTATIONS}, extras=_chunk_loss),
    "linear_divergence": PrimitiveContract(
        linear_divergence, DIVERGENCE_OPTIONS + [Opt("return_logprobs", (True, False))],
        _divergence_reference, _divergence_outputs,
        mutations={**PRIMITIVE_MUTATIONS, **TEACHER_MUTATIONS}, extras=_teacher_of_targets),
    "linear_divergence_loss": PrimitiveContract(
        linear_divergence_loss,
        DIVERGENCE_OPTIONS + [HARD_WEIGHT, GRAD_PATHS],
        _divergence_loss_reference,
        lambda out, kwargs: [out[0], out[1].divergence.detach()],
        mutations={**PRIMITIVE_MUTATIONS, **TEACHER_MUTATIONS}, extras=_teacher_of_targets),
}


@covers(*PRIMITIVES)
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
@deterministic(20)
@given(data=st.data())
def test_contract_primitive(name, data):
    PRIMITIVES[name].check(data)


@pytest.mark.parametrize("name,culprit,bad", [
    pytest.param(name, *case.values, id=f"{name}-{case.id}")
    for name in sorted(PRIMITIVES) for case in PRIMITIVES[name].refusals()])
@deterministic(1)
@given(data=st.data())
def test_contract_primitive_refuses(name, culprit, bad, data):
    PRIMITIVES[name].check(data, culprit, bad)


# ------------------------------------------------------------------------------ the objectives

# A bad input: name -> (the argument the error must name, tensors -> bad tensors).
OBJECTIVE_MUTATIONS = {
    "labels dtype": ("labels", lambda t: dict(t, labels=t["labels"].double())),
    "hidden shape": ("hidden", lambda t: dict(t, hidden=t["hidden"][:, :-1])),
    "weight shape": ("weight", lambda t: dict(
        t, weight=torch.randn(3, t["weight"].shape[1] + 1, dtype=F64))),
}
PAIR_MUTATIONS = {  # one row more: 2B + 1 rows
    "odd rows": ("labels", lambda t: dict(
        t, hidden=torch.cat((t["hidden"], t["hidden"].new_zeros(1, *t["hidden"].shape[1:]))),
        labels=torch.cat((t["labels"], torch.full((1, t["labels"].shape[1]), -100))))),
}
REFERENCE_MUTATIONS = {  # whichever form of the reference the example uses
    "reference shape": ("ref_", lambda t: dict(t, ref_logprobs=t["ref_logprobs"][:, 1:])
                        if "ref_logprobs" in t
                        else dict(t, ref_chosen_logps=t["ref_chosen_logps"][:-1]
                                  if len(t["ref_chosen_logps"]) else torch.zeros(2, dtype=F64))),
}
SHARED = [TEMPERATURE, GRAD_PATH, CHUNKS, IGNORE_INDEX]


class Contract(NamedTuple):
    """An objective's contract: its options, bad inputs and float64 reference."""

    fn: object
    module_cls: object
    options: list
    reference: object  # (hidden / τ, weight, labels, clean tensors, kwargs) -> loss
    mutations: dict = {}
    paired: bool = False
    per_token: tuple = ()  # per-token inputs, labels layout
    per_sequence: bool = False  # TRL's ref_chosen_logps/ref_rejected_logps offered too
    exclusive: tuple = ()  # (ours, TRL's alias)
    implies: tuple = ()  # (option, value, another option it needs, that one's value)
    extras: object = None  # (data, hidden, weight, labels, generator, poison, kwargs) -> tensors
    tempered: bool = True  # the reference takes hidden / τ (no τ of its own)

    @property
    def all_options(self):
        return self.options + SHARED

    @property
    def all_mutations(self):
        return {**OBJECTIVE_MUTATIONS, **(PAIR_MUTATIONS if self.paired else {}),
                **self.mutations}

    def refusals(self):
        return _refusals(self.all_options, self.all_mutations)

    def check(self, data, culprit=None, bad=None):
        """One example: a refusal naming the culprit, or the float64 reference."""
        hidden, weight, labels, g = _batch(data, self.paired)
        poison = data.draw(st.booleans(), label="NaN where not read")
        tensors = {name: _per_token(labels, g, poison) for name in self.per_token}
        if self.per_sequence and data.draw(st.booleans(), label="per-sequence reference"):
            sums = torch.where(_read(labels), tensors.pop("ref_logprobs"), 0.0).sum(-1)
            half = labels.shape[0] // 2
            tensors.update(ref_chosen_logps=sums[:half], ref_rejected_logps=sums[half:])
        kwargs = _draw_kwargs(data, self.all_options, culprit, bad, self.exclusive,
                              self.implies)
        if self.extras is not None:  # drawn knowing the valid options (a temperature)
            valid = {k: v for k, v in kwargs.items() if k != culprit}
            tensors.update(self.extras(data, hidden, weight, labels, g, poison, valid))
        call = _via(self.fn, self.module_cls, data, dict(kwargs, backend="torch"))
        inputs = dict(tensors, hidden=hidden, weight=weight, labels=labels)
        if culprit in self.all_mutations:
            named, mutate = self.all_mutations[culprit]
            inputs = mutate(inputs)
        # labels by keyword: distillation takes the teacher's tensors before them
        hidden, weight = inputs.pop("hidden"), inputs.pop("weight")
        if culprit is not None:
            named = named if culprit in self.all_mutations else culprit
            return _expect_refusal(lambda: call(hidden, weight, **inputs), named)
        (h, w), (rh, rw) = _leaves(hidden, weight)
        out = call(*_laid_out(data, h, w), **inputs)
        assert all(torch.isfinite(v) for v in out.metrics.values()), out.metrics
        labels, clean = inputs.pop("labels"), _cleaned(inputs)
        if labels.shape[0] == 0:
            want = (rh.sum() + rw.sum()) * 0
        else:  # logits / τ = (h / τ)·Wᵀ: the naive objectives take no τ
            scale = kwargs.get("temperature", 1.0) if self.tempered else 1.0
            want = self.reference(rh / scale, rw, labels, clean, kwargs)
        _close(out.loss, want, [h, w], [rh, rw], scale=100)


def _sequence_reference(labels, inputs, average):
    """[2B] reference sequence log-probs from either form of the reference."""
    read = _read(labels)
    if "ref_chosen_logps" in inputs:
        sums = torch.cat((inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]))
        return sums / read.sum(-1).clamp_min(1) if average else sums
    return naive.seq(inputs["ref_logprobs"], read, average)


def _as_per_token(labels, inputs):
    """A per-token reference the naive objectives can read: the given one, or for TRL's
    per-sequence sums each row's sum on its first read token (they read only the sums)."""
    if "ref_chosen_logps" not in inputs:
        return inputs["ref_logprobs"]
    ref = torch.zeros(labels.shape, dtype=F64)
    ref[torch.arange(labels.shape[0]), _read(labels).double().argmax(-1)] = \
        _sequence_reference(labels, inputs, False)
    return ref


def _count(kw):
    count = kw.get("num_items_in_batch")
    return None if count is None else float(count)


def _sft_reference(hidden, weight, labels, inputs, kw):
    return naive.sft(hidden, weight, labels, inputs["ref_logprobs"],
                     divergence=kw.get("divergence", "total_variation"),
                     beta=kw.get("beta", 1.0), value_mode=kw.get("value_mode", "sequence"),
                     value_grad=kw.get("value_grad", False), num_items=_count(kw),
                     max_weight=kw.get("max_weight", 10.0))


def _dpo_reference(hidden, weight, labels, inputs, kw):
    from tests.objectives.test_dpo import naive_dpo

    loss_type, beta = kw.get("loss_type", "sigmoid"), kw.get("beta", 0.1)
    average = kw.get("average_log_prob", False) or loss_type == "ipo"
    delta = None
    if loss_type == "bco_pair":  # this batch's mean reward folded into the running mean
        logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)
        rho = naive.seq(logps, mask, average) - _sequence_reference(labels, inputs, average)
        count = kw.get("bco_count", 0)
        delta = (count * kw.get("bco_delta", 0.0) + beta * rho.mean()) / (count + 1)
    return naive_dpo(hidden, weight, labels, _as_per_token(labels, inputs),
                     loss_type=loss_type, beta=beta, eps=kw.get("label_smoothing", 0.0),
                     average=average, rpo_alpha=kw.get("rpo_alpha"),
                     tau=kw.get("discopop_tau", 0.05), delta=delta)


def _dil_reference(hidden, weight, labels, inputs, kw):
    from tests.objectives.test_dil import naive_dil

    return naive_dil(hidden, weight, labels, _as_per_token(labels, inputs),
                     kw.get("variant", "lsif"), kw.get("average_log_prob", True),
                     beta=kw.get("beta", 0.1), clamp=kw.get("max_log_ratio"))[0]


def _simpo_reference(hidden, weight, labels, inputs, kw):
    from tests.objectives.test_ref_free import naive_simpo

    gamma = kw["simpo_gamma"] if kw.get("simpo_gamma") is not None else kw.get("gamma", 0.5)
    return naive_simpo(hidden, weight, labels, kw.get("beta", 2.0), gamma,
                       kw.get("label_smoothing", 0.0))


def _orpo_reference(hidden, weight, labels, inputs, kw):
    from tests.objectives.test_ref_free import naive_orpo

    lam = kw["beta"] if kw.get("beta") is not None else kw.get("lam", 0.1)
    return naive_orpo(hidden, weight, labels, lam)[0]


def _cpo_reference(hidden, weight, labels, inputs, kw):
    from tests.objectives.test_ref_free import naive_cpo

    alpha = kw["cpo_alpha"] if kw.get("cpo_alpha") is not None else kw.get("alpha", 1.0)
    return naive_cpo(hidden, weight, labels, kw.get("beta", 0.1), alpha,
                     kw.get("label_smoothing", 0.0), kw.get("average_log_prob", False))


def _reinforce_reference(hidden, weight, labels, inputs, kw):
    from tests.objectives.test_reinforce import naive_reinforce

    return naive_reinforce(hidden, weight, labels, inputs["rewards"], kw.get("gamma", 1.0),
                           kw.get("whiten", False), kw.get("kl_coef", 0.0),
                           inputs["init_logprobs"])


def _near_policy(hidden, weight, labels, kw, g, poison, spread=0.3):
    """Per-token log-probs of another policy near this one (labels layout): ratios about 1,
    so clipping and the KL's curvature both show."""
    logps, _, mask = naive.labels_logps(hidden / kw.get("temperature", 1.0), weight, labels)
    near = (logps + spread * torch.randn(logps.shape, dtype=F64, generator=g)) * mask
    return _poisoned(near, _read(labels), poison)


def _rl_inputs(data, hidden, weight, labels, g, poison, kw, *, per_token_only=False):
    """GRPO's tensors: advantages per sequence or per token, the reference and (optionally
    for GRPO) the sampling policy near the policy, and optionally the sampler's ratio."""
    rows = labels.shape[0]
    tensors = dict(ref_logprobs=_near_policy(hidden, weight, labels, kw, g, poison, 0.5))
    if per_token_only or data.draw(st.booleans(), label="per-token advantages"):
        tensors["advantages"] = 3 * _per_token(labels, g, poison)
    else:
        tensors["advantages"] = torch.randn(rows, dtype=F64, generator=g)
    if per_token_only or data.draw(st.booleans(), label="old_logprobs"):
        tensors["old_logprobs"] = _near_policy(hidden, weight, labels, kw, g, poison)
    if data.draw(st.booleans(), label="vllm_is_ratio"):
        log_ratio = _per_token(labels, g, poison) if data.draw(st.booleans()) \
            else 0.5 * torch.randn(rows, dtype=F64, generator=g)
        tensors["vllm_is_ratio"] = log_ratio.exp()
    return tensors


def _grpo_reference(hidden, weight, labels, inputs, kw):
    from tests.objectives.test_grpo import naive_grpo

    x = SimpleNamespace(hidden=hidden, weight=weight, labels=labels, bias=None,
                        adv=inputs["advantages"])
    return naive_grpo(x, old=inputs.get("old_logprobs"), ref=inputs["ref_logprobs"],
                      beta=kw.get("beta", 0.0), eps_low=kw.get("epsilon_low", 0.2),
                      eps_high=kw.get("epsilon_high", 0.2), loss_type=kw.get("loss_type", "dapo"),
                      level=kw.get("importance_sampling_level", "token"),
                      max_len=kw.get("max_completion_length"),
                      entropy_coef=kw.get("entropy_coef", 0.0),
                      is_ratio=inputs.get("vllm_is_ratio"), delta=kw.get("delta"),
                      num_items=_count(kw))


def _kto_inputs(data, hidden, weight, labels, g, poison, kw):
    """Preferences (bool or 0/1), the reference near the policy, and without ``kl`` maybe a
    mismatched batch (its own rows and length) to estimate the reference point on."""
    desirable = torch.rand(labels.shape[0], generator=g) < 0.5
    tensors = dict(preference_labels=desirable if data.draw(st.booleans(), label="bool")
                   else desirable.long(),
                   ref_logprobs=_near_policy(hidden, weight, labels, kw, g, poison, 0.4))
    if "kl" not in kw and data.draw(st.booleans(), label="estimate the reference point"):
        rows, length = data.draw(st.integers(1, 3)), labels.shape[1] + 1
        kl_hidden = torch.randn(rows, length, hidden.shape[-1], dtype=F64, generator=g)
        kl_labels = torch.randint(0, weight.shape[0], (rows, length), generator=g)
        kl_labels[torch.rand(rows, length, generator=g) < 0.3] = -100
        tensors.update(kl_hidden=kl_hidden, kl_labels=kl_labels, kl_ref_logprobs=_near_policy(
            kl_hidden, weight, kl_labels, kw, g, poison, 0.4) - 0.3)
    return tensors


def _kto_reference(hidden, weight, labels, inputs, kw):
    from tests.objectives.test_kto import naive_estimate, naive_kto

    average = kw.get("average_log_prob", False)
    if "kl_hidden" in inputs:
        z = naive_estimate(SimpleNamespace(
            kl_hidden=inputs["kl_hidden"] / kw.get("temperature", 1.0), weight=weight,
            kl_labels=inputs["kl_labels"], kl_ref=inputs["kl_ref_logprobs"], bias=None), average)
    else:
        z = max(float(kw.get("kl", 0.0)), 0.0)
    x = SimpleNamespace(hidden=hidden, weight=weight, labels=labels, bias=None,
                        ref=inputs["ref_logprobs"])
    return naive_kto(x, inputs["preference_labels"].bool(), z=z, beta=kw.get("beta", 0.1),
                     dw=kw.get("desirable_weight", 1.0), uw=kw.get("undesirable_weight", 1.0),
                     loss_type=kw.get("loss_type", "kto"), average=average)


def _distill_teacher(data, hidden, weight, labels, g, poison, kw):
    predicts = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))  # hidden t -> label t+1
    return _teacher(data, hidden, weight.shape[0], predicts, g, poison)


def _distill_reference(hidden, weight, labels, inputs, kw):
    return naive_divergence.distill(
        hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"], labels,
        kind=kw.get("divergence", "jsd"), beta=kw.get("beta", 0.5),
        temperature=kw.get("temperature", 1.0), hard_weight=kw.get("hard_weight", 0.0),
        divisor=_count(kw))


WITH_REFERENCE = dict(mutations=REFERENCE_MUTATIONS, per_token=("ref_logprobs",))
RL_OPTIONS = [
    Opt("loss_type", tuple(sorted(TOKEN_WEIGHTS)), CHOICE),
    Opt("importance_sampling_level", ("token", "sequence"), CHOICE),
    Opt("beta", (0.0, 0.1), NONNEGATIVE), Opt("epsilon_low", (0.2, 0.0), (1.0,) + UNIT),
    Opt("epsilon_high", (0.2, 0.28), POSITIVE),
    Opt("max_completion_length", (8,), (0, -1, 2.5, True)),
    Opt("entropy_coef", (0.0, 0.05), FINITE), Opt("delta", (None, 1.5), POSITIVE),
    Opt("num_items_in_batch", (7, torch.tensor(5)), COUNT)]
def _one_more_column(values):
    """[B] -> [B + 1], [B, T] -> [B, T + 1]: a shape no per-sequence or per-token input has."""
    return torch.cat((values, values.new_zeros(*values.shape[:-1], 1)), -1)


RL_IMPLIES = (("loss_type", "dr_grpo", "max_completion_length", 8),)
RL_MUTATIONS = {
    "advantages dtype": ("advantages", lambda t: dict(t, advantages=t["advantages"].long())),
    "advantages shape": ("advantages", lambda t: dict(
        t, advantages=_one_more_column(t["advantages"]))),
    "old_logprobs shape": ("old_logprobs", lambda t: dict(
        t, old_logprobs=_one_more_column(t["ref_logprobs"]))),
}
CONTRACTS = {
    "sft_loss": Contract(sft_loss, fused_losses.FusedSFTLoss, [
        Opt("divergence", tuple(sorted(DIVERGENCES)), CHOICE),
        Opt("beta", (1.0, 0.5, 2.0), POSITIVE),
        Opt("value_mode", ("sequence", "token"), CHOICE), Opt("value_grad", (False, True), BOOL),
        Opt("max_weight", (10.0, 2.0), POSITIVE),
        Opt("num_items_in_batch", (7, torch.tensor(5)), COUNT)],
        _sft_reference, **WITH_REFERENCE),
    "dpo_loss": Contract(dpo_loss, fused_losses.FusedDPOLoss, [
        Opt("loss_type", tuple(sorted(DPO_LOSSES)), CHOICE), Opt("beta", (0.1, 0.5), POSITIVE),
        Opt("label_smoothing", (0.0, 0.2), SMOOTHING),
        Opt("average_log_prob", (False, True), BOOL),
        Opt("rpo_alpha", (None, 0.5), NONNEGATIVE), Opt("discopop_tau", (0.05, 0.5), POSITIVE),
        Opt("bco_delta", (0.0, 0.3), FINITE, dict(loss_type="bco_pair")),
        Opt("bco_count", (0, 3), NONNEGATIVE, dict(loss_type="bco_pair"))],
        _dpo_reference, paired=True, per_sequence=True, **WITH_REFERENCE),
    "dil_loss": Contract(dil_loss, fused_losses.FusedDILLoss, [
        Opt("variant", tuple(sorted(DIL_LOSSES)), CHOICE), Opt("beta", (0.1, 0.4), POSITIVE),
        Opt("average_log_prob", (True, False), BOOL),
        Opt("max_log_ratio", (None, 0.2), FINITE)],
        _dil_reference, paired=True, per_sequence=True, **WITH_REFERENCE),
    "simpo_loss": Contract(simpo_loss, fused_losses.FusedSimPOLoss, [
        Opt("beta", (2.0, 0.5), POSITIVE), Opt("gamma", (0.5, -0.3), FINITE),
        Opt("simpo_gamma", (None, 1.0), FINITE), Opt("label_smoothing", (0.0, 0.2), SMOOTHING)],
        _simpo_reference, paired=True, exclusive=(("gamma", "simpo_gamma"),)),
    "orpo_loss": Contract(orpo_loss, fused_losses.FusedORPOLoss, [
        Opt("lam", (0.1, 0.5), POSITIVE), Opt("beta", (None, 0.3), POSITIVE)],
        _orpo_reference, paired=True, exclusive=(("lam", "beta"),)),
    "cpo_loss": Contract(cpo_loss, fused_losses.FusedCPOLoss, [
        Opt("beta", (0.1, 0.5), POSITIVE), Opt("alpha", (1.0, 0.0), NONNEGATIVE),
        Opt("cpo_alpha", (None, 0.3), NONNEGATIVE),
        Opt("label_smoothing", (0.0, 0.2), SMOOTHING),
        Opt("average_log_prob", (False, True), BOOL)],
        _cpo_reference, paired=True, exclusive=(("alpha", "cpo_alpha"),)),
    "reinforce_loss": Contract(reinforce_loss, fused_losses.FusedReinforceLoss, [
        Opt("gamma", (1.0, 0.8), UNIT), Opt("whiten", (False, True), BOOL),
        Opt("kl_coef", (0.0, 0.2), NONNEGATIVE)],
        _reinforce_reference, per_token=("rewards", "init_logprobs"),
        mutations={"rewards dtype": ("rewards", lambda t: dict(t, rewards=t["rewards"].long()))}),
    "grpo_loss": Contract(grpo_loss, fused_losses.FusedGRPOLoss, RL_OPTIONS, _grpo_reference,
                          extras=_rl_inputs, implies=RL_IMPLIES, mutations=RL_MUTATIONS),
    "ppo_loss": Contract(ppo_loss, fused_losses.FusedPPOLoss, RL_OPTIONS, _grpo_reference,
                         extras=functools.partial(_rl_inputs, per_token_only=True),
                         implies=RL_IMPLIES, mutations={
                             **RL_MUTATIONS,
                             "advantages per sequence": ("advantages", lambda t: dict(
                                 t, advantages=t["advantages"][:, 0])),
                             "no old_logprobs": ("old_logprobs", lambda t: dict(
                                 t, old_logprobs=None))}),
    "kto_loss": Contract(kto_loss, fused_losses.FusedKTOLoss, [
        Opt("loss_type", tuple(sorted(KTO_LOSSES)), CHOICE), Opt("beta", (0.1, 0.5), POSITIVE),
        Opt("desirable_weight", (1.0, 1.33), NONNEGATIVE),
        Opt("undesirable_weight", (1.0, 0.5), NONNEGATIVE),
        Opt("average_log_prob", (False, True), BOOL),
        Opt("kl", (0.2, -0.3, torch.tensor(0.1)),
            FINITE + (torch.tensor(NAN), torch.ones(4)))],
        _kto_reference, extras=_kto_inputs, mutations={
            "preference_labels dtype": ("preference_labels", lambda t: dict(
                t, preference_labels=t["preference_labels"].double())),
            "preference_labels shape": ("preference_labels", lambda t: dict(
                t, preference_labels=torch.ones(len(t["labels"]) + 1, dtype=torch.bool))),
            "reference shape": ("ref_logprobs", lambda t: dict(
                t, ref_logprobs=t["ref_logprobs"][:, 1:])),
            "kl_hidden alone": ("kl_hidden", lambda t: dict(
                {k: v for k, v in t.items() if not k.startswith("kl_")},
                kl_hidden=t["hidden"]))}),
    "distill_loss": Contract(distill_loss, fused_losses.FusedDistillLoss, [
        Opt("divergence", DISTILL_DIVERGENCES, CHOICE), Opt("beta", (0.5, 0.0, 1.0, 0.3), UNIT),
        HARD_WEIGHT, Opt("num_items_in_batch", (7, torch.tensor(5)), COUNT)],
        _distill_reference, extras=_distill_teacher, tempered=False,
        mutations=TEACHER_MUTATIONS),
}
OBJECTIVE_NAMES = [*CONTRACTS, *(c.module_cls.__name__ for c in CONTRACTS.values()),
                   "FusedLoss"]  # the modules' base class, through every one of them


@covers(*OBJECTIVE_NAMES)
@pytest.mark.parametrize("name", sorted(CONTRACTS))
@deterministic(15)
@given(data=st.data())
def test_contract_objective(name, data):
    CONTRACTS[name].check(data)


@pytest.mark.parametrize("name,culprit,bad", [
    pytest.param(name, *case.values, id=f"{name}-{case.id}")
    for name in sorted(CONTRACTS) for case in CONTRACTS[name].refusals()])
@deterministic(1)
@given(data=st.data())
def test_contract_objective_refuses(name, culprit, bad, data):
    CONTRACTS[name].check(data, culprit, bad)


@deterministic(40)
@given(divergence=st.sampled_from(sorted(DIVERGENCES)),
       max_weight=st.sampled_from((0.5, 3.0, 10.0, 1e4) + POSITIVE),
       u=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=8))
def test_contract_phi_safe(divergence, max_weight, u):
    values = torch.tensor(u, dtype=F64, requires_grad=True)
    if any(max_weight is bad for bad in POSITIVE):
        return _expect_refusal(lambda: phi_safe(divergence, values, max_weight=max_weight),
                               "max_weight")
    phi, _ = phi_safe(divergence, values, max_weight=max_weight)
    (slope,) = torch.autograd.grad(phi.sum(), values)
    want = torch.stack([naive.phi_safe_scalar(divergence, x, max_weight)
                        for x in values.detach().unbind()])
    assert torch.isfinite(phi).all() and torch.isfinite(slope).all()
    assert_close(phi, want, F64, scale=1e3, name="phi")
    if divergence not in ("total_variation", "pearson_chi2"):  # the guarded ones
        assert float(slope.max()) <= max_weight * (1 + 1e-9)


# ------------------------------------------------------------------ functions taking a model

@functools.lru_cache(maxsize=None)
def _model(seed: int = 0):
    from tests.objectives.models import tiny_model

    return tiny_model("llama", seed=seed)


IFT_OPTIONS = [Opt("lam", (0.2, 0.0, 1.0), UNIT), Opt("gamma", (0.95, 0.0), UNIT),
               Opt("detach_weights", (False, True), BOOL), Opt("eps", (1e-8,), POSITIVE),
               Opt("train_embeddings", (False, True), BOOL), GRAD_PATH, CHUNKS, IGNORE_INDEX]


def _check_ift(data, culprit=None, bad=None):
    from tests.objectives.models import lm_batch
    from tests.objectives.test_ift import naive_ift

    model = _model()
    input_ids, labels, mask = lm_batch(B=2, T=6, seed=data.draw(st.integers(0, 99)))
    kwargs = _draw_kwargs(data, IFT_OPTIONS, culprit, bad)
    call = _via(ift_loss, fused_losses.FusedIFTLoss, data, dict(kwargs, backend="torch"))
    if culprit is not None:
        return _expect_refusal(lambda: call(model, input_ids, labels, attention_mask=mask),
                               culprit)
    params = [model.get_output_embeddings().weight, model.get_input_embeddings().weight]
    got = call(model, input_ids, labels, attention_mask=mask).loss
    embed = model.get_input_embeddings() if kwargs.get("train_embeddings") else None
    want = naive_ift(model, input_ids, labels, mask, kwargs.get("lam", 0.2),
                     kwargs.get("gamma", 0.95), kwargs.get("detach_weights", False), embed=embed)
    _close(got, want, params, params, scale=100)


@covers("ift_loss", "FusedIFTLoss")
@deterministic(3)
@given(data=st.data())
def test_contract_ift_loss(data):
    _check_ift(data)


@pytest.mark.parametrize("culprit,bad", _refusals(IFT_OPTIONS, {}))
@deterministic(1)
@given(data=st.data())
def test_contract_ift_loss_refuses(culprit, bad, data):
    _check_ift(data, culprit, bad)


def _naive_logprobs(models, *batch):
    from tests.objectives.test_logprobs import naive_token_logprobs

    return naive_token_logprobs(models[0], *batch)


def _naive_rewards(models, *batch):
    return _naive_logprobs(models, *batch) - _naive_logprobs(models[1:], *batch)


# name -> (the function on (models, input_ids, labels, mask), its float64 reference)
PER_TOKEN_OF_MODELS = {
    "token_logprobs": (lambda models, *batch, **kw: token_logprobs(models[0], *batch, **kw),
                       _naive_logprobs),
    "token_rewards": (lambda models, *batch, **kw: token_rewards(*models, *batch, **kw),
                      _naive_rewards),
}
# A temperature would multiply the model's own: only refusals of it are checked here.
LOGPROBS_OPTIONS = [Opt("temperature", (1.0,), TEMPERATURE.invalid), CHUNKS, IGNORE_INDEX]


def _check_per_token_of_models(name, data, culprit=None, bad=None):
    from tests.objectives.models import lm_batch

    fn, reference = PER_TOKEN_OF_MODELS[name]
    models = (_model(), _model(seed=1))
    batch = lm_batch(B=2, T=6, seed=data.draw(st.integers(0, 99)))
    call = functools.partial(fn, models, *batch, backend="torch",
                             **_draw_kwargs(data, LOGPROBS_OPTIONS, culprit, bad))
    if culprit is not None:
        return _expect_refusal(call, culprit)
    got = call()
    assert torch.isfinite(got).all() and not got.requires_grad
    assert_close(got, reference(models, *batch), F64, scale=100)


@covers(*PER_TOKEN_OF_MODELS)
@pytest.mark.parametrize("name", PER_TOKEN_OF_MODELS)
@deterministic(2)
@given(data=st.data())
def test_contract_per_token_of_models(name, data):
    _check_per_token_of_models(name, data)


@pytest.mark.parametrize("name,culprit,bad", [
    pytest.param(name, *case.values, id=f"{name}-{case.id}") for name in PER_TOKEN_OF_MODELS
    for case in _refusals(LOGPROBS_OPTIONS, {})])
@deterministic(1)
@given(data=st.data())
def test_contract_per_token_of_models_refuses(name, culprit, bad, data):
    _check_per_token_of_models(name, data, culprit, bad)


PATCH_OPTIONS = [Opt("temperature", (None, 2.0), TEMPERATURE.invalid),
                 Opt("outputs", (("log_probs",), ("entropy", "is_top1")),
                     ("entropy", ("log_probs", "nope"), 3)),
                 Opt("cast_lm_head_to_fp32", (False, True), BOOL),
                 Opt("backend", ("torch", "auto"), ("tritn", None)), FILTER, CHUNKS,
                 GRAD_PATHS]
PATCH_MUTATIONS = {"not a causal LM": "model", "unpatching an unpatched model": "model"}


def _check_patch(data, culprit=None, bad=None):
    """patch_causal_lm: the stock model's loss and gradients (float64, materialised logits),
    no logits; unpatch_causal_lm: the stock model back, bit for bit."""
    from tests.integrations.models import hf_loss
    from tests.objectives.models import lm_batch

    model = _model()
    kwargs = _draw_kwargs(data, PATCH_OPTIONS, culprit, bad)
    if culprit == "not a causal LM":
        return _expect_refusal(lambda: patch_causal_lm(torch.nn.Linear(3, 4), **kwargs), "model")
    if culprit == "unpatching an unpatched model":
        return _expect_refusal(lambda: unpatch_causal_lm(model), "model")
    if culprit is not None:
        return _expect_refusal(lambda: patch_causal_lm(model, **kwargs), culprit)
    input_ids, labels, mask = lm_batch(B=2, T=6, seed=data.draw(st.integers(0, 99)))
    num_items = data.draw(st.sampled_from((None, torch.tensor(7))), label="num_items_in_batch")
    params = list(model.parameters())
    stock = model(input_ids=input_ids, attention_mask=mask)
    assert patch_causal_lm(model, **kwargs) is model
    try:
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels,
                    num_items_in_batch=num_items)
        assert out.logits is None
        _close(out.loss, hf_loss(stock.logits, labels, num_items), params, params, scale=100)
    finally:
        assert unpatch_causal_lm(model) is model
    after = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    assert torch.equal(after.logits, stock.logits)


@covers("patch_causal_lm", "unpatch_causal_lm")
@deterministic(3)
@given(data=st.data())
def test_contract_patch_causal_lm(data):
    _check_patch(data)


@pytest.mark.parametrize("culprit,bad", _refusals(PATCH_OPTIONS, PATCH_MUTATIONS))
@deterministic(1)
@given(data=st.data())
def test_contract_patch_causal_lm_refuses(culprit, bad, data):
    _check_patch(data, culprit, bad)


# ------------------------------------------------------------------------ other public helpers

def _naive_mismatched_pairs(input_ids, labels, mask, ignore_index, pad_token_id):
    """Row i: row i's attended tokens before its first scored label, then row i−1's
    attended tokens from its first scored label on (row 0 takes the last row's), padded."""
    rows = len(input_ids)
    split = []
    for i in range(rows):
        attended = [t for t in range(input_ids.shape[1]) if mask[i, t]]
        first = next((k for k, t in enumerate(attended) if labels[i, t] != ignore_index),
                     len(attended))
        split.append((attended[:first], attended[first:]))
    pieces = []
    for i in range(rows):
        prompt, completion, other = split[i][0], split[i - 1][1], (i - 1) % rows
        pieces.append(([int(input_ids[i, t]) for t in prompt]
                       + [int(input_ids[other, t]) for t in completion],
                       [ignore_index] * len(prompt) + [int(labels[other, t]) for t in completion]))
    width = max(len(ids) for ids, _ in pieces)
    ids, labs, attended = (torch.full((rows, width), fill, dtype=torch.long)
                           for fill in (pad_token_id, ignore_index, 0))
    for i, (row_ids, row_labels) in enumerate(pieces):
        ids[i, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        labs[i, :len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        attended[i, :len(row_ids)] = 1
    return ids, labs, attended


MISMATCH_MUTATIONS = {
    "one row": ("input_ids", lambda ids, labels, mask: (ids[:1], labels[:1], mask[:1])),
    "input_ids one-dimensional": ("input_ids", lambda ids, labels, mask: (ids[0], labels, mask)),
    "labels shape": ("labels", lambda ids, labels, mask: (ids, labels[:, 1:], mask)),
    "attention_mask shape": ("attention_mask", lambda ids, labels, mask: (
        ids, labels, torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long))),
}


def _check_mismatched_pairs(data, culprit=None):
    """Random ragged batches (any attention mask, other ignore and pad ids) against the
    naive rotation; a bad input refused naming it."""
    rows, length = data.draw(st.integers(2, 4), label="B"), data.draw(st.integers(1, 6))
    ignore_index = data.draw(st.sampled_from((-100, -1)), label="ignore_index")
    pad_token_id = data.draw(st.sampled_from((0, 99)), label="pad_token_id")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    input_ids = torch.randint(1, 50, (rows, length), generator=g)
    labels = torch.where(torch.rand(rows, length, generator=g) < 0.4, ignore_index, input_ids)
    mask = (torch.rand(rows, length, generator=g) < 0.8).long()
    given_mask = mask if data.draw(st.booleans(), label="attention_mask") else None
    options = dict(ignore_index=ignore_index, pad_token_id=pad_token_id)
    if culprit is not None:
        named, mutate = MISMATCH_MUTATIONS[culprit]
        return _expect_refusal(lambda: mismatched_pairs(*mutate(input_ids, labels, mask),
                                                        **options), named)
    got = mismatched_pairs(input_ids, labels, given_mask, **options)
    want = _naive_mismatched_pairs(input_ids, labels, torch.ones_like(mask)
                                   if given_mask is None else mask, ignore_index, pad_token_id)
    for mine, theirs in zip(got, want, strict=True):
        assert torch.equal(mine.long(), theirs), (mine, theirs)


@covers("mismatched_pairs")
@deterministic(20)
@given(data=st.data())
def test_contract_mismatched_pairs(data):
    _check_mismatched_pairs(data)


@pytest.mark.parametrize("culprit", MISMATCH_MUTATIONS)
@deterministic(1)
@given(data=st.data())
def test_contract_mismatched_pairs_refuses(culprit, data):
    _check_mismatched_pairs(data, culprit)


COLOURED_SPAN = re.compile(r'<span class="tok"(?: style="background:rgb\((\d+),(\d+),(\d+)\)" '
                           r'title="([^"]*)")?>([^<]*)</span>')
TOKEN_TEXTS = ("a", "<b>", "&", '"q"', "é", " ", "")
RENDER_OPTIONS = [Opt("title", ("Token rewards", "a <b> & c"), (3, None))]
RENDER_MUTATIONS = {
    "tokens rows": ("tokens", lambda t, r, m: (t[:-1], r, m)),
    "rewards not a tensor": ("rewards", lambda t, r, m: (t, r.tolist(), m)),
    "rewards three-dimensional": ("rewards", lambda t, r, m: (t, r[None], m)),
    "NaN reward shown": ("rewards", lambda t, r, m: (t, torch.full_like(r, NAN), None)),
    "mask shape": ("mask", lambda t, r, m: (t, r, torch.ones(r.shape[0], r.shape[1] + 1,
                                                            dtype=torch.bool))),
}


def _check_render(data, culprit=None, bad=None):
    """One span per token, its text escaped; coloured exactly where the mask is on, red for
    a reward >= 0 and blue below, |r| / max |r| of full intensity, the reward in its title;
    NaN rewards where the mask is off never reach the page."""
    rows, length = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 5))
    tokens = [[data.draw(st.sampled_from(TOKEN_TEXTS)) for _ in range(length)]
              for _ in range(rows)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    rewards = torch.randn(rows, length, dtype=F64, generator=g) * 3
    mask = torch.rand(rows, length, generator=g) < 0.7
    given_mask = mask if data.draw(st.booleans(), label="mask") else None
    kwargs = _draw_kwargs(data, RENDER_OPTIONS, culprit, bad)
    if culprit in RENDER_MUTATIONS:
        named, mutate = RENDER_MUTATIONS[culprit]
        return _expect_refusal(lambda: render_token_rewards(*mutate(tokens, rewards, mask),
                                                            **kwargs), named)
    if culprit is not None:
        return _expect_refusal(lambda: render_token_rewards(tokens, rewards, **kwargs), culprit)
    shown = torch.ones_like(mask) if given_mask is None else mask
    poisoned = torch.where(shown, rewards, NAN)
    one_row = rows == 1 and data.draw(st.booleans(), label="[T] rewards")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rewards.html"
        page = render_token_rewards(tokens[0] if one_row else tokens,
                                    poisoned[0] if one_row else poisoned,
                                    None if given_mask is None else
                                    given_mask[0] if one_row else given_mask,
                                    path=path, **kwargs)
        assert path.read_text(encoding="utf-8") == page
    assert f"<title>{html.escape(kwargs.get('title', 'Token rewards'))}</title>" in page
    assert "nan" not in page.lower()
    spans = COLOURED_SPAN.findall(page)
    assert [text for *_, text in spans] == [html.escape(t) for row in tokens for t in row]
    scale = float(rewards[shown].abs().max()) if bool(shown.any()) else 0.0
    for (red, green, blue, title, _), value, on in zip(spans, rewards.flatten().tolist(),
                                                       shown.flatten().tolist()):
        assert bool(title) == on
        if not on:
            continue
        assert title == f"{value:+.4f}"
        fade = int(green)  # red fades to white above 0, blue below
        assert (int(red), fade, int(blue)) == ((255, fade, fade) if value >= 0
                                                else (fade, fade, 255))
        assert abs((255 - fade) - 255 * abs(value) / scale) <= 0.5 + 1e-9


@covers("render_token_rewards")
@deterministic(15)
@given(data=st.data())
def test_contract_render_token_rewards(data):
    _check_render(data)


@pytest.mark.parametrize("culprit,bad", _refusals(RENDER_OPTIONS, RENDER_MUTATIONS))
@deterministic(1)
@given(data=st.data())
def test_contract_render_token_rewards_refuses(culprit, bad, data):
    _check_render(data, culprit, bad)


# ---------------------------------------------------------------------- nothing left unchecked

def test_every_public_callable_has_a_contract():
    """Every callable that ``fused_losses`` exports (but its result types, NamedTuples whose
    contract is that of the function returning them) has a contract test in this file."""
    public = {name for name in fused_losses.__all__
              if callable(value := getattr(fused_losses, name))
              and not (isinstance(value, type) and issubclass(value, tuple))}
    missing = sorted(public - set(COVERED))
    assert not missing, f"public callables without a contract test in {__name__}: {missing}"
    assert set(COVERED) <= set(fused_losses.__all__), sorted(set(COVERED) - public)
