"""Verifiable rewards for GRPO on arithmetic word problems (the embedded default, or any
prompt/completion JSONL whose completions end in their answer).

A sampled completion earns:

- ``CORRECT`` (1.0) when its final number (the last integer in it) is the answer;
- else ``FORMAT`` (0.2) when it states an answer the trained way, "The answer is <integer>";
- else ``NUMBER`` (0.05) when it holds any integer at all;
- else 0.

The answer of a problem is the final number of its reference completion. The partial credits
reward the form a model must produce before it can be right; the smallest also spreads an
untrained model's rewards within a group, so its advantages are not all zero.
"""
from __future__ import annotations

import re

CORRECT, FORMAT, NUMBER = 1.0, 0.2, 0.05
_INTEGER = re.compile(r"-?\d+")
_STATED = re.compile(r"The answer is -?\d+")


def final_number(text: str) -> int | None:
    """The last integer written in ``text``, or None."""
    numbers = _INTEGER.findall(text)
    return int(numbers[-1]) if numbers else None


def reward(completion: str, answer: int | None) -> float:
    """The reward of one completion for a problem whose answer is ``answer``."""
    stated = final_number(completion)
    if stated is not None and stated == answer:
        return CORRECT
    if _STATED.search(completion):
        return FORMAT
    return NUMBER if stated is not None else 0.0
