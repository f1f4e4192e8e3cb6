"""Every objective's two paths agree: gradients formed in forward over chunks of whole
groups (the torch backend's default) and the recompute path (``grad_in_forward=False``), in
loss, metrics and every input gradient, float64. Small chunks so that several occur."""
import pytest
import torch

from fused_losses import (cpo_loss, dil_loss, dpo_loss, ift_loss, orpo_loss, reinforce_loss,
                          sft_loss, simpo_loss)
from fused_losses.objectives import DIL_LOSSES, DPO_LOSSES, _common
from tests.helpers import assert_close
from tests.objectives import naive
from tests.objectives.models import lm_batch, tiny_model
from tests.objectives.naive import batch

F64 = torch.float64


@pytest.fixture
def paths(monkeypatch):
    """Counts the calls of each path's primitive entry point."""
    calls = {"grad_in_forward": 0, "recompute": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(_common, "linear_logprobs_loss",
                        counted("grad_in_forward", _common.linear_logprobs_loss))
    monkeypatch.setattr(_common, "linear_logprobs", counted("recompute", _common.linear_logprobs))
    return calls


def _ref(hidden, weight, labels, spread=0.3):
    logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)
    g = torch.Generator().manual_seed(7)
    return (logps + spread * torch.randn(logps.shape, generator=g, dtype=F64)) * mask


def _run(loss_fn, tensors, kwargs, grad_in_forward):
    out = loss_fn(*tensors, **kwargs, backend="torch", grad_in_forward=grad_in_forward)
    leaves = [t for t in tensors + (kwargs.get("bias"),)
              if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out.loss, leaves)


def _compare(loss_fn, tensors, kwargs, paths, *, expect_fused=True):
    fused, fused_grads = _run(loss_fn, tensors, kwargs, None)  # the default
    assert paths["grad_in_forward"] == int(expect_fused)
    plain, plain_grads = _run(loss_fn, tensors, kwargs, False)
    assert_close(fused.loss, plain.loss, F64, name="loss")
    assert sorted(fused.metrics) == sorted(plain.metrics)
    for name in plain.metrics:
        assert_close(fused.metrics[name], plain.metrics[name], F64, name=name)
        assert not fused.metrics[name].requires_grad, name
    for i, (got, want) in enumerate(zip(fused_grads, plain_grads)):
        assert_close(got, want, F64, scale=10, name=f"grad {i}")


def _pairs(B=3, bias=False, empty_pair=False):
    hidden, weight, labels, b = batch(rows=2 * B, bias=bias)
    if empty_pair:  # pair 1 has no scored token: a constant term on both paths
        labels[1], labels[1 + B] = -100, -100
    return hidden, weight, labels, b


