"""Bad input gets a clear error naming the argument, what came and what was expected."""
import pytest
import torch

from fused_losses import linear_cross_entropy, linear_logprobs
from tests.helpers import HAS_TRITON

V, H = 10, 8


def ok():
    return torch.randn(4, H), torch.randn(V, H), torch.randint(0, V, (4,))


@pytest.mark.parametrize("mutate, error, pattern", [
    (lambda h, w, t: (h[0], w, t), ValueError, r"targets .*expected shape \(\)"),
    (lambda h, w, t: (h, w[0], t), ValueError, r"weight .*expected shape \[V, H\]"),
    (lambda h, w, t: (h, torch.randn(V, H + 1), t), ValueError, r"weight .*\[V, 8\]"),
    (lambda h, w, t: (h, w, t[:3]), ValueError, r"targets .*expected shape \(4,\)"),
    (lambda h, w, t: (h, w, t.float()), TypeError, r"targets .*float32.*integer"),
    (lambda h, w, t: (h, w.double(), t), TypeError, r"weight .*float64 mixes only with float64"),
    (lambda h, w, t: (h, w.long(), t), TypeError, r"weight .*int64.*expected a floating"),
    (lambda h, w, t: (h.long(), w, t), TypeError, r"hidden .*int64.*floating"),
    (lambda h, w, t: (h, w, torch.tensor([0, 1, V, 2])), ValueError,
     r"targets .*outside \[0, 10\).*first: 10"),
    (lambda h, w, t: (h, w, torch.tensor([0, -5, 1, 2])), ValueError, r"first: -5"),
    (lambda h, w, t: (h, w, t.to("meta")), ValueError, r"targets .*device meta.*none"),
    (lambda h, w, t: (h.numpy(), w, t), TypeError, r"hidden must be a torch.Tensor"),
    (lambda h, w, t: (h, torch.randn(0, H), t), ValueError, r"V must be >= 1"),
    (lambda h, w, t: (h[:, :0], w[:, :0], t), ValueError, r"hidden .*H must be >= 1"),
    (lambda h, w, t: (h.to("meta"), w.to("meta"), t.to("meta")), ValueError,
     r"hidden .*device meta.*meta tensors have none"),
])
def test_bad_tensors(mutate, error, pattern):
    with pytest.raises(error, match=pattern):
        linear_logprobs(*mutate(*ok()))


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(temperature=-1.0), ValueError, "temperature must be a positive finite number"),
    (dict(temperature=0), ValueError, "temperature must be a positive finite number"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a positive finite"),
    (dict(temperature=True), TypeError, r"temperature must be .*True \(bool\)"),
    (dict(softcap=0.0), ValueError, r"softcap \(None for no soft-capping\) must be a positive"),
    (dict(softcap=float("inf")), ValueError, "softcap .* must be a positive finite number"),
    (dict(ignore_index=None), TypeError, r"ignore_index must be an int, got None"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'torch', 'triton'"),
    (dict(chunk_size=0), ValueError, "chunk_size must be None or a positive int"),
    (dict(chunk_size=True), ValueError, "chunk_size must be None or a positive int"),
    (dict(filter_eps=-1.0), ValueError, "filter_eps must be None or a number >= 0"),
])
def test_bad_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        linear_logprobs(*ok(), **kwargs)


@pytest.mark.parametrize("count, error, pattern", [
    (torch.tensor([3, 4]), ValueError, r"num_items_in_batch must be a positive count .*\(2,\)"),
    (0, ValueError, r"num_items_in_batch must be > 0, got 0"),
    (-5, ValueError, r"num_items_in_batch must be > 0, got -5"),
    (torch.tensor(0), ValueError, r"num_items_in_batch must be > 0, got 0"),
    (torch.tensor([-2.0]), ValueError, r"num_items_in_batch must be > 0, got -2.0"),
    (True, TypeError, r"num_items_in_batch must be a positive count .*\(bool\)"),
    ("8", TypeError, r"num_items_in_batch must be a positive count"),
])
def test_bad_num_items_in_batch(count, error, pattern):
    with pytest.raises(error, match=pattern):
        linear_cross_entropy(*ok(), num_items_in_batch=count)


def test_num_items_in_batch_as_a_one_element_tensor_gives_a_scalar():
    for count in (torch.tensor(4), torch.tensor([4])):
        loss = linear_cross_entropy(*ok(), num_items_in_batch=count)
        assert loss.shape == ()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_chunk_size_is_refused_on_the_triton_backend():
    with pytest.raises(ValueError, match="chunk_size=4 .* option of backend='torch'"):
        linear_logprobs(*ok(), backend="triton", chunk_size=4)


