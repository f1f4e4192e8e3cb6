"""Per-token log-probs of a Hugging Face causal LM, fused: the decoder's hidden states and
the output embedding go to the primitive, so the model's ``[B, T, V]`` logits never exist."""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from ._common import check_labels, check_options, to_labels_layout, token_stats


class CausalLMHead(NamedTuple):
    """The pieces of a causal LM the fused objectives need."""

    decoder: torch.nn.Module  # input_ids/inputs_embeds -> last_hidden_state [B, T, H]
    weight: torch.Tensor  # [V, H]
    options: dict  # primitive options the model's own head applies (bias, softcap, scaling)


def causal_lm_head(model: torch.nn.Module) -> CausalLMHead:
    """Split a Hugging Face ``*ForCausalLM`` into decoder, head weight and head options.

    Handles a head bias, Gemma-2/3's ``final_logit_softcapping`` and a constant logit scale
    (Cohere's ``logit_scale`` multiplies, Granite's ``logits_scaling`` divides), mapped to
    the primitive's ``softcap`` and ``temperature``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model ({type(model).__name__}) has no output embedding with a "
                         "weight; expected a Hugging Face *ForCausalLM")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise ValueError(f"model ({type(model).__name__}) exposes no decoder "
                         "(get_decoder()/base_model)")
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    options = {}
    if getattr(head, "bias", None) is not None:
        options["bias"] = head.bias
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        options["softcap"] = float(softcap)
    temperature = 1.0
    if getattr(config, "logit_scale", None):
        temperature /= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):
        temperature *= float(config.logits_scaling)
    if temperature != 1.0:
        options["temperature"] = temperature
    return CausalLMHead(decoder, head.weight, options)


# Head outputs passed through a model's own forward to check its logit transform: exact in
# bf16, large enough that a soft-cap or a scale shows.
PROBE = (-64.0, -8.0, -1.0, 0.0, 0.5, 1.0, 8.0, 64.0)


def probe_logits(options: dict) -> torch.Tensor:
    """float64 [len(PROBE)]: what a model whose head transform is ``options`` (the
    primitive's ``temperature``/``softcap`` of :func:`causal_lm_head`) makes of PROBE."""
    expected = torch.tensor(PROBE, dtype=torch.float64) / options.get("temperature", 1.0)
    softcap = options.get("softcap")
    return expected if softcap is None else softcap * torch.tanh(expected / softcap)


def transform_mismatch(model, options: dict, logits) -> str | None:
    """Why ``logits`` (the model's output for a head that returned PROBE) show a transform
    other than ``options``, or None when they agree."""
    expected = probe_logits(options)
    got = None if logits is None else logits.detach().double().cpu().reshape(-1)
    if got is not None and got.shape == expected.shape and torch.allclose(
            got, expected, rtol=2e-2, atol=1e-3):
        return None
    return (f"{type(model).__name__} transforms its head's output in a way not read from its "
            f"config: head outputs {list(PROBE)} came back as "
            f"{None if got is None else got.tolist()}, expected {expected.tolist()} (logit "
            f"scale {1 / options.get('temperature', 1.0)}, final_logit_softcapping "
            f"{options.get('softcap')})")


_CHECKED: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def check_logit_transform(model: torch.nn.Module, head: CausalLMHead) -> None:
    """Raise unless the model does to its head's output exactly what ``head.options`` says,
    so decoder + head + options reproduce its own logits (FalconH1's ``lm_head_multiplier``
    is not read from the config, for one). Once per model: one token through its forward
    with the head returning PROBE."""
    if _CHECKED.get(model):
        return
    output_embedding = model.get_output_embeddings()
    probe = torch.tensor(PROBE, dtype=head.weight.dtype, device=head.weight.device)
    own_forward = vars(output_embedding).get("forward")
    output_embedding.forward = lambda hidden: probe.expand(*hidden.shape[:-1], len(PROBE)) \
        .clone()
    token = torch.zeros((1, 1), dtype=torch.long,
                        device=model.get_input_embeddings().weight.device)
    try:
        out = model(input_ids=token, use_cache=False)
    finally:
        if own_forward is None:
            del output_embedding.forward
        else:
            output_embedding.forward = own_forward
    logits = out.get("logits") if hasattr(out, "get") else out[0]
    problem = transform_mismatch(model, head.options, logits)
    if problem:
        raise ValueError(f"{problem}; its decoder and head would not give its own log-probs, "
                         "so this is an error, not a silently different result")
    _CHECKED[model] = True


def check_text_only(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """The decoder alone embeds ids as text: a vision-language model's image or video tokens
    would become text tokens, a silently different forward. Refuse them."""
    config = getattr(model, "config", None)
    special = [getattr(config, name, None) for name in (
        "image_token_index", "image_token_id", "video_token_index", "video_token_id")]
    special = [i for i in special if isinstance(i, int) and not isinstance(i, bool)]
    if special and torch.isin(input_ids, torch.tensor(special, device=input_ids.device)).any():
        raise ValueError(
            f"input_ids hold image/video tokens {special} of {type(model).__name__}: this "
            "function runs its text decoder alone, without the pixels. Score such batches "
            "with the model's own forward: patch_causal_lm(model), then model(..., "
            "labels=..., fused_lm_head=True)")


def decoder_hidden(head: CausalLMHead, *, input_ids=None, inputs_embeds=None,
                   attention_mask=None) -> torch.Tensor:
    """The decoder's last hidden state [B, T, H] (after the final norm)."""
    out = head.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds,
                       attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def merged_options(head: CausalLMHead, primitive_options: dict) -> dict:
    """The model's head options, with the caller's on top (a caller's temperature multiplies)."""
    options = {**head.options, **primitive_options}
    if "temperature" in head.options and "temperature" in primitive_options:
        options["temperature"] = head.options["temperature"] * primitive_options["temperature"]
    return options


@torch.no_grad()
def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **primitive_options,
) -> torch.Tensor:
    """``log π(labels[t] | tokens before t)`` for a Hugging Face causal LM, fused, no grad.

    The result is in the labels' layout that every loss's ``ref_logprobs`` expects: position
    t holds the log-prob of ``labels[:, t]``; 0 where ``labels`` is ignored and in column 0.
    (``labels`` are Hugging Face labels, aligned with ``input_ids``; the shift happens here.)

    Args:
        model (nn.Module): a Hugging Face ``*ForCausalLM`` (decoder from ``get_decoder()``,
            weight from ``get_output_embeddings()``).
        input_ids (LongTensor): [B, T].
        labels (LongTensor): [B, T] Hugging Face labels (``-100`` on prompt and padding).
        attention_mask (Tensor, optional): [B, T]. Default: None.
        **primitive_options: passed to :func:`linear_logprobs` (e.g. ``backend``).

    Returns:
        Tensor: [B, T] float32 (float64 for a float64 model).
    """
    check_options("token_logprobs", primitive_options)
    if tuple(input_ids.shape) != tuple(labels.shape):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same shape [B, T]")
    head = causal_lm_head(model)
    check_logit_transform(model, head)
    check_text_only(model, input_ids)
    hidden = decoder_hidden(head, input_ids=input_ids, attention_mask=attention_mask)
    check_labels(hidden, labels)
    stats = token_stats(hidden, head.weight, labels, merged_options(head, primitive_options))
    return to_labels_layout(stats.out.logprobs)
