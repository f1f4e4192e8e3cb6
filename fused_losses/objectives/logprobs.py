"""Per-token log-probs of a Hugging Face causal LM, fused: the decoder's hidden states and
the output embedding go to the primitive, so the model's ``[B, T, V]`` logits never exist."""
from __future__ import annotations

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
    hidden = decoder_hidden(head, input_ids=input_ids, attention_mask=attention_mask)
    check_labels(hidden, labels)
    stats = token_stats(hidden, head.weight, labels, merged_options(head, primitive_options))
    return to_labels_layout(stats.out.logprobs)
