"""patch_causal_lm on tiny random models: the stock model's loss and gradients (float64
reference on its materialised logits), TRL's fused-head fields, generation, wrappers, errors."""
import copy
import types

import pytest
import torch

from fused_losses import patch_causal_lm, unpatch_causal_lm
from fused_losses.integrations import FusedCausalLMOutput, add_fused_lm_head, is_patched
from tests.helpers import LargestTensors, assert_close
from tests.integrations.models import (ARCHS, VOCAB, Wrapper, build, hf_loss, model_inputs,
                                       next_token_targets)

F64 = torch.float64


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], F64, scale=10, name=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_equal_the_stock_model(arch):
    stock, fused = build(arch), patch_causal_lm(build(arch))
    inputs, labels = model_inputs(arch)
    for num_items in (None, torch.tensor(11)):
        stock.zero_grad()
        fused.zero_grad()
        out = stock(**inputs)
        expected = hf_loss(out.logits, labels, num_items)
        if arch == "mixtral":  # the stock model adds the weighted load-balancing loss
            expected = expected + stock.router_aux_loss_coef * out.aux_loss
        expected.backward()
        got = fused(**inputs, labels=labels, num_items_in_batch=num_items)
        assert got.logits is None
        assert_close(got.loss, expected, F64, name="loss")
        got.loss.backward()
        _assert_same_grads(_grads(fused), _grads(stock))


def test_no_logits_sized_tensor_is_formed():
    fused = patch_causal_lm(build("llama"))
    inputs, labels = model_inputs("llama", batch=4, length=24)
    labels[:, :16] = -100  # two thirds of the positions are prompt
    with LargestTensors(VOCAB) as seen:
        fused(**inputs, labels=labels).loss.backward()
    scored = int((next_token_targets(labels) != -100).sum())
    assert 0 < seen.rows <= scored < labels.numel() / 2  # the stock model: every position


def test_shift_labels_and_the_stock_loss_of_a_batch_without_labels():
    stock, fused = build("qwen2"), patch_causal_lm(build("qwen2"))
    inputs, labels = model_inputs("qwen2")
    targets = next_token_targets(labels)
    got = fused(**inputs, shift_labels=targets).loss
    assert_close(got, hf_loss(stock(**inputs).logits, None, shift_labels=targets), F64)
    nothing = fused(**inputs, labels=torch.full_like(labels, -100)).loss
    assert nothing.item() == 0.0  # the stock model gives 0/0 = NaN here


def test_generation_and_calls_without_labels_are_unchanged():
    stock, fused = build("gemma2"), patch_causal_lm(build("gemma2"))
    inputs, _ = model_inputs("gemma2")
    torch.testing.assert_close(fused(**inputs).logits, stock(**inputs).logits, rtol=0, atol=0)
    prompt = inputs["input_ids"][:1, :4]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(prompt, **kwargs), stock.generate(prompt, **kwargs))


