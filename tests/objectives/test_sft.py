"""f-divergence SFT against the naive float64 reference on materialised logits."""
import math

import pytest
import torch
import torch.nn.functional as F

from fused_losses.objectives import DIVERGENCES, phi_safe, sft_loss
from tests.helpers import HAS_TRITON, assert_close
from tests.objectives import naive
from tests.objectives.naive import batch, grads

F64 = torch.float64
TORCH = dict(backend="torch")


def _check(out_loss, expected, hidden, weight, bias=None, scale=1.0):
    assert_close(out_loss, expected, F64, scale=scale, name="loss")
    for got, want, name in zip(grads(out_loss, hidden, weight, bias),
                               grads(expected, hidden, weight, bias), ("dH", "dW", "db")):
        assert_close(got, want, F64, scale=scale, name=name)


@pytest.mark.parametrize("value_mode", ["sequence", "token"])
def test_total_variation_is_cross_entropy(value_mode):
    """Both modes divide by the scored tokens: TV with β = 1 is F.cross_entropy."""
    hidden, weight, labels, bias = batch(bias=True)
    out = sft_loss(hidden, weight, labels, bias=bias, value_mode=value_mode, **TORCH)
    z = naive.logits_of(hidden, weight, bias)[:, :-1]
    expected = F.cross_entropy(z.reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1))
    _check(out.loss, expected, hidden, weight, bias)
    assert_close(out.metrics["nll"], expected.detach(), F64, name="nll")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("divergence,value_mode", [("total_variation", "token"),
                                                   ("kl", "sequence")])
def test_triton_interpreter_float32(divergence, value_mode):
    """The Triton kernels (interpreted on CPU) through the loss, lse gradients included."""
    hidden, weight, labels, _ = batch(rows=2, T=5, H=16, V=33)
    ref = _ref_near(hidden, weight, labels)
    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    out = sft_loss(h32, w32, labels, ref_logprobs=ref.float(), divergence=divergence,
                   value_mode=value_mode, value_grad=True, backend="triton")
    expected = naive.sft(hidden, weight, labels, ref, divergence=divergence,
                         value_mode=value_mode, value_grad=True)
    assert_close(out.loss, expected, torch.float32, name="loss")
    dh, dw = torch.autograd.grad(out.loss, (h32, w32))
    eh, ew = torch.autograd.grad(expected, (hidden, weight))
    assert_close(dh, eh, torch.float32, name="dH")
    assert_close(dw, ew, torch.float32, name="dW")


def _ref_near(hidden, weight, labels, spread=0.5, seed=0):
    """Reference log-probs = policy's ± noise: some u inside each domain, some outside."""
    logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)
    g = torch.Generator().manual_seed(seed)
    return (logps + spread * torch.randn(logps.shape, generator=g, dtype=F64)) * mask


@pytest.mark.parametrize("value_grad", [False, True])
@pytest.mark.parametrize("value_mode", ["token", "sequence"])
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_divergences_match_naive(divergence, value_mode, value_grad):
    hidden, weight, labels, _ = batch()
    ref = _ref_near(hidden, weight, labels)
    beta = 0.7
    out = sft_loss(hidden, weight, labels, ref_logprobs=ref, divergence=divergence,
                   beta=beta, value_mode=value_mode, value_grad=value_grad, **TORCH)
    expected = naive.sft(hidden, weight, labels, ref, divergence=divergence, beta=beta,
                         value_mode=value_mode, value_grad=value_grad)
    _check(out.loss, expected, hidden, weight, scale=10)


def test_sequence_mode_last_label_at_final_column():
    """No padding: the last scored label sits in column T-1, whose hidden state has no
    target at all; the loss must still use that position's lse."""
    hidden, weight, labels, _ = batch(rows=2)
    labels[:, -1] = torch.tensor([3, 5])
    ref = _ref_near(hidden, weight, labels)
    out = sft_loss(hidden, weight, labels, ref_logprobs=ref, divergence="kl",
                   value_mode="sequence", value_grad=True, **TORCH)
    expected = naive.sft(hidden, weight, labels, ref, divergence="kl", value_mode="sequence",
                         value_grad=True)
    _check(out.loss, expected, hidden, weight, scale=10)


