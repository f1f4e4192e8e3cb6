"""token_logprobs on tiny random Hugging Face models against their own materialised logits."""
import pytest
import torch

from fused_losses import token_logprobs
from tests.helpers import assert_close
from tests.objectives.models import HeadNeverCalled, lm_batch, tiny_model

F64 = torch.float64


def naive_token_logprobs(model, input_ids, labels, attention_mask):
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    logp = logits.log_softmax(-1)
    out = torch.zeros(labels.shape, dtype=F64)
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                out[b, t] = logp[b, t - 1, labels[b, t]]
    return out


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", True), ("gemma2", False)])
def test_token_logprobs_match_the_models_logits(arch, tie):
    model = tiny_model(arch, tie=tie)
    input_ids, labels, attention_mask = lm_batch()
    want = naive_token_logprobs(model, input_ids, labels, attention_mask)
    with HeadNeverCalled(model):
        got = token_logprobs(model, input_ids, labels, attention_mask, backend="torch")
    assert got.shape == labels.shape and got.dtype == F64 and not got.requires_grad
    assert torch.all(got[:, 0] == 0) and torch.all(got[labels == -100] == 0)
    assert_close(got, want, F64, scale=100, name=arch)


def test_token_logprobs_bad_shapes():
    model = tiny_model("llama")
    input_ids, labels, _ = lm_batch()
    with pytest.raises(ValueError, match="same shape"):
        token_logprobs(model, input_ids, labels[:, 1:])