def _reference_fields(logits, labels, temperature, shift_labels=None):
    """TRL's fields from materialised float64 logits (already soft-capped by the model)."""
    z = logits.double() / temperature
    targets = next_token_targets(labels) if shift_labels is None else shift_labels
    mask = targets != -100
    logp = z.log_softmax(-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    fields = dict(
        log_probs=picked,
        entropy=-(logp.exp() * logp).sum(-1) * mask,
        log_sum_sq_probs=torch.logsumexp(2 * logp, -1) * mask,
        mean_logits=z.mean(-1) * mask,
        is_top1=(z.argmax(-1) == targets) & mask,
        label_mask=mask)
    if shift_labels is None:
        fields = {k: v[:, :-1] for k, v in fields.items()}
    fields["loss"] = -fields["log_probs"].sum() / mask.sum()
    return fields


@pytest.mark.parametrize("arch, temperature", [("llama", 1.0), ("gemma2", 0.7),
                                               ("cohere", 1.3)])
@pytest.mark.parametrize("shifted", [False, True])
def test_fused_lm_head_fields(arch, temperature, shifted):
    """Every TRL field against float64 logits; TRL divides the soft-capped logits by its
    temperature (Gemma-2 at 0.7 checks that order); log_probs and entropy get gradients."""
    stock = build(arch)
    fused = patch_causal_lm(build(arch), temperature=temperature, outputs=(
        "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    inputs, labels = model_inputs(arch)
    targets = next_token_targets(labels) if shifted else None
    call = dict(shift_labels=targets) if shifted else dict(labels=labels)
    out = fused(**inputs, **call, fused_lm_head=True)
    assert isinstance(out, FusedCausalLMOutput)
    expected = _reference_fields(stock(**inputs).logits, labels, temperature, targets)
    for name in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(getattr(out, name), expected[name], F64, name=name)
    for name in ("is_top1", "label_mask"):
        assert torch.equal(getattr(out, name), expected[name]), name
    assert not out.mean_logits.requires_grad and not out.log_sum_sq_probs.requires_grad
    (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
    (expected["log_probs"].sum() + 0.3 * expected["entropy"].sum()).backward()
    _assert_same_grads(_grads(fused), _grads(stock))


def test_fields_not_asked_for_are_none_and_outputs_are_checked():
    fused = patch_causal_lm(build("llama"), outputs=("log_probs",))
    inputs, labels = model_inputs("llama")
    out = fused(**inputs, labels=labels, fused_lm_head=True)
    assert out.entropy is None and out.is_top1 is None and out.log_sum_sq_probs is None
    with pytest.raises(ValueError, match="unknown field"):
        patch_causal_lm(build("llama"), outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="labels="):
        fused(**inputs, fused_lm_head=True)


def test_fused_lm_head_checks_num_items_in_batch_as_the_plain_loss_does():
    """0 gave an inf loss, a negative count a negative one, a [1] tensor a [1] loss."""
    fused = patch_causal_lm(build("llama"))
    inputs, labels = model_inputs("llama")
    plain = fused(**inputs, labels=labels, num_items_in_batch=5).loss
    for count in (5, torch.tensor(5), torch.tensor([5])):
        loss = fused(**inputs, labels=labels, fused_lm_head=True, num_items_in_batch=count).loss
        assert loss.shape == () and torch.allclose(loss, plain)
    for count in (0, -3, torch.tensor(0.0), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            fused(**inputs, labels=labels, fused_lm_head=True, num_items_in_batch=count)


def _trl_utils():
    return pytest.importorskip("trl.trainer.utils")


@pytest.mark.parametrize("order", ["trl_head_first", "patch_first"])
def test_trl_head_before_or_after_the_patch(order):
    """A TRL trainer adds its own fused head in __init__: before or after our patch, the
    call is served by our kernels with the TRL head's temperature and outputs, and agrees
    with TRL's own head."""
    trl_utils = _trl_utils()
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    theirs = build("gemma2")
    trl_utils.add_fused_lm_head(theirs, temperature=0.6, outputs=outputs)
    ours = build("gemma2")
    if order == "trl_head_first":
        trl_utils.add_fused_lm_head(ours, temperature=0.6, outputs=outputs)
        patch_causal_lm(ours)
    else:
        patch_causal_lm(ours)
        trl_utils.add_fused_lm_head(ours, temperature=0.6, outputs=outputs)
    inputs, labels = model_inputs("gemma2")
    ran = []
    ours.get_output_embeddings().register_forward_hook(lambda *_: ran.append(1))
    got = ours(**inputs, labels=labels, fused_lm_head=True)
    want = theirs(**inputs, labels=labels, fused_lm_head=True)
    assert ran == [1] and isinstance(got, FusedCausalLMOutput)
    for name in ("loss",) + outputs:  # TRL's head computes in float32
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5,
                                   atol=1e-5, check_dtype=False, msg=name)
    with pytest.raises(ValueError, match="temperature"):
        patch_causal_lm(ours, temperature=0.9)(**inputs, labels=labels, fused_lm_head=True)


def test_trls_fp32_head_option_is_honoured():
    """GRPO's cast_lm_head_to_fp32: a bf16 model's head runs in float32, outside autocast."""
    trl_utils = _trl_utils()
    theirs, ours = build("llama").bfloat16(), build("llama").bfloat16()
    for model in (theirs, ours):
        trl_utils.add_fused_lm_head(model, cast_lm_head_to_fp32=True,
                                    outputs=("log_probs", "entropy"))
    patch_causal_lm(ours)
    ran = []
    ours.get_output_embeddings().register_forward_hook(lambda *_: ran.append(1))
    inputs, labels = model_inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(**inputs, labels=labels, fused_lm_head=True)
        want = theirs(**inputs, labels=labels, fused_lm_head=True)
    assert ran == [1] and got.log_probs.dtype == torch.float32
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5,
                                   atol=1e-5, msg=name)


def test_plain_loss_under_autocast_runs_the_head_in_the_autocast_dtype():
    """Under autocast the stock head runs in bf16 (F.linear); the patched loss must agree
    with the stock loss to bf16 accuracy and give float32 gradients to float32 weights."""
    stock, fused = build("llama").float(), patch_causal_lm(build("llama").float())
    inputs, labels = model_inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = stock(**inputs, labels=labels).loss
        got = fused(**inputs, labels=labels).loss
    assert_close(got, want.double(), torch.bfloat16, name="loss")
    got.backward()
    assert all(p.grad.dtype == torch.float32 for p in fused.parameters() if p.grad is not None)


def test_our_add_fused_lm_head_takes_trls_signature():
    trl_utils = _trl_utils()
    theirs, ours = build("qwen2"), build("qwen2")
    trl_utils.add_fused_lm_head(theirs, temperature=0.8, outputs=("log_probs", "is_top1"))
    add_fused_lm_head(ours, temperature=0.8, outputs=("log_probs", "is_top1"))
    inputs, labels = model_inputs("qwen2")
    got = ours(**inputs, labels=labels, fused_lm_head=True)
    want = theirs(**inputs, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-5,
                               check_dtype=False)
    assert torch.equal(got.is_top1, want.is_top1) and got.entropy is None


def test_a_forward_wrapper_stays_around_the_fused_head():
    """accelerate wraps ``model.forward`` in autocast; patching before or after the wrapper
    must keep the head inside it (dropping it left a DPO reference model in fp32 while the
    policy ran in bf16: a step-0 margin of 1e-4 instead of 0)."""
    def wrap_in_autocast(model):  # what accelerate's prepare_model does for bf16
        forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__)
        model.forward = types.MethodType(forward, model)
        return model

    def autocast_seen_by_head(model):
        seen = []
        model.get_output_embeddings().register_forward_pre_hook(
            lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        return seen

    inputs, labels = model_inputs("llama")
    results = []
    for model in (patch_causal_lm(wrap_in_autocast(build("llama").float())),
                  wrap_in_autocast(patch_causal_lm(build("llama").float()))):
        seen = autocast_seen_by_head(model)
        results.append(model(**inputs, labels=labels, fused_lm_head=True).log_probs)
        assert seen == [True]
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    plain = patch_causal_lm(build("llama").float())
    unwrapped = plain(**inputs, labels=labels, fused_lm_head=True).log_probs
    assert not torch.allclose(results[0], unwrapped)  # autocast did act on the backbone


def test_unpatch_restores_the_stock_model():
    stock, model = build("llama_tied"), patch_causal_lm(build("llama_tied"))
    assert is_patched(model)
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    unpatch_causal_lm(model)
    assert not is_patched(model) and "forward" not in vars(model.get_output_embeddings())
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (hooks[0] - 1,
                                                                          hooks[1] - 1)
    inputs, labels = model_inputs("llama_tied")
    out, ref = model(**inputs, labels=labels), stock(**inputs, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_causal_lm(model)


def test_a_deep_copy_is_patched_on_its_own():
    """TRL builds reference models with deepcopy: the copy's hooks serve the copy."""
    model = patch_causal_lm(build("llama"))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(2)
    inputs, labels = model_inputs("llama")
    expected = hf_loss(unpatch_causal_lm(copy.deepcopy(twin))(**inputs).logits, labels)
    assert_close(twin(**inputs, labels=labels).loss, expected, F64)
    assert not torch.allclose(model(**inputs, labels=labels).loss, expected)


def test_a_ddp_style_wrapper_is_patched_through():
    stock, wrapped = build("qwen2"), patch_causal_lm(Wrapper(build("qwen2")))
    inputs, labels = model_inputs("qwen2")
    assert_close(wrapped(**inputs, labels=labels).loss,
                 hf_loss(stock(**inputs).logits, labels), F64)


def test_zero3_style_partitioned_head_is_gathered_for_the_fused_backward():
    """Simulates DeepSpeed ZeRO-3: the head's weight is emptied after its module's forward
    and restored by a hook on that module's outputs in backward. The fused backward needs
    the weight, so it must run after that hook: the gradients must still be the stock ones."""
    stock, fused = build("llama"), patch_causal_lm(build("llama"))
    head = fused.get_output_embeddings()
    full = head.weight.data

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            head.weight.data = full
            return grad

    def partition_after_forward(module, args, output):
        module.weight.data = torch.empty(0, dtype=full.dtype)
        return Gather.apply(output)

    def gather_before_forward(module, args):
        module.weight.data = full

    head.register_forward_pre_hook(gather_before_forward)
    head.register_forward_hook(partition_after_forward)
    inputs, labels = model_inputs("llama")
    hf_loss(stock(**inputs).logits, labels).backward()
    fused(**inputs, labels=labels).loss.backward()
    _assert_same_grads(_grads(fused), _grads(stock))
    head.weight.data = torch.empty(0, dtype=full.dtype)
    with pytest.raises(ValueError, match="ZeRO-3"):
        head._forward_hooks.clear(), head._forward_pre_hooks.clear()
        fused(**inputs, labels=labels)


def test_unknown_logit_transform_is_an_error_not_a_different_loss():
    """Falcon-H1 multiplies its logits by lm_head_multiplier, which the config reader does
    not know: the first call with labels says so instead of returning another loss."""
    model = patch_causal_lm(build("falcon_h1"))
    inputs, labels = model_inputs("falcon_h1")
    with pytest.raises(ValueError, match="transforms its head's output"):
        model(**inputs, labels=labels)
    gemma = patch_causal_lm(build("gemma2"))
    gemma.config.final_logit_softcapping = 5.0  # after the patch read it
    with pytest.raises(ValueError, match="final_logit_softcapping 2.0"):
        gemma(**inputs, labels=labels)


def test_bad_inputs_name_the_problem():
    model = build("llama")
    with pytest.raises(TypeError, match="not a Hugging Face causal LM"):
        patch_causal_lm(torch.nn.Linear(3, 4))
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        patch_causal_lm(model)
    fused = patch_causal_lm(build("llama"))
    inputs, labels = model_inputs("llama")
    with pytest.raises(ValueError, match="logits_to_keep"):
        fused(**inputs, labels=labels, logits_to_keep=1)
    with pytest.raises(TypeError, match="return_dict"):
        fused(**inputs, labels=labels, return_dict=False)
    with pytest.raises(ValueError, match="temperature"):
        patch_causal_lm(build("llama"), temperature=0)
    # refused when patching, not at the first step (True would be a silent temperature 1)
    for bad, error in ((dict(temperature=True), TypeError),
                       (dict(temperature=float("inf")), ValueError),
                       (dict(backend="tritn"), ValueError), (dict(filter_eps=-1.0), ValueError),
                       (dict(chunk_size=0), ValueError), (dict(grad_in_forward="no"), TypeError),
                       (dict(cast_lm_head_to_fp32=1), TypeError),
                       (dict(outputs="log_probs"), TypeError)):  # a str is not a tuple of names
        with pytest.raises(error, match=next(iter(bad))):
            patch_causal_lm(build("llama"), **bad)
    with pytest.raises(TypeError, match="unexpected keyword"):
        patch_causal_lm(build("llama"), softcap=3.0)
