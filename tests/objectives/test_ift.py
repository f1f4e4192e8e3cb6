"""IFT on tiny random Llama and Qwen2 against a naive two-pass implementation that, like
the official code, runs the full model (materialised logits) in both passes."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fused_losses import FusedIFTLoss, ift_loss
from tests.helpers import assert_close
from tests.objectives.models import HeadNeverCalled, lm_batch, tiny_model

F64 = torch.float64


def frozen_copy(model):
    """The official code's ``embed_tokens``: a copy of the input embeddings, no gradient."""
    embed = copy.deepcopy(model.get_input_embeddings())
    return embed.requires_grad_(False)


def naive_ift(model, input_ids, labels, attention_mask, lam, gamma, detach=False, embed=None):
    """The official two passes on materialised logits; ``embed`` is the table both passes
    embed with (default: a frozen copy, as the official code; the live module to train it)."""
    embed = frozen_copy(model) if embed is None else embed
    inputs_embeds = embed(input_ids)
    with torch.no_grad():
        logits = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
    further = torch.cat((input_ids[:, :1], logits.argmax(-1)[:, :-1]), dim=1)
    mixed = torch.where(labels == -100, input_ids, further)
    embeds = (1 - lam) * inputs_embeds + lam * embed(mixed)
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    logp = logits.double().log_softmax(-1)  # float64 math on the head's logits (autocast: bf16)
    per_seq = []
    for b in range(labels.shape[0]):
        T = labels.shape[1]
        nll = [(-logp[b, t - 1, labels[b, t]] if labels[b, t] != -100 else logp.new_zeros(()))
               for t in range(1, T)]
        scored = [labels[b, t] != -100 for t in range(1, T)]
        if gamma == 0:
            weights = [logp.new_ones(()) if s else logp.new_zeros(()) for s in scored]
        else:
            weights = []
            for t in range(T - 1):
                if scored[t]:
                    weights.append(sum(gamma ** (j - t) * nll[j] for j in range(t, T - 1)))
                else:
                    weights.append(logp.new_zeros(()))
        if detach:
            weights = [w.detach() for w in weights]
        num = sum(w * l for w, l in zip(weights, nll))
        den = sum(weights) + (1e-8 if gamma else 0.0)
        per_seq.append(num / den)
    return torch.stack(per_seq).mean()


def _params(model):
    return [model.get_output_embeddings().weight, model.get_input_embeddings().weight,
            model.get_decoder().layers[0].self_attn.q_proj.weight]


def _grads(loss, params):
    """Gradients, zeros where a parameter is not reached (e.g. frozen input embeddings)."""
    got = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lam,gamma,detach", [(0.2, 0.95, False), (0.5, 1.0, True),
                                              (1.0, 0.5, False)])
def test_ift_matches_naive(arch, lam, gamma, detach):
    """Default: both passes embed through the frozen input embeddings (the official code);
    qwen2's tied head still trains as the head."""
    model = tiny_model(arch, tie=arch == "qwen2")
    input_ids, labels, attention_mask = lm_batch()
    with HeadNeverCalled(model):
        out = ift_loss(model, input_ids, labels, attention_mask=attention_mask, lam=lam,
                       gamma=gamma, detach_weights=detach, backend="torch")
    expected = naive_ift(model, input_ids, labels, attention_mask, lam, gamma, detach)
    assert_close(out.loss, expected, F64, scale=100, name="loss")
    params = _params(model)
    for g, w, name in zip(_grads(out.loss, params), _grads(expected, params),
                          ("lm_head", "embed", "q_proj")):
        assert_close(g, w, F64, scale=100, name=name)


def test_ift_sends_no_gradient_into_untied_input_embeddings():
    model = tiny_model("llama")
    input_ids, labels, attention_mask = lm_batch()
    out = ift_loss(model, input_ids, labels, attention_mask=attention_mask, backend="torch")
    out.loss.backward()
    embed = model.get_input_embeddings().weight
    assert embed.grad is None or torch.count_nonzero(embed.grad) == 0
    assert torch.count_nonzero(model.get_output_embeddings().weight.grad) > 0


