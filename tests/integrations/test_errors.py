"""Where an order of patching, wrapping and calling cannot work, a clear error says which and
what to do (issue 12 item 1): every error of ``integrations/hf.py`` and ``trl.py`` that
test_hf.py does not raise, on tiny random models. Each test also shows the way out the
message names (or that calls the error does not concern still work)."""
import functools

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from fused_losses import patch_causal_lm, unpatch_causal_lm
from tests.helpers import assert_close
from tests.integrations.models import VOCAB, Wrapper, build, hf_loss, model_inputs

F64 = torch.float64


def _stock_loss(model, inputs, labels):
    """The float64 loss on the (unpatched) model's materialised logits."""
    return hf_loss(model(**inputs).logits, labels)


@pytest.mark.parametrize("first", ["wrapper", "model"])
def test_patching_a_model_and_its_wrapper_is_refused_in_either_order(first):
    """Patched through DDP's wrapper and again on the model inside (or the other way round),
    the head would be patched twice with two sets of hooks."""
    model = build("llama")
    wrapper = Wrapper(model)
    patched, other = (wrapper, model) if first == "wrapper" else (model, wrapper)
    patch_causal_lm(patched)
    with pytest.raises(ValueError, match="already patched, through another module.*"
                                         "unpatch_causal_lm the one patched first"):
        patch_causal_lm(other)
    unpatch_causal_lm(patched)
    inputs, labels = model_inputs("llama")
    expected = _stock_loss(model, inputs, labels)
    assert_close(patch_causal_lm(other)(**inputs, labels=labels).loss, expected, F64)


def test_a_head_forward_set_by_another_library_is_not_replaced_silently():
    model = build("llama")
    head = model.get_output_embeddings()
    head.forward = functools.partial(torch.nn.Linear.forward, head)  # e.g. a dispatch hook
    with pytest.raises(ValueError, match="forward of its own.*remove it first"):
        patch_causal_lm(model)


class _Adapter(torch.nn.Module):
    """What a LoRA adapter on the head does: the base layer plus a low-rank delta."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False, dtype=F64)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False, dtype=F64)

    def forward(self, hidden):
        return self.base_layer(hidden) + self.up(self.down(hidden))


def test_a_head_replaced_or_wrapped_after_patching():
    """resize_token_embeddings puts a new, unpatched head on the model; an adapter wraps the
    patched one (its delta would be left out of the loss). Calls with labels say so; calls
    without labels (generation) run the stock model; patching again serves the new head."""
    inputs, labels = model_inputs("llama")
    resized = patch_causal_lm(build("llama"))
    resized.resize_token_embeddings(VOCAB + 3, mean_resizing=False)
    with pytest.raises(RuntimeError, match="replaced after patch_causal_lm.*"
                                           r"patch_causal_lm\(model\) again.*unpatch_causal_lm"):
        resized(**inputs, labels=labels)
    assert resized(**inputs).logits.shape[-1] == VOCAB + 3
    expected = _stock_loss(resized, inputs, labels)
    assert_close(patch_causal_lm(resized)(**inputs, labels=labels).loss, expected, F64)

    adapted = patch_causal_lm(build("llama"))
    adapted.set_output_embeddings(_Adapter(adapted.get_output_embeddings()))
    with pytest.raises(RuntimeError, match=r"\(Linear then, _Adapter now"):
        adapted(**inputs, labels=labels)
    with pytest.raises(TypeError, match="adapter-wrapped head"):  # what the message warns of
        patch_causal_lm(adapted)


def test_a_forward_that_never_calls_its_head():
    """A forward that forms its logits from the head's weight, not its module."""
    model = build("llama")

    def forward(input_ids=None, attention_mask=None, **kwargs):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask)
        return CausalLMOutputWithPast(logits=F.linear(hidden.last_hidden_state,
                                                      model.lm_head.weight))

    model.forward = forward
    patch_causal_lm(model)
    inputs, labels = model_inputs("llama")
    with pytest.raises(RuntimeError, match="never called its output embedding.*"
                                           r"unpatch_causal_lm\(model\) restores"):
        model(**inputs, labels=labels)


def test_a_second_head_call_in_one_forward():
    model = patch_causal_lm(build("llama"))

    def log_logits(module, args, output):  # a hook that calls the head itself
        model.lm_head(output.last_hidden_state)

    handle = model.model.register_forward_hook(log_logits)
    inputs, labels = model_inputs("llama")
    with pytest.raises(RuntimeError, match=r"ran twice in one forward.*unpatch_causal_lm"):
        model(**inputs, labels=labels)
    handle.remove()  # the failed call leaves nothing behind
    assert_close(model(**inputs, labels=labels).loss,
                 _stock_loss(build("llama"), inputs, labels), F64)


def test_labels_that_do_not_match_the_hidden_states():
    model = patch_causal_lm(build("llama"))
    inputs, labels = model_inputs("llama")
    with pytest.raises(ValueError, match=r"labels \(shape \(3, 8\)\) do not match the hidden "
                                         r"states.*expected \[B, T\] labels"):
        model(**inputs, labels=labels[:, 1:])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_a_tensor_parallel_head_is_refused_with_the_way_out():
    """A DTensor weight inside the head's forward (tensor parallelism) is a shard of the
    vocabulary, not the [V, H] head the loss needs. One gloo process suffices for a
    DTensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = patch_causal_lm(build("llama"))
    head = model.get_output_embeddings()
    inputs, labels = model_inputs("llama")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        head.weight = torch.nn.Parameter(distribute_tensor(
            head.weight.detach(), DeviceMesh("cpu", [0]), [Shard(0)]))
        with pytest.raises(TypeError, match="DTensor.*tensor-parallel head.*"
                                            "linear_logprobs with process_group="):
            model(**inputs, labels=labels)
    finally:
        dist.destroy_process_group()


def _foreign_fused_head(model):
    """A fused-LM-head wrapper of ``model.forward`` taking TRL's ``fused_lm_head`` but
    keeping no readable temperature/outputs/cast options."""
    original = model.forward

    def forward(*args, fused_lm_head=False, **kwargs):
        return original(*args, **kwargs)

    model.forward = forward


@pytest.mark.parametrize("order", ["head_first", "patch_first"])
def test_a_fused_head_whose_options_cannot_be_read(order):
    """Serving it with other options than its own would silently change TRL's loss (its
    temperature, its fields): refused, in either order; plain calls are unaffected."""
    model = build("llama")
    if order == "head_first":
        _foreign_fused_head(model)
        patch_causal_lm(model)
    else:
        patch_causal_lm(model)
        _foreign_fused_head(model)
    inputs, labels = model_inputs("llama")
    with pytest.raises(TypeError, match="options .* cannot be read.*before or after the patch"
                                        ".*fused_losses.integrations.add_fused_lm_head"):
        model(**inputs, labels=labels, fused_lm_head=True)
    assert_close(model(**inputs, labels=labels).loss,
                 _stock_loss(build("llama"), inputs, labels), F64)
