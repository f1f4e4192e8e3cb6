"""Property tests, deterministic (derandomized, no example database: they never flake).

1. The primitive on both backends against its float64 reference over random shapes and
   options (``test_*_backend_properties``).
2. Every public function over random inputs and options, valid and not: a call either raises
   a ``TypeError``/``ValueError`` that names the bad argument, or returns finite outputs equal
   to the float64 reference, values and gradients (``test_contract_*``). At most one argument
   of an example is bad, so the error has exactly one thing to name. Objectives run on the
   torch backend with small shapes; each function gets a few seconds.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fused_losses
from fused_losses import (cpo_loss, dil_loss, dpo_loss, ift_loss, linear_cross_entropy,
                          linear_logprobs, orpo_loss, reinforce_loss, sft_loss, simpo_loss,
                          token_logprobs)
from fused_losses.objectives import DIL_LOSSES, DIVERGENCES, DPO_LOSSES, phi_safe
from fused_losses.reference import linear_cross_entropy_reference, linear_logprobs_reference
from tests.helpers import HAS_TRITON, assert_close, check_against_reference, make_inputs
from tests.objectives import naive

F64 = torch.float64
INF, NAN = math.inf, math.nan

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
CHUNKS = Opt("chunk_size", (None, 3), (0, -2, 2.5))
IGNORE_INDEX = Opt("ignore_index", (-100,), (None, "x", 1.5))


def _draw_kwargs(data, options, culprit=None, bad=None, exclusive=()):
    """The keyword options of one call: ``culprit`` (if any) set to ``bad`` (and what it
    needs to be read), every other option left out or drawn from its valid values."""
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
    for g, w in zip(got, want):
        assert torch.isfinite(g).all(), g
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


def _batch(data, paired: bool):
    """Float64 (hidden, weight, labels, generator) with ragged scored spans and holes; a
    preference batch has 0 to 2 pairs."""
    rows = 2 * data.draw(st.integers(0, 2), label="pairs") if paired \
        else data.draw(st.integers(1, 3), label="rows")
    length = data.draw(st.integers(2, 6), label="T")
    size = data.draw(st.integers(2, 6), label="H")
    vocab = data.draw(st.integers(2, 23), label="V")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    hidden = torch.randn(rows, length, size, dtype=F64, generator=g)
    weight = torch.randn(vocab, size, dtype=F64, generator=g)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < 0.3] = -100
    return hidden, weight, labels, g


def _read(labels):
    """Where a per-token input in the labels layout is read: scored labels, column 0 never."""
    read = labels != -100
    read[:, 0] = False
    return read


def _per_token(labels, g, poison):
    """A per-token input in the labels layout; ``poison``: NaN wherever it is not read."""
    values = 0.5 * torch.randn(labels.shape, dtype=F64, generator=g)
    return torch.where(_read(labels) | (not poison), values, torch.full_like(values, NAN))


def _via(fn, module_cls, data, kwargs):
    """The functional, or its module (options at construction, tensors at the call)."""
    if module_cls is None or not data.draw(st.booleans(), label="via module"):
        return lambda *args, **tensors: fn(*args, **tensors, **kwargs)
    return lambda *args, **tensors: module_cls(**kwargs)(*args, **tensors)


# ------------------------------------------------------------------------------- the primitive

class PrimitiveContract(NamedTuple):
    fn: object
    options: list
    reference: object  # (hidden, weight, targets, kwargs) -> list of tensors to compare
    outputs: object  # (out, kwargs) -> list of tensors, in the reference's order

    def check(self, data, culprit=None, bad=None):
        hidden, weight, labels, _ = _batch(data, paired=False)
        targets = labels  # aligned targets: no shift at this level
        kwargs = {"backend": "torch", **_draw_kwargs(data, self.options, culprit, bad)}
        if culprit in PRIMITIVE_MUTATIONS:
            args = PRIMITIVE_MUTATIONS[culprit](hidden, weight, targets)
            return _expect_refusal(lambda: self.fn(*args, **kwargs), culprit)
        if culprit is not None:
            return _expect_refusal(lambda: self.fn(hidden, weight, targets, **kwargs), culprit)
        (h, w), (rh, rw) = _leaves(hidden, weight)
        _close(self.outputs(self.fn(h, w, targets, **kwargs), kwargs),
               self.reference(rh, rw, targets, kwargs), [h, w], [rh, rw])


# A bad input -> the argument the error must name.
PRIMITIVE_MUTATIONS = {
    "targets": lambda h, w, t: (h, w, t.float()),
    "weight": lambda h, w, t: (h, torch.randn(w.shape[0], w.shape[1] + 1, dtype=F64), t),
    "hidden": lambda h, w, t: (h.long(), w, t),
}
STATISTICS = ("logprobs", "lse", "entropy", "logits_mean")


def _logprobs_reference(hidden, weight, targets, kwargs):
    ref = linear_logprobs_reference(
        hidden, weight, targets, temperature=kwargs.get("temperature", 1.0),
        softcap=kwargs.get("softcap"), return_lse=True, return_entropy=True,
        return_logits_mean=True)
    return [getattr(ref, name) for name in STATISTICS
            if name == "logprobs" or kwargs.get(f"return_{name}")]


LINEAR_LOGPROBS = PrimitiveContract(
    linear_logprobs,
    [TEMPERATURE, Opt("softcap", (None, 2.0), (0.0, -1.0, NAN, INF, True)), CHUNKS, IGNORE_INDEX,
     Opt("backend", ("torch",), ("cuda", None)), Opt("filter_eps", (None,), (-1.0,)),
     Opt("return_lse", (True,)), Opt("return_entropy", (True, False)),
     Opt("return_logits_mean", (True, False))],
    _logprobs_reference,
    lambda out, kwargs: [getattr(out, name) for name in STATISTICS
                         if name == "logprobs" or kwargs.get(f"return_{name}")])


def _cross_entropy_reference(hidden, weight, targets, kwargs):
    options = {k: v for k, v in kwargs.items()
               if k not in ("backend", "chunk_size", "grad_in_forward")}
    return [linear_cross_entropy_reference(hidden, weight, targets, **options)]


LINEAR_CROSS_ENTROPY = PrimitiveContract(
    linear_cross_entropy,
    [TEMPERATURE, CHUNKS, IGNORE_INDEX, Opt("grad_in_forward", (None, False, True), ("yes", 1)),
     Opt("reduction", ("mean", "sum", "none"), CHOICE),
     Opt("label_smoothing", (0.0, 0.2), (-0.1, 1.5, NAN, True)),
     Opt("lse_square_scale", (0.0, 1e-2), (-1.0, NAN, INF, True))],
    _cross_entropy_reference, lambda out, kwargs: [out])


@deterministic(25)
@given(data=st.data())
def test_contract_linear_logprobs(data):
    LINEAR_LOGPROBS.check(data)


@pytest.mark.parametrize("culprit,bad", _refusals(LINEAR_LOGPROBS.options, PRIMITIVE_MUTATIONS))
@deterministic(2)
@given(data=st.data())
def test_contract_linear_logprobs_refuses(culprit, bad, data):
    LINEAR_LOGPROBS.check(data, culprit, bad)


@deterministic(25)
@given(data=st.data())
def test_contract_linear_cross_entropy(data):
    LINEAR_CROSS_ENTROPY.check(data)


@pytest.mark.parametrize("culprit,bad",
                         _refusals(LINEAR_CROSS_ENTROPY.options, PRIMITIVE_MUTATIONS))
@deterministic(2)
@given(data=st.data())
def test_contract_linear_cross_entropy_refuses(culprit, bad, data):
    LINEAR_CROSS_ENTROPY.check(data, culprit, bad)


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
        kwargs = _draw_kwargs(data, self.all_options, culprit, bad, self.exclusive)
        call = _via(self.fn, self.module_cls, data, dict(kwargs, backend="torch"))
        inputs = dict(tensors, hidden=hidden, weight=weight, labels=labels)
        if culprit in self.all_mutations:
            named, mutate = self.all_mutations[culprit]
            inputs = mutate(inputs)
        hidden, weight, labels = (inputs.pop(k) for k in ("hidden", "weight", "labels"))
        if culprit is not None:
            named = named if culprit in self.all_mutations else culprit
            return _expect_refusal(lambda: call(hidden, weight, labels, **inputs), named)
        (h, w), (rh, rw) = _leaves(hidden, weight)
        out = call(h, w, labels, **inputs)
        assert all(torch.isfinite(v) for v in out.metrics.values()), out.metrics
        clean = {k: torch.where(_read(labels), v, 0.0) if v.dim() == 2 else v
                 for k, v in inputs.items()}
        if labels.shape[0] == 0:
            want = (rh.sum() + rw.sum()) * 0
        else:  # logits / τ = (h / τ)·Wᵀ: the naive objectives take no τ
            want = self.reference(rh / kwargs.get("temperature", 1.0), rw, labels, clean,
                                  kwargs)
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


def _sft_reference(hidden, weight, labels, inputs, kw):
    count = kw.get("num_items_in_batch")
    return naive.sft(hidden, weight, labels, inputs["ref_logprobs"],
                     divergence=kw.get("divergence", "total_variation"),
                     beta=kw.get("beta", 1.0), value_mode=kw.get("value_mode", "sequence"),
                     value_grad=kw.get("value_grad", False),
                     num_items=None if count is None else float(count),
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


WITH_REFERENCE = dict(mutations=REFERENCE_MUTATIONS, per_token=("ref_logprobs",))
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
}


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
def _model():
    from tests.objectives.models import tiny_model

    return tiny_model("llama")


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


@deterministic(3)
@given(data=st.data())
def test_contract_ift_loss(data):
    _check_ift(data)


@pytest.mark.parametrize("culprit,bad", _refusals(IFT_OPTIONS, {}))
@deterministic(1)
@given(data=st.data())
def test_contract_ift_loss_refuses(culprit, bad, data):
    _check_ift(data, culprit, bad)


# A temperature would multiply the model's own: only refusals of it are checked here.
LOGPROBS_OPTIONS = [Opt("temperature", (1.0,), TEMPERATURE.invalid), CHUNKS, IGNORE_INDEX]


@pytest.mark.parametrize("culprit,bad", [pytest.param(None, None, id="valid")]
                         + _refusals(LOGPROBS_OPTIONS, {}))
@deterministic(1)
@given(data=st.data())
def test_contract_token_logprobs(culprit, bad, data):
    from tests.objectives.models import lm_batch
    from tests.objectives.test_logprobs import naive_token_logprobs

    model = _model()
    input_ids, labels, mask = lm_batch(B=2, T=6, seed=data.draw(st.integers(0, 99)))
    kwargs = _draw_kwargs(data, LOGPROBS_OPTIONS, culprit, bad)
    call = functools.partial(token_logprobs, model, input_ids, labels, mask, backend="torch",
                             **kwargs)
    if culprit is not None:
        return _expect_refusal(call, culprit)
    got = call()
    assert torch.isfinite(got).all()
    assert_close(got, naive_token_logprobs(model, input_ids, labels, mask), F64, scale=100)