def test_ift_options_for_the_embeddings():
    """train_embeddings=True: the live embeddings, with gradient (the old behaviour);
    input_embeddings=: a frozen table other than the live one (the official code's copy
    taken at the start, after the tied head has moved). On a tied head, where both matter."""
    model = tiny_model("qwen2", tie=True)
    input_ids, labels, attention_mask = lm_batch()
    params = _params(model)
    out = ift_loss(model, input_ids, labels, attention_mask=attention_mask,
                   train_embeddings=True, backend="torch")
    live = naive_ift(model, input_ids, labels, attention_mask, 0.2, 0.95,
                     embed=model.get_input_embeddings())
    assert_close(out.loss, live, F64, scale=100, name="loss (live)")
    want = _grads(live, params)
    assert torch.count_nonzero(want[1]) > 0  # the embeddings are reached
    for g, w in zip(_grads(out.loss, params), want):
        assert_close(g, w, F64, scale=100, name="grad (live)")

    start = frozen_copy(model)
    with torch.no_grad():
        start.weight.add_(0.3 * torch.randn_like(start.weight))
    for table in (start, start.weight):
        out = ift_loss(model, input_ids, labels, attention_mask=attention_mask,
                       input_embeddings=table, backend="torch")
        expected = naive_ift(model, input_ids, labels, attention_mask, 0.2, 0.95, embed=start)
        assert_close(out.loss, expected, F64, scale=100, name="loss (given table)")
        for g, w in zip(_grads(out.loss, params), _grads(expected, params)):
            assert_close(g, w, F64, scale=100, name="grad (given table)")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ift_without_mixing_or_propagation_is_sft(arch):
    model = tiny_model(arch)
    input_ids, labels, attention_mask = lm_batch()
    out = ift_loss(model, input_ids, labels, attention_mask=attention_mask, lam=0.0, gamma=0.0,
                   backend="torch")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    per_seq = [F.cross_entropy(logits[b, :-1], labels[b, 1:]) for b in range(labels.shape[0])]
    sft = torch.stack(per_seq).mean()  # sequence-mean of token-mean NLL
    assert_close(out.loss, sft, F64, scale=100, name="loss")
    w = model.get_output_embeddings().weight
    assert_close(torch.autograd.grad(out.loss, w)[0], torch.autograd.grad(sft, w)[0], F64,
                 scale=100, name="dW")
    assert_close(out.metrics["nll/clean"], out.metrics["nll"], F64)  # λ = 0: same inputs


def test_ift_module_and_bad_inputs():
    model = tiny_model("llama")
    input_ids, labels, attention_mask = lm_batch()
    module = FusedIFTLoss(lam=0.3, gamma=0.9, backend="torch")
    a = module(model, input_ids, labels, attention_mask=attention_mask)
    b = ift_loss(model, input_ids, labels, attention_mask=attention_mask, lam=0.3, gamma=0.9,
                 backend="torch")
    assert_close(a.loss, b.loss.detach(), F64)
    with pytest.raises(ValueError, match=r"lam must be a finite number in \[0.0, 1.0\]"):
        ift_loss(model, input_ids, labels, lam=1.5)
    with pytest.raises(ValueError, match="gamma must be a finite number in"):
        ift_loss(model, input_ids, labels, gamma=-0.1)
    with pytest.raises(ValueError, match="same shape"):
        ift_loss(model, input_ids[:, 1:], labels)
    with pytest.raises(ValueError, match="not both"):
        ift_loss(model, input_ids, labels, train_embeddings=True,
                 input_embeddings=frozen_copy(model))
    with pytest.raises(ValueError, match=r"input_embeddings must be .* \(67, 16\)"):
        ift_loss(model, input_ids, labels, input_embeddings=torch.zeros(3, 16))
    with pytest.raises(TypeError, match=r"ift_loss\(\) got an unexpected keyword argument "
                                        r"'lamda'; did you mean 'lam'\?"):
        ift_loss(model, input_ids, labels, lamda=0.1)