@pytest.mark.parametrize("value_mode", ["token", "sequence"])
def test_num_items_in_batch_divides_the_sum(value_mode):
    hidden, weight, labels, _ = batch()
    ref = _ref_near(hidden, weight, labels)
    out = sft_loss(hidden, weight, labels, ref_logprobs=ref, divergence="pearson_chi2",
                   value_mode=value_mode, num_items_in_batch=37, **TORCH)
    expected = naive.sft(hidden, weight, labels, ref, divergence="pearson_chi2",
                         value_mode=value_mode, num_items=37)
    _check(out.loss, expected, hidden, weight)


def test_reference_from_hidden_equals_precomputed():
    hidden, weight, labels, _ = batch()
    ref_hidden = torch.randn_like(hidden.detach())
    ref_weight = torch.randn_like(weight.detach())
    ref = naive.labels_logps(ref_hidden, ref_weight, labels)[0]
    a = sft_loss(hidden, weight, labels, ref_logprobs=ref, divergence="jensen_shannon",
                 **TORCH)
    b = sft_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                 divergence="jensen_shannon", **TORCH)
    assert_close(a.loss, b.loss.detach(), F64, name="loss")


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_guards_are_finite_far_outside_domains(divergence):
    u = torch.cat([-torch.logspace(-6, 4, 60, dtype=F64), torch.zeros(1, dtype=F64),
                   torch.logspace(-6, 4, 60, dtype=F64)]).requires_grad_()
    value, guarded = phi_safe(divergence, u)
    (grad,) = torch.autograd.grad(value.sum(), u)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    cut = naive.cutoff(divergence, 10.0)
    if cut is not None:  # C¹ at the cut-off: value and slope agree from both sides
        assert bool(guarded[u.argmin()]) and not bool(guarded[u.argmax()])
        pts = torch.tensor([cut - 1e-7, cut + 1e-7], dtype=F64, requires_grad=True)
        v, _ = phi_safe(divergence, pts)
        (g,) = torch.autograd.grad(v.sum(), pts)
        v = v.detach()
        slope = max(1.0, abs(float(g[0])))
        assert abs(float(v[1] - v[0])) < 1e-5 * slope
        assert abs(float(g[1] - g[0])) < 1e-4 * slope
    inside = u.detach()[~guarded] if cut is not None else u.detach()
    want = torch.stack([torch.as_tensor(naive._phi(divergence, float(x)), dtype=F64)
                        for x in inside[inside > -50]])
    assert_close(phi_safe(divergence, inside[inside > -50])[0], want, F64, scale=1e3,
                 name="phi")


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_sft_finite_for_extreme_references(divergence):
    hidden, weight, labels, _ = batch()
    for ref_value in (-1e3, 1e3):
        ref = torch.full(labels.shape, ref_value, dtype=F64)
        for mode in ("token", "sequence"):
            out = sft_loss(hidden, weight, labels, ref_logprobs=ref, divergence=divergence,
                           value_mode=mode, value_grad=True, **TORCH)
            dh, dw = grads(out.loss, hidden, weight)
            assert torch.isfinite(out.loss) and torch.isfinite(dh).all() \
                and torch.isfinite(dw).all()
            assert all(torch.isfinite(v) for v in out.metrics.values())


def test_guard_metric_reports_the_linear_extension():
    hidden, weight, labels, _ = batch()
    ref = torch.full(labels.shape, 1e3, dtype=F64)  # ρ ≪ 0: every u below the cut-off
    out = sft_loss(hidden, weight, labels, ref_logprobs=ref, divergence="reverse_kl",
                   **TORCH)
    assert float(out.metrics["guard/fraction"]) == 1.0
    out = sft_loss(hidden, weight, labels, ref_logprobs=-ref, divergence="reverse_kl",
                   **TORCH)
    assert float(out.metrics["guard/fraction"]) == 0.0


