"""linear_logprobs on both backends against the float64 materialised reference."""
import itertools

import pytest
import torch

from fused_losses import linear_logprobs
from fused_losses.reference import linear_logprobs_reference, reference_logits
from tests.helpers import BACKEND_PARAMS, assert_close, make_inputs

OUTPUTS = ("logprobs", "lse", "entropy", "logits_mean")


def dtypes(backend: str) -> list[torch.dtype]:
    """The input dtypes a backend takes: float64 only on the torch backend."""
    extra = [torch.float64] if backend == "torch" else []
    return extra + [torch.float32, torch.bfloat16, torch.float16]


FUSED_ONLY = ("chunk_size", "filter_eps", "deterministic")


def _reference(hidden, weight, targets, bias, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k not in FUSED_ONLY}
    leaves = [t.detach().double().requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    return leaves, linear_logprobs_reference(leaves[0], leaves[1], targets, leaves[2], **kwargs)


def _weighted_sum(out, upstream):
    """sum_k <output_k, g_k> over the outputs with an upstream gradient."""
    return sum((getattr(out, name).double() * g).sum() for name, g in upstream.items())


def check_against_reference(backend, dtype, hidden, weight, targets, bias, *, with_grads=OUTPUTS,
                            **kwargs):
    kwargs = dict(dict(return_lse=True, return_argmax=True, return_entropy=True,
                       return_logits_mean=True), **kwargs)
    out = linear_logprobs(hidden, weight, targets, bias, backend=backend, **kwargs)
    leaves, ref = _reference(hidden, weight, targets, bias, **kwargs)
    for name in OUTPUTS:
        if getattr(ref, name) is not None:
            got = getattr(out, name)
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert got.shape == targets.shape
            assert_close(got, getattr(ref, name), dtype, name=name)
    if out.argmax is not None:
        # Near-ties may resolve differently at low precision: the chosen token must be a max.
        logits = reference_logits(leaves[0].detach(), leaves[1].detach(),
                                  None if leaves[2] is None else leaves[2].detach(),
                                  temperature=kwargs.get("temperature", 1.0),
                                  softcap=kwargs.get("softcap"))
        valid = targets != -100
        assert (out.argmax[~valid] == -100).all()
        picked = logits.gather(-1, out.argmax.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logits_max = logits.max(-1).values
        assert_close(picked[valid], logits_max[valid], dtype, name="argmax logit")
    upstream = {name: torch.randn(targets.shape, dtype=torch.float64, device=targets.device)
                for name in with_grads}
    if not upstream:
        return
    params = [t for t in (hidden, weight, bias) if t is not None]
    ref_params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(_weighted_sum(out, upstream), params)
    ref_grads = torch.autograd.grad(_weighted_sum(ref, upstream), ref_params)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.isfinite(got).all()
        assert_close(got, want, dtype, scale=4.0, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", ["plain", "bias_temperature", "softcap", "everything"])
def test_matches_reference_per_dtype(backend, case):
    for dtype in dtypes(backend):
        hidden, weight, targets, bias = make_inputs(13, 37, 101, dtype,
                                                    bias=case in ("bias_temperature", "everything"))
        kwargs = {}
        if case in ("bias_temperature", "everything"):
            kwargs["temperature"] = 0.7
        if case in ("softcap", "everything"):
            kwargs["softcap"] = 2.5
        check_against_reference(backend, dtype, hidden, weight, targets, bias, **kwargs)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_every_combination_of_upstream_gradients(backend):
    """Each subset of {logprobs, lse, entropy, logits_mean} receiving a gradient."""
    for size in range(len(OUTPUTS) + 1):
        for subset in itertools.combinations(OUTPUTS, size):
            hidden, weight, targets, bias = make_inputs(9, 19, 67, torch.float32, bias=True)
            check_against_reference(backend, torch.float32, hidden, weight, targets, bias,
                                    with_grads=subset, softcap=3.0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_outputs_not_requested_are_none(backend):
    hidden, weight, targets, _ = make_inputs(5, 16, 33, torch.float32)
    out = linear_logprobs(hidden, weight, targets, backend=backend)
    assert out.lse is None and out.argmax is None and out.entropy is None
    assert out.logits_mean is None
    check_against_reference(backend, torch.float32, hidden, weight, targets, None,
                            return_lse=False, return_argmax=False, return_entropy=False,
                            return_logits_mean=False, with_grads=("logprobs",))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", [
    dict(n=7, h=37, v=1), dict(n=1, h=16, v=1001), dict(n=7, h=5, v=1001),
    dict(n=40, h=33, v=65), dict(lead=(2, 3, 5), h=17, v=50)],
    ids=["V=1", "one-token", "V-off-block", "many-token-tiles", "3d"])
def test_odd_shapes(backend, shape):
    lead = shape.get("lead") or (shape["n"],)
    hidden, weight, targets, bias = make_inputs(lead[0], shape["h"], shape["v"], torch.float32,
                                                bias=True, lead=lead)
    check_against_reference(backend, torch.float32, hidden, weight, targets, bias,
                            temperature=1.3)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_all_ignored_gives_zeros_and_zero_grads(backend):
    hidden, weight, targets, bias = make_inputs(6, 16, 40, torch.float32, bias=True)
    targets.fill_(-100)
    out = linear_logprobs(hidden, weight, targets, bias, backend=backend, return_lse=True,
                          return_entropy=True, return_argmax=True)
    assert (out.logprobs == 0).all() and (out.lse == 0).all() and (out.entropy == 0).all()
    assert (out.argmax == -100).all()
    (out.logprobs.sum() + out.lse.sum() + out.entropy.sum()).backward()
    for t in (hidden, weight, bias):
        assert t.grad is not None and (t.grad == 0).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_ignored_rows_get_zero_gradient_and_custom_ignore_index(backend):
    hidden, weight, targets, _ = make_inputs(10, 16, 40, torch.float32, ignore_index=7,
                                             ignore_frac=0.5)
    targets[0] = 7
    out = linear_logprobs(hidden, weight, targets, backend=backend, ignore_index=7)
    out.logprobs.sum().backward()
    ignored = targets == 7
    assert (out.logprobs[ignored] == 0).all()
    assert (hidden.grad[ignored] == 0).all()
    assert (hidden.grad[~ignored] != 0).any()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_deterministic_bitwise(backend):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        hidden, weight, targets, bias = make_inputs(21, 24, 130, torch.float32, bias=True)
        out = linear_logprobs(hidden, weight, targets, bias, backend=backend, return_lse=True,
                              return_entropy=True, deterministic=True)
        (out.logprobs.sum() + out.entropy.sum() * 0.3).backward()
        runs.append([out.logprobs, out.lse, hidden.grad, weight.grad, bias.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_gradient_filtering_is_opt_in(backend):
    hidden, weight, targets, _ = make_inputs(9, 16, 70, torch.float32)
    exact = linear_logprobs(hidden, weight, targets, backend=backend).logprobs
    g_exact = torch.autograd.grad(exact.sum(), (hidden, weight))
    filtered = linear_logprobs(hidden, weight, targets, backend=backend, filter_eps=0.0)
    g_zero_eps = torch.autograd.grad(filtered.logprobs.sum(), (hidden, weight))
    for a, b in zip(g_exact, g_zero_eps):
        torch.testing.assert_close(a, b)  # eps = 0 filters nothing
    everything = linear_logprobs(hidden, weight, targets, backend=backend,
                                 filter_eps=float("inf")).logprobs
    g_inf = torch.autograd.grad(everything.sum(), (hidden, weight))
    assert all((g == 0).all() for g in g_inf)  # every tile below an infinite threshold
