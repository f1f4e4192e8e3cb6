"""A small HTML page that colours each token by its reward, as Figure 1 of the dense-reward
paper does, so a person can see where the credit went."""
from __future__ import annotations

import html
import os
from typing import Sequence

import torch

_STYLE = ("body{font-family:ui-monospace,Menlo,monospace;max-width:60em;margin:2em auto}"
          ".seq{line-height:1.9;margin:1em 0;padding:.5em;border:1px solid #ddd}"
          ".tok{white-space:pre-wrap;border-radius:2px}.legend span{padding:0 .6em}")


def _colour(value: float, scale: float) -> str:
    """Diverging: red for reward above 0 (darker = higher), blue below, white at 0."""
    strength = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    fade = round(255 * (1 - strength))
    return f"rgb(255,{fade},{fade})" if value >= 0 else f"rgb({fade},{fade},255)"


def render_token_rewards(
    tokens: Sequence[Sequence[str]],
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    title: str = "Token rewards",
    path: str | os.PathLike | None = None,
) -> str:
    """An HTML page with one block per sequence, each token's background set by its reward.

    Args:
        tokens (list of list of str): [B][T] token strings (e.g. from
            ``tokenizer.convert_ids_to_tokens``, or one decoded token per id).
        rewards (Tensor): [B, T] (or [T]) rewards in the same layout, e.g. from
            :func:`token_rewards`.
        mask (Tensor, optional): [B, T] bool; tokens where it is False (prompt, padding) are
            shown uncoloured. Default: every token is coloured.
        title (str): the page's heading. Default: "Token rewards".
        path (str, optional): also write the page to this file. Default: None.

    Returns:
        str: the HTML document. Colour intensity is ``|r| / max |r|`` over the page's
        coloured tokens; hovering a token shows its reward.
    """
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() not in (1, 2):
        got = f"shape {tuple(rewards.shape)}" if isinstance(rewards, torch.Tensor) \
            else type(rewards).__name__
        raise TypeError(f"rewards must be a tensor [B, T] (or [T]), got {got}")
    if mask is not None and (not isinstance(mask, torch.Tensor)
                             or tuple(mask.shape) != tuple(rewards.shape)):
        raise ValueError(f"mask must be a tensor of the shape of rewards "
                         f"{tuple(rewards.shape)}, got "
                         f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
    rewards = rewards.detach().double().cpu()
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(0)
        tokens = [tokens] if tokens and isinstance(tokens[0], str) else tokens
    keep = torch.ones_like(rewards, dtype=torch.bool) if mask is None \
        else mask.detach().cpu().reshape(rewards.shape).bool()
    if not bool(torch.isfinite(rewards[keep]).all()):  # it would set the colour scale
        raise ValueError("rewards must be finite where they are shown (mask on); got NaN or "
                         "inf there")
    if len(tokens) != rewards.shape[0] or any(len(row) != rewards.shape[1] for row in tokens):
        raise ValueError(f"tokens must be [B][T] = [{rewards.shape[0]}][{rewards.shape[1]}] to "
                         f"match rewards, got {len(tokens)} rows of lengths "
                         f"{[len(row) for row in tokens]}")
    scale = float(rewards[keep].abs().max()) if bool(keep.any()) else 0.0
    blocks = []
    for row, values, shown in zip(tokens, rewards.tolist(), keep.tolist()):
        spans = []
        for token, value, on in zip(row, values, shown):
            text = html.escape(str(token))
            if on:
                spans.append(f'<span class="tok" style="background:{_colour(value, scale)}" '
                             f'title="{value:+.4f}">{text}</span>')
            else:
                spans.append(f'<span class="tok">{text}</span>')
        blocks.append(f'<div class="seq">{"".join(spans)}</div>')
    legend = (f'<p class="legend">reward: <span style="background:{_colour(-scale, scale)}">'
              f'{-scale:+.3f}</span><span>0</span><span style="background:'
              f'{_colour(scale, scale)}">{scale:+.3f}</span></p>')
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{legend}{''.join(blocks)}</body></html>\n")
    if path is not None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(page)
    return page