def test_all_ignored_gives_zero_not_nan():
    hidden, weight, labels, _ = batch()
    labels[:] = -100
    for divergence in ("total_variation", "kl"):
        out = sft_loss(hidden, weight, labels, ref_logprobs=torch.zeros(labels.shape),
                       divergence=divergence, **TORCH)
        assert float(out.loss.detach()) == 0.0
        dh, dw = grads(out.loss, hidden, weight)
        assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


def test_bad_inputs_are_clear_errors():
    hidden, weight, labels, _ = batch()
    with pytest.raises(ValueError, match="divergence must be one of .*'gan'.*'kl'"):
        sft_loss(hidden, weight, labels, divergence="kld", **TORCH)
    with pytest.raises(ValueError, match="value_mode must be one of"):
        sft_loss(hidden, weight, labels, value_mode="seq", **TORCH)
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        sft_loss(hidden, weight, labels, beta=0.0, **TORCH)
    with pytest.raises(ValueError, match="needs a reference"):
        sft_loss(hidden, weight, labels, divergence="kl", **TORCH)
    with pytest.raises(ValueError, match="ref_logprobs must have the shape of labels"):
        sft_loss(hidden, weight, labels, divergence="kl",
                 ref_logprobs=torch.zeros(labels.shape[0], labels.shape[1] + 1), **TORCH)
    with pytest.raises(ValueError, match="hidden must have shape"):
        sft_loss(hidden[:, :-1], weight, labels, **TORCH)
    assert math.isfinite(float(sft_loss(hidden, weight, labels, **TORCH).loss.detach()))


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be a positive finite"),
    (dict(num_items_in_batch=-5), ValueError, "num_items_in_batch must be a positive finite"),
    (dict(num_items_in_batch=torch.tensor(0)), ValueError, "num_items_in_batch must be a pos"),
    (dict(num_items_in_batch=float("inf")), ValueError, "num_items_in_batch must be a posit"),
    (dict(num_items_in_batch=True), ValueError, "num_items_in_batch must be a positive"),
    (dict(num_items_in_batch=torch.tensor([3, 4])), ValueError,
     r"num_items_in_batch must be a number or a one-element real tensor, got a tensor of "
     r"shape \(2,\)"),
    (dict(beta=float("inf")), ValueError, "beta must be a positive finite number, got inf"),
    (dict(beta=float("nan")), ValueError, "beta must be a positive finite number, got nan"),
    (dict(beta=True), ValueError, "beta must be a positive finite number, got True"),
    (dict(max_weight=0.0), ValueError, "max_weight must be a positive finite number"),
    (dict(value_grad="yes"), TypeError, "value_grad must be a bool"),
    (dict(value_mode=None), ValueError, "value_mode must be one of"),
    (dict(eps=0.1), TypeError, r"sft_loss\(\) got an unexpected keyword argument 'eps'"),
    (dict(betta=0.1), TypeError, r"sft_loss\(\) got an unexpected keyword argument 'betta'; "
                                 r"did you mean 'beta'\?"),
    (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
])
def test_bad_options_are_clear_errors(kwargs, error, pattern):
    hidden, weight, labels, _ = batch()
    with pytest.raises(error, match=pattern):
        sft_loss(hidden, weight, labels, **kwargs, **TORCH)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "squared_hellinger", "gan",
                                        "jensen_shannon"])
def test_guard_options_match_naive(divergence):
    hidden, weight, labels, _ = batch()
    ref = _ref_near(hidden, weight, labels, spread=2.0)
    for value_mode in ("sequence", "token"):
        out = sft_loss(hidden, weight, labels, ref_logprobs=ref, divergence=divergence,
                       max_weight=3.0, value_mode=value_mode, **TORCH)
        expected = naive.sft(hidden, weight, labels, ref, divergence=divergence,
                             max_weight=3.0, value_mode=value_mode)
        _check(out.loss, expected, hidden, weight, scale=10)


