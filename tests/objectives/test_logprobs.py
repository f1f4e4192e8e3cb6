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


def test_a_model_whose_logits_are_not_its_decoder_and_head_is_refused():
    """token_logprobs and ift_loss run the decoder and the head apart: FalconH1 multiplies
    its logits by lm_head_multiplier (not read from the config; 0.53 nats off) and LLaVA's
    decoder alone embeds image tokens as text (1.6 nats off). Both were silently wrong."""
    from fused_losses import ift_loss
    from tests.integrations.models import build, model_inputs

    falcon = build("falcon_h1")
    inputs, labels = model_inputs("falcon_h1")
    for call in (lambda: token_logprobs(falcon, inputs["input_ids"], labels),
                 lambda: ift_loss(falcon, inputs["input_ids"], labels)):
        with pytest.raises(ValueError, match="transforms its head's output"):
            call()
    llava = build("llava")
    inputs, labels = model_inputs("llava")
    with pytest.raises(ValueError, match="image/video tokens"):
        token_logprobs(llava, inputs["input_ids"], labels)
    text = torch.where(labels == -100, 3, labels)  # no image token: the decoder is the model
    logits = llava(input_ids=text).logits.double()
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    want = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1))[..., 0]
    want = torch.nn.functional.pad(torch.where(targets != -100, want, 0.0)[:, :-1], (1, 0))
    assert_close(token_logprobs(llava, text, labels), want, torch.float64)