CHUNKS = [3, 20]  # 3: a chunk per group; 20: several sequences (or pairs) per chunk
DPO_CASES = [dict(loss_type=t) for t in sorted(DPO_LOSSES) if t != "bco_pair"] + [
    dict(loss_type="sigmoid", average_log_prob=True, rpo_alpha=0.5, label_smoothing=0.1),
    dict(loss_type="ipo", beta=0.5, return_argmax=True, return_entropy=True)]


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("case", DPO_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_dpo(case, chunk_size, paths):
    hidden, weight, labels, _ = _pairs()
    kwargs = dict(case, ref_logprobs=_ref(hidden, weight, labels), chunk_size=chunk_size)
    _compare(dpo_loss, (hidden, weight, labels), kwargs, paths)


def test_dpo_bias_and_a_pair_without_scored_tokens(paths):
    hidden, weight, labels, bias = _pairs(bias=True, empty_pair=True)
    kwargs = dict(ref_logprobs=_ref(hidden, weight, labels), bias=bias, chunk_size=3)
    _compare(dpo_loss, (hidden, weight, labels), kwargs, paths)


def test_bco_pair_recomputes(paths):
    """δ is a mean over the whole batch: not additive over pairs, so no gradient in forward."""
    hidden, weight, labels, _ = _pairs()
    kwargs = dict(loss_type="bco_pair", ref_logprobs=_ref(hidden, weight, labels),
                  bco_delta=0.2, bco_count=3, chunk_size=3)
    _compare(dpo_loss, (hidden, weight, labels), kwargs, paths, expect_fused=False)
    dpo_loss(hidden, weight, labels, **kwargs, backend="torch", grad_in_forward=True)
    assert paths["grad_in_forward"] == 0  # even when asked for


@pytest.mark.parametrize("loss_fn,case", [
    (simpo_loss, {}), (simpo_loss, dict(label_smoothing=0.2, gamma=1.0)),
    (orpo_loss, {}), (orpo_loss, dict(lam=0.5, return_argmax=True)),
    (cpo_loss, {}), (cpo_loss, dict(alpha=0.0, average_log_prob=True, label_smoothing=0.1))],
    ids=["simpo", "simpo-smoothed", "orpo", "orpo-argmax", "cpo", "cpo-averaged"])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_reference_free(loss_fn, case, chunk_size, paths):
    hidden, weight, labels, _ = _pairs(empty_pair=chunk_size == 3)
    _compare(loss_fn, (hidden, weight, labels), dict(case, chunk_size=chunk_size), paths)


@pytest.mark.parametrize("case", [dict(variant=v) for v in sorted(DIL_LOSSES)]
                         + [dict(variant="lsif", max_log_ratio=0.1, average_log_prob=False)],
                         ids=lambda c: "-".join(map(str, c.values())))
def test_dil(case, paths):
    hidden, weight, labels, _ = _pairs()
    kwargs = dict(case, ref_logprobs=_ref(hidden, weight, labels), chunk_size=3)
    _compare(dil_loss, (hidden, weight, labels), kwargs, paths)


@pytest.mark.parametrize("case", [
    dict(), dict(divergence="kl"), dict(divergence="jensen_shannon", value_grad=True),
    dict(divergence="reverse_kl", value_mode="token"),
    dict(divergence="squared_hellinger", value_mode="token", value_grad=True),
    dict(divergence="pearson_chi2", value_mode="sequence", value_grad=True,
         num_items_in_batch=11),
    dict(divergence="total_variation", value_mode="sequence", value_grad=True, beta=0.5)],
    ids=lambda c: "-".join(map(str, c.values())) or "plain")
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_sft(case, chunk_size, paths):
    hidden, weight, labels, bias = batch(rows=4, bias=True)
    labels[2] = -100  # a sequence without scored tokens
    kwargs = dict(case, bias=bias, chunk_size=chunk_size, return_entropy=True)
    if case.get("divergence", "total_variation") != "total_variation":
        kwargs["ref_logprobs"] = _ref(hidden, weight, labels, spread=0.5)
    _compare(sft_loss, (hidden, weight, labels), kwargs, paths)


@pytest.mark.parametrize("gamma,whiten,kl_coef", [(1.0, False, 0.0), (0.9, True, 0.0),
                                                  (0.8, False, 0.3)])
def test_reinforce(gamma, whiten, kl_coef, paths):
    hidden, weight, labels, _ = batch(rows=4)
    g = torch.Generator().manual_seed(3)
    kwargs = dict(rewards=torch.randn(labels.shape, generator=g, dtype=F64), gamma=gamma,
                  whiten=whiten, kl_coef=kl_coef, chunk_size=3)
    if kl_coef:
        kwargs["init_logprobs"] = _ref(hidden, weight, labels)
    _compare(reinforce_loss, (hidden, weight, labels), kwargs, paths)


def test_reinforce_whitened_kl_recomputes(paths):
    """Whitening returns that hold every sequence's k1 couples the sequences."""
    hidden, weight, labels, _ = batch(rows=4)
    kwargs = dict(rewards=torch.randn(labels.shape, dtype=F64), whiten=True, kl_coef=0.1,
                  init_logprobs=_ref(hidden, weight, labels), chunk_size=3)
    _compare(reinforce_loss, (hidden, weight, labels), kwargs, paths, expect_fused=False)


@pytest.mark.parametrize("gamma,detach", [(0.95, False), (0.0, False), (0.5, True)])
def test_ift(gamma, detach, paths):
    model = tiny_model("llama")
    input_ids, labels, attention_mask = lm_batch()
    params = [model.get_output_embeddings().weight,
              model.get_decoder().layers[0].self_attn.q_proj.weight]

    def run(grad_in_forward):
        out = ift_loss(model, input_ids, labels, attention_mask=attention_mask, gamma=gamma,
                       detach_weights=detach, backend="torch", chunk_size=3,
                       grad_in_forward=grad_in_forward)
        return out, torch.autograd.grad(out.loss, params)

    (fused, fused_grads), (plain, plain_grads) = run(None), run(False)
    assert paths["grad_in_forward"] == 1
    assert_close(fused.loss, plain.loss, F64, name="loss")
    for name in plain.metrics:
        assert_close(fused.metrics[name], plain.metrics[name], F64, name=name)
    for got, want in zip(fused_grads, plain_grads):
        assert_close(got, want, F64, scale=10, name="grad")


def test_no_gradient_needed_recomputes(paths):
    hidden, weight, labels, _ = _pairs()
    ref = _ref(hidden, weight, labels)
    with torch.no_grad():
        dpo_loss(hidden, weight, labels, ref_logprobs=ref, backend="torch")
    assert paths == {"grad_in_forward": 0, "recompute": 1}


def test_grad_in_forward_must_be_a_bool():
    hidden, weight, labels, _ = _pairs()
    with pytest.raises(TypeError, match="grad_in_forward must be None or a bool"):
        simpo_loss(hidden, weight, labels, backend="torch", grad_in_forward="yes")


@pytest.mark.parametrize("case,one_pass", [
    (dict(), True), (dict(value_mode="token", beta=0.5), True),
    (dict(num_items_in_batch=5), True),
    (dict(value_grad=True), False),  # lse(s_0) − lse(s_T) spans the sequence
    (dict(divergence="kl"), False)],  # φ is not linear: a sequence's u is needed whole
    ids=["plain", "token-beta", "num_items", "value_grad", "kl"])
def test_sft_one_pass_for_a_sequence_longer_than_the_budget(case, one_pass, monkeypatch):
    """Plain SFT (φ(u) = u, no value terms) is a sum over tokens: its chunks need not hold
    whole sequences, so one sequence far longer than the one-pass budget keeps the one pass
    (3 matmuls) instead of forward then backward (4). Equal to cross-entropy on
    materialised float64 logits."""
    from fused_losses.backends import torch_chunked
    calls = {"one_pass": 0, "backward": 0}
    for name, key in (("forward_backward", "one_pass"), ("backward", "backward")):
        original = getattr(torch_chunked, name)
        monkeypatch.setattr(torch_chunked, name, lambda *a, _f=original, _k=key, **k:
                            calls.__setitem__(_k, calls[_k] + 1) or _f(*a, **k))
    monkeypatch.setattr(torch_chunked, "ONE_PASS_BYTES", 4 * 41 * 3)  # 3 rows of V = 41
    hidden, weight, labels, bias = batch(rows=1, T=23, V=41, bias=True)
    labels[0, :3] = -100  # a prompt
    kwargs = dict(case, bias=bias, chunk_size=4)
    if "divergence" in case:
        kwargs["ref_logprobs"] = _ref(hidden, weight, labels)
    out = sft_loss(hidden, weight, labels, **kwargs, backend="torch")
    assert calls == ({"one_pass": 1, "backward": 0} if one_pass
                     else {"one_pass": 0, "backward": 1})
    if not one_pass:
        return  # the path is the point here; test_sft.py checks these values
    logits = naive.logits_of(hidden, weight, bias)[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 41), labels[:, 1:].reshape(-1),
                                            reduction="sum")
    want = case.get("beta", 1.0) * nll / case.get("num_items_in_batch", int((labels != -100)
                                                                             .sum()))
    assert_close(out.loss, want, F64, name="loss")
    for got, expected in zip(torch.autograd.grad(out.loss, (hidden, weight, bias)),
                             torch.autograd.grad(want, (hidden, weight, bias))):
        assert_close(got, expected, F64, scale=10, name="grad")