def test_bad_bias():
    h, w, t = ok()
    with pytest.raises(ValueError, match=r"bias .*expected shape \[10\]"):
        linear_logprobs(h, w, t, torch.randn(V + 1))
    with pytest.raises(TypeError, match=r"bias .*float64 mixes only with float64"):
        linear_logprobs(h, w, t, torch.randn(V, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"bias .*int64.*expected a floating dtype"):
        linear_logprobs(h, w, t, torch.zeros(V, dtype=torch.int64))


def test_ignore_index_is_not_out_of_range():
    h, w, t = ok()
    t[1] = -100
    linear_logprobs(h, w, t)  # no error


# ---------------------------------------------------------------------------------------------
# Objectives (owner: objectives): every numeric option refuses inf, NaN and bools, every bool
# option refuses non-bools, each error naming the option.
# ---------------------------------------------------------------------------------------------

from fused_losses import (FusedDPOLoss, cpo_loss, dil_loss, dpo_loss, ift_loss,  # noqa: E402
                          orpo_loss, reinforce_loss, sft_loss, simpo_loss)

NUMERIC_OPTIONS = [
    (sft_loss, "beta", {}), (sft_loss, "max_weight", {}), (sft_loss, "num_items_in_batch", {}),
    (dpo_loss, "beta", {}), (dpo_loss, "label_smoothing", {}), (dpo_loss, "rpo_alpha", {}),
    (dpo_loss, "discopop_tau", {}), (dpo_loss, "bco_delta", dict(loss_type="bco_pair")),
    (dpo_loss, "bco_count", dict(loss_type="bco_pair")),
    (simpo_loss, "beta", {}), (simpo_loss, "gamma", {}), (simpo_loss, "simpo_gamma", {}),
    (simpo_loss, "label_smoothing", {}), (orpo_loss, "lam", {}), (orpo_loss, "beta", {}),
    (cpo_loss, "beta", {}), (cpo_loss, "alpha", {}), (cpo_loss, "cpo_alpha", {}),
    (cpo_loss, "label_smoothing", {}), (dil_loss, "beta", {}), (dil_loss, "max_log_ratio", {}),
    (reinforce_loss, "gamma", {}), (reinforce_loss, "kl_coef", {}),
]
BOOL_OPTIONS = [(sft_loss, "value_grad"), (dpo_loss, "average_log_prob"),
                (cpo_loss, "average_log_prob"), (dil_loss, "average_log_prob"),
                (reinforce_loss, "whiten")]


def _objective_inputs(fn):
    """Small float64 inputs for ``fn``: a preference batch (2 pairs) and a reference."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 5, H, dtype=torch.float64, generator=g)
    weight = torch.randn(V, H, dtype=torch.float64, generator=g)
    labels = torch.randint(0, V, (4, 5), generator=g)
    labels[:, :2] = -100
    extra = {"ref_logprobs": torch.zeros(4, 5, dtype=torch.float64)}
    if fn is reinforce_loss:
        extra = {"rewards": torch.zeros(4, 5, dtype=torch.float64)}
    elif fn in (simpo_loss, orpo_loss, cpo_loss) or fn is sft_loss:
        extra = {}
    return (hidden, weight, labels), extra


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), True],
                         ids=["inf", "nan", "bool"])
@pytest.mark.parametrize("fn,name,context", NUMERIC_OPTIONS,
                         ids=[f"{fn.__name__}-{name}" for fn, name, _ in NUMERIC_OPTIONS])
def test_objective_numeric_options_refuse_inf_nan_bool(fn, name, context, bad):
    args, extra = _objective_inputs(fn)
    with pytest.raises(ValueError, match=rf"^{name} must be "):
        fn(*args, **extra, **context, **{name: bad}, backend="torch")


@pytest.mark.parametrize("fn,name", BOOL_OPTIONS, ids=[f"{f.__name__}-{n}" for f, n in BOOL_OPTIONS])
def test_objective_bool_options_refuse_other_values(fn, name):
    args, extra = _objective_inputs(fn)
    with pytest.raises(TypeError, match=rf"^{name} must be a bool"):
        fn(*args, **extra, **{name: 1}, backend="torch")


@pytest.mark.parametrize("count, pattern", [
    (0, "positive finite count"), (-5, "positive finite count"), (2.5e-400, "positive"),
    (torch.tensor(0), "positive finite count"), (torch.tensor([3, 4]), r"shape \(2,\)"),
    (torch.tensor(True), "dtype torch.bool"), ("7", "positive finite count")])
def test_num_items_in_batch_is_a_positive_count(count, pattern):
    """Was NaN/inf (0), a negative loss (-5) or an internal error ([2])."""
    args, _ = _objective_inputs(sft_loss)
    with pytest.raises(ValueError, match=f"num_items_in_batch must be .*{pattern}"):
        sft_loss(*args, num_items_in_batch=count, backend="torch")


def test_bco_module_takes_a_delta_per_call():
    """Was an internal error: bco_delta given twice to dpo_loss."""
    args, extra = _objective_inputs(dpo_loss)
    out = FusedDPOLoss(loss_type="bco_pair", backend="torch")(*args, **extra, bco_delta=0.2)
    assert torch.isfinite(out.loss)


def test_preference_loss_of_an_empty_batch_is_zero():
    """dpo_loss with B = 0 was NaN; now 0, as sft_loss."""
    (hidden, weight, labels), extra = _objective_inputs(dpo_loss)
    out = dpo_loss(hidden[:0], weight, labels[:0], ref_logprobs=extra["ref_logprobs"][:0],
                   backend="torch")
    assert float(out.loss) == 0.0


@pytest.mark.parametrize("name, bad", [("lam", float("nan")), ("gamma", float("inf")),
                                       ("eps", True), ("detach_weights", 1),
                                       ("train_embeddings", "yes")])
def test_ift_options_are_checked_before_the_model_runs(name, bad):
    model = torch.nn.Linear(2, 2)  # never reached: the options are checked first
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises((ValueError, TypeError), match=rf"^{name} must be"):
        ift_loss(model, ids, ids, **{name: bad})
