"""The registry and dispatcher: names, "auto" per device, and the interface each backend has."""
import inspect

import pytest
import torch

import fused_losses
from fused_losses import backends
from tests.helpers import BACKEND_PARAMS

# The interface's keywords (fused_losses.backends' docstring); a backend may add OPTIONS.
FORWARD = {"temperature", "softcap", "with_argmax", "with_entropy", "with_logits_mean"}
BACKWARD = {"need_hidden", "need_weight", "need_bias", "temperature", "softcap", "filter_eps"}
FORWARD_BACKWARD = FORWARD | BACKWARD | {"boundaries"}


def test_backends_are_exported_with_auto_first():
    assert fused_losses.BACKENDS == backends.BACKENDS
    assert backends.BACKENDS[0] == "auto"
    assert set(backends.BACKENDS[1:]) == set(backends._REGISTRY)
    assert backends.CUDA_DEFAULT in backends._REGISTRY


def test_auto_is_torch_on_cpu_and_triton_needs_cuda_or_the_interpreter(monkeypatch):
    torch_chunked = backends.resolve_backend("torch", torch.device("cpu"))
    assert backends.resolve_backend("auto", torch.device("cpu")) is torch_chunked
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name, entry in backends._REGISTRY.items():
        if entry.triton:
            with pytest.raises(ValueError, match=f"backend='{name}' needs CUDA tensors"):
                backends.resolve_backend(name, torch.device("cpu"))


def test_auto_on_cuda_is_the_cuda_default_and_torch_without_triton(monkeypatch):
    """Resolution only (no CUDA tensor is made): the default the notes' predictions chose."""
    cuda = torch.device("cuda")
    assert backends.resolve_backend("auto", cuda) is backends._load(backends.CUDA_DEFAULT)

    def no_triton(name):
        if backends._REGISTRY[name].triton:
            raise ImportError("no module named 'triton'")
        return load(name)

    load = backends._load
    monkeypatch.setattr(backends, "_load", no_triton)
    assert backends.resolve_backend("auto", cuda) is load("torch")


@pytest.mark.parametrize("name", ["cuda", "Torch", None, 3])
def test_unknown_names_list_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch'"):
        backends.resolve_backend(name, torch.device("cpu"))


@pytest.mark.parametrize("name", BACKEND_PARAMS)
def test_every_backend_has_the_interface(name):
    module = backends.resolve_backend(name, torch.device("cpu"))
    assert module.NAME == name

    def keywords(fn):
        params = inspect.signature(fn).parameters.values()
        assert all(p.default is not p.empty for p in params if p.kind is p.KEYWORD_ONLY)
        return {p.name for p in params if p.kind is p.KEYWORD_ONLY}

    # launchers may add keywords of their own (a block config for tests), never required
    assert keywords(module.forward) >= FORWARD | module.OPTIONS
    assert keywords(module.backward) >= BACKWARD | module.OPTIONS
    if hasattr(module, "forward_backward"):
        assert keywords(module.forward_backward) >= FORWARD_BACKWARD | module.OPTIONS
        assert module.ONE_PASS_BYTES > 0


@pytest.mark.parametrize("name", fused_losses.BACKENDS)
def test_every_name_in_BACKENDS_works_as_backend(name):
    from tests.helpers import HAS_TRITON, make_inputs
    if name != "auto" and backends._REGISTRY[name].triton and not HAS_TRITON:
        pytest.skip("triton is not installed")
    hidden, weight, targets, _ = make_inputs(5, 8, 30, torch.float32)
    loss = fused_losses.linear_cross_entropy(hidden, weight, targets, backend=name)
    want = fused_losses.linear_cross_entropy(hidden, weight, targets, backend="torch")
    torch.testing.assert_close(loss, want)
    out = fused_losses.linear_logprobs(hidden, weight, targets, backend=name)
    assert out.logprobs.shape == targets.shape
