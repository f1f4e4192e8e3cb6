"""Plain SFT on the primitive: cross-entropy with label smoothing, z-loss and
``num_items_in_batch`` (``objectives.md`` §6), never materialising the logits."""
from __future__ import annotations

from typing import Literal

import torch

from .primitive import (Backend, LogProbs, _is_real_number, check_ignore_index,
                        gradients_in_forward_available, linear_logprobs, linear_logprobs_loss,
                        next_token_targets)

REDUCTIONS = ("mean", "sum", "none")


def _token_loss(stats: LogProbs, label_smoothing: float, lse_square_scale: float):
    """Per-token ``-(1-ε)·logp + ε·(lse - mean_v z) + λ·lse²`` (0 at ignored positions)."""
    loss = -(1.0 - label_smoothing) * stats.logprobs
    if label_smoothing:
        loss = loss + label_smoothing * (stats.lse - stats.logits_mean)
    if lse_square_scale:
        loss = loss + lse_square_scale * stats.lse.square()
    return loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
    shift: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: Backend = "auto",
    grad_in_forward: bool | None = None,
    filter_eps: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets``; agrees with
    ``F.cross_entropy(hidden @ weight.T, targets)``.

    The primitive takes aligned targets (``targets[i]`` is predicted from ``hidden[i]``);
    ``shift=True`` takes Hugging Face labels aligned with the inputs instead, as the
    objectives do: ``hidden[..., t, :]`` predicts ``targets[..., t + 1]``, the same as
    ``F.cross_entropy(logits[..., :-1, :], labels[..., 1:])``. The shift moves the targets
    only; ``hidden`` is never copied.

    Per token: ``-(1-ε)·log p(y) + ε·(lse - mean_v z) + λ·lse²`` with ε = ``label_smoothing``
    (the same smoothing as ``F.cross_entropy``) and λ = ``lse_square_scale`` (z-loss).

    Args:
        hidden (Tensor): [..., H]; float32, bfloat16 or float16.
        weight (Tensor): [V, H]; dtypes may mix and autocast applies, as in
            :func:`fused_losses.linear_logprobs`.
        targets (LongTensor): [...]; aligned with ``hidden`` (no shift), or with
            ``shift=True`` Hugging Face labels [..., T] for ``hidden`` [..., T, H].
        bias (Tensor, optional): [V]. Default: None.
        ignore_index (int): ignored targets cost nothing and count for nothing. Default: -100.
        reduction (str): ``"mean"`` over scored tokens, ``"sum"`` or ``"none"`` (per-token
            float32, shaped like ``targets``). All tokens ignored gives 0, not NaN.
            Default: "mean".
        shift (bool): ``targets`` are Hugging Face labels: score ``targets[..., 1:]`` from
            ``hidden[..., :-1, :]``. With ``reduction="none"`` the result is [..., T - 1].
            Default: False.
        num_items_in_batch (int or Tensor, optional): divide the summed loss by this count
            instead (correct normalisation under gradient accumulation); with ``"mean"`` or
            ``"sum"``. Default: None.
        label_smoothing (float): in [0, 1]. Default: 0.0.
        lse_square_scale (float): >= 0, z-loss weight. Default: 0.0.
        temperature (float), softcap (float, optional), backend (str), filter_eps,
            chunk_size: as in :func:`fused_losses.linear_logprobs`.
        grad_in_forward (bool, optional): for ``"mean"``/``"sum"`` the upstream gradient is
            known in forward, so gradients can be formed in the same pass as the loss (3
            matmuls instead of 4, as Liger does). The trade-off: dW ([V, H]) is then held from
            forward until backward, on top of the weight's own gradient buffer, and on
            "cublas"/"triton" an fp32 [V, H] accumulator and a [1024, V] fp32 chunk while the
            pass runs (benchmarks/notes.md, G5). Default (None): on wherever the backend has
            a one-pass path (every registered backend).

    Returns:
        Tensor: scalar float32, or per-token [...] float32 for ``reduction="none"``
        ([..., T - 1] with ``shift=True``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (_is_real_number(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not (_is_real_number(lse_square_scale) and 0.0 <= lse_square_scale < float("inf")):
        raise ValueError(f"lse_square_scale must be a finite number >= 0, got "
                         f"{lse_square_scale!r}")
    if num_items_in_batch is not None:
        if reduction == "none":
            raise ValueError("num_items_in_batch divides a summed loss; it needs "
                             "reduction='mean' or 'sum', got reduction='none'")
        check_item_count("num_items_in_batch", num_items_in_batch)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    check_ignore_index(ignore_index)  # before it meets targets in a comparison
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be a bool, got {shift!r}")
    if shift:
        targets = _shift_labels(targets, ignore_index)
    primitive_options = dict(ignore_index=ignore_index, temperature=temperature,
                             softcap=softcap, backend=backend, filter_eps=filter_eps,
                             chunk_size=chunk_size)
    scale = _scale(reduction, num_items_in_batch, (targets != ignore_index).sum())

    if grad_in_forward is not None and not isinstance(grad_in_forward, bool):
        raise TypeError(f"grad_in_forward must be None or a bool, got {grad_in_forward!r}")
    if reduction == "none" or not _use_grad_in_forward(grad_in_forward, backend, hidden, weight,
                                                       bias):
        stats = linear_logprobs(hidden, weight, targets, bias, return_lse=True,
                                return_logits_mean=label_smoothing > 0, **primitive_options)
        per_token = _token_loss(stats, label_smoothing, lse_square_scale)
        if reduction == "none":
            return per_token[..., :-1] if shift else per_token
        return _scaled(per_token.sum(), scale)

    def chunk_loss(stats: LogProbs, positions: torch.Tensor) -> torch.Tensor:
        return _scaled(_token_loss(stats, label_smoothing, lse_square_scale).sum(), scale)

    return linear_logprobs_loss(hidden, weight, targets, chunk_loss, bias,
                                return_logits_mean=label_smoothing > 0, **primitive_options)


def _shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``next_token_targets`` of Hugging Face labels [..., T] with T >= 1."""
    if labels.dim() < 1 or labels.shape[-1] < 1:
        raise ValueError(f"targets (shape {tuple(labels.shape)}): shift=True expects Hugging "
                         "Face labels [..., T] with T >= 1")
    return next_token_targets(labels, ignore_index)


def _use_grad_in_forward(requested: bool | None, backend: str, hidden, weight, bias) -> bool:
    """Gradients in forward only when some gradient is wanted at all: under ``no_grad`` (or
    with no input requiring one) the loss is a forward pass and nothing more."""
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (hidden, weight, bias))
    if requested is False or not needs_grad:
        return False
    if torch.compiler.is_compiling():  # one custom op, recompute in backward
        return False
    return requested or gradients_in_forward_available(backend, hidden.device)


def check_item_count(name: str, value) -> None:
    """A positive count: an int, or a one-element tensor (Hugging Face passes one).

    A tensor's value is checked where that costs no host synchronisation (on the CPU); on an
    accelerator a device-side assert checks it without stopping the host.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a positive count (an int or a one-element real "
                             f"tensor), got a tensor of shape {tuple(value.shape)} and dtype "
                             f"{value.dtype}")
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(value > 0):
                raise ValueError(f"{name} must be > 0, got {value.item()!r}")
        else:
            torch._assert_async((value > 0).reshape(()), f"{name} must be > 0")
        return
    if not _is_real_number(value):
        raise TypeError(f"{name} must be a positive count (an int or a one-element tensor), "
                        f"got {value!r} ({type(value).__name__})")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _scaled(total: torch.Tensor, scale) -> torch.Tensor:
    """``total * scale`` in total's dtype: two 0-dim tensors would promote to float64."""
    return total * (scale.to(total.dtype) if isinstance(scale, torch.Tensor) else scale)


def _scale(reduction: str, num_items_in_batch, num_scored):
    # 1/count of an integer tensor would be float32 (a 3e-8 error in a float64 loss): the
    # scale is float64, cast to the loss's own dtype by _scaled.
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):  # [] or [1]: a scalar loss either way
            return 1.0 / num_items_in_batch.reshape(()).double()
        return 1.0 / num_items_in_batch
    if reduction == "mean":
        return 1.0 / num_scored.clamp(min=1).double()  # all ignored: a zero loss, not 0/0
    return 1.0