@pytest.mark.parametrize("max_weight", [0.5, 3.0, 10.0, 100.0])
@pytest.mark.parametrize("divergence", sorted(set(DIVERGENCES) - {"total_variation",
                                                                  "pearson_chi2"}))
def test_max_weight_caps_every_divergence(divergence, max_weight):
    """One knob: below u_c, where φ'(u_c) = max_weight, φ is its tangent, so no term's
    weight φ'(u) exceeds max_weight, for every divergence with an unbounded weight."""
    u = torch.linspace(-30, 30, 6001, dtype=F64, requires_grad=True)
    value, guarded = phi_safe(divergence, u, max_weight=max_weight)
    (weight,) = torch.autograd.grad(value.sum(), u)
    assert float(weight.max()) <= max_weight * (1 + 1e-9)
    cut = naive.cutoff(divergence, max_weight)
    below = u.detach() < cut
    assert torch.equal(guarded, below)
    torch.testing.assert_close(weight[below], torch.full_like(weight[below], max_weight))
    assert_close(torch.tensor(naive._dphi(divergence, cut), dtype=F64),
                 torch.tensor(max_weight, dtype=F64), F64, name="φ'(u_c)")


def test_token_rewards_telescope_to_the_sequence_reward():
    """Lemma 1 per step: Σ_t u_t = u when the response has no holes. TV is linear, so with
    value_grad (the values kept) the token-mode loss equals the sequence-mode loss."""
    hidden, weight, labels, _ = batch(rows=3, T=6)
    kw = dict(value_grad=True, beta=0.7, **TORCH)
    token = sft_loss(hidden, weight, labels, value_mode="token", **kw).loss
    sequence = sft_loss(hidden, weight, labels, value_mode="sequence", **kw).loss
    _check(token, sequence, hidden, weight)
    plain = sft_loss(hidden, weight, labels, **TORCH).loss  # values off: CE
    assert abs(float((token - plain).detach())) > 1e-3  # the values do enter


def test_empty_batch_is_zero():
    hidden, weight, labels, _ = batch()
    for divergence in ("total_variation", "kl"):
        out = sft_loss(hidden[:0], weight, labels[:0], divergence=divergence,
                       ref_logprobs=torch.zeros(0, labels.shape[1], dtype=F64), **TORCH)
        assert float(out.loss.detach()) == 0.0
        assert all(float(v) == 0.0 for v in out.metrics.values())


def test_primitive_options_pass_through():
    """temperature and softcap reach the primitive: TV equals cross-entropy on the
    tempered, soft-capped logits."""
    hidden, weight, labels, _ = batch()
    out = sft_loss(hidden, weight, labels, temperature=1.7, softcap=2.5, **TORCH)
    z = naive.logits_of(hidden, weight)[:, :-1] / 1.7
    z = 2.5 * torch.tanh(z / 2.5)
    expected = F.cross_entropy(z.reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1))
    _check(out.loss, expected, hidden, weight)


def test_num_items_in_batch_makes_accumulation_exact():
    """Two micro-batches, each divided by the whole batch's token count (a tensor), sum to
    the full batch's loss and gradients."""
    hidden, weight, labels, _ = batch(rows=4)
    ref = _ref_near(hidden, weight, labels)
    kw = dict(divergence="jensen_shannon", **TORCH)
    full = sft_loss(hidden, weight, labels, ref_logprobs=ref, **kw).loss
    count = (labels[:, 1:] != -100).sum()
    parts = [sft_loss(hidden[i:i + 2], weight, labels[i:i + 2], ref_logprobs=ref[i:i + 2],
                      num_items_in_batch=count, **kw).loss for i in (0, 2)]
    _check(parts[0] + parts[1], full, hidden, weight)
