"""What every recipe shares: the ``Recipe`` table, the model pieces both implementations use,
frozen models and their log-probs, and the unfused path's materialised statistics.

The unfused path is an independent, naive implementation of ``objectives.md``: full logits
``[B, T, V]`` at every position (prompt and padding included, as a Hugging Face forward forms
them), ``log_softmax``, gather, then the objective's math written out from the contract. It
works in the prediction layout (column t holds the statistics of the logits at hidden position
t, which predict ``labels[:, t+1]``), so column 0 of the labels, which no position predicts,
can never be counted.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Protocol

import torch
import torch.nn.functional as F

import fused_losses
from fused_losses.objectives.logprobs import causal_lm_head, check_logit_transform, merged_options
from fused_losses.reference import reference_logits

from .. import data as D
from ..distributed import Processes, barrier
from ..errors import TrainError
from ..fileio import write_atomically
from ..sampling import BatchSource, dataset_batches


IGNORE = D.IGNORE

# (policy, batch, ctx) -> (loss divided by ctx["num_items"], metrics of this micro-batch)
LossStep = Callable[[torch.nn.Module, dict, dict], tuple[torch.Tensor, dict]]


class ObjectiveState(Protocol):
    """State an objective carries across steps (e.g. bco_pair's running δ); checkpointed."""

    def values(self) -> dict:
        """Keyword arguments the loss step reads from its ``ctx``."""

    def update(self, metrics: dict[str, torch.Tensor]) -> None:
        """Fold in one training micro-batch's metrics (called after its forward)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Stateless:
    """The state of an objective that carries none."""

    def values(self) -> dict:
        return {}

    def update(self, metrics) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _no_models(cfg, lm, opts) -> dict:
    return {}


def _no_context(models, batch, impl, opts) -> dict:
    return {}


def _stateless(opts) -> ObjectiveState:
    return Stateless()


def _no_problems(cfg) -> list[str]:
    return []


def _no_option_problems(opts) -> list[str]:
    return []


@dataclass(frozen=True)
class Recipe:
    """Everything the trainer knows about one objective: a table of small functions.

    The loop calls these and nothing objective-specific: ``frozen`` once at set-up,
    ``sampler`` once, ``context`` and the loss step per micro-batch, ``items`` per step,
    ``state`` once (then ``update`` per training micro-batch, ``state_dict`` per checkpoint).
    """

    objective: Callable  # the library function: its signature checks --loss-kwargs, gives defaults
    data: str  # record kind read and batched (a key of data.RESPONSES)
    fused: Callable[[dict], LossStep]  # options -> the fused loss step
    unfused: Callable[[dict], LossStep]  # options (defaults filled in) -> the materialised step
    unfused_options: frozenset[str]  # options the unfused step implements
    items: Callable[[dict, dict], int]  # (batch, options) -> the loss divisor's count in batch
    frozen: Callable[..., dict] = _no_models  # (cfg, lm, options) -> frozen models by name
    # (models, batch, impl, options) -> ctx
    context: Callable[[dict, dict, str, dict], dict] = _no_context
    state: Callable[[dict], ObjectiveState] = _stateless
    sampler: Callable[..., BatchSource] = dataset_batches  # (cfg, lm, data, enc, procs, options)
    check: Callable[..., list[str]] = _no_problems  # (cfg) -> problems with flags it reads
    own_flags: frozenset[str] = frozenset()  # Config fields only this objective reads: set
    # for another objective they are an error, not silently ignored
    # (options, defaults filled in) -> problems with their values that neither implementation
    # would report before work is done (the materialised twin may not check them at all)
    check_options: Callable[[dict], list[str]] = _no_option_problems
    renames: Mapping[str, str] = field(default_factory=dict)  # flag -> argument (ORPO: beta -> lam)
    provided: frozenset[str] = frozenset()  # arguments the recipe passes itself
    flags: tuple[str, ...] = ()  # Config fields that are also options (grpo: max_completion_length)


# ---------------------------------------------------------------------------------------------
# Model pieces: hidden states from the decoder, head weight from get_output_embeddings()
# ---------------------------------------------------------------------------------------------

def decode(lm, batch, inputs_embeds=None) -> torch.Tensor:
    """Last hidden state [B, T, H] of any transformers causal LM (no head applied)."""
    kwargs = dict(attention_mask=batch["attention_mask"], use_cache=False)
    if inputs_embeds is None:
        kwargs["input_ids"] = batch["input_ids"]
    else:
        kwargs["inputs_embeds"] = inputs_embeds
    return lm.get_decoder()(**kwargs).last_hidden_state


class Head(NamedTuple):
    """The LM head as both implementations apply it to the decoder's hidden states."""

    weight: torch.Tensor  # [V, H] in the hidden states' dtype
    options: dict  # what makes hidden @ weight.T the model's own logits: bias, softcap,
    # temperature (1 / logit scale); the primitive's keywords


def check_head(lm, flag: str) -> None:
    """A model whose logits are more than its decoder, its head and the transform read from
    its config (an unread logit multiplier) is refused, naming the flag that gave it."""
    try:
        check_logit_transform(lm, causal_lm_head(lm))
    except ValueError as err:
        raise TrainError(f"{flag}: {err}") from None


def head(lm, hidden: torch.Tensor) -> Head:
    """The output embedding's weight and the model's own logit transform (its bias, Gemma-2's
    soft-cap, Cohere's and Granite's logit scales: ``causal_lm_head``), so that the loss is
    the one the model defines and matches its frozen copies' ``token_logprobs``. Cast
    (differentiably) to the hidden dtype: under bf16 autocast the decoder returns bf16."""
    pieces = causal_lm_head(lm)
    options = dict(pieces.options)
    if "bias" in options:
        options["bias"] = options["bias"].to(hidden.dtype)
    return Head(pieces.weight.to(hidden.dtype), options)


def shift(labels: torch.Tensor) -> torch.Tensor:
    """Targets in the prediction layout: ``targets[:, t] = labels[:, t+1]``, last ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def to_prediction_layout(values: torch.Tensor) -> torch.Tensor:
    """[B, T] labels layout -> prediction layout (column t takes column t+1; the last is 0)."""
    return F.pad(values[:, 1:], (0, 1))


def to_label_layout(values: torch.Tensor) -> torch.Tensor:
    """[B, T] prediction layout -> labels layout (column 0 is 0)."""
    return F.pad(values[:, :-1], (1, 0))


def scored_rows(batch) -> torch.Tensor:
    """[B] bool: rows with at least one scored token."""
    return (shift(batch["labels"]) != IGNORE).any(-1)


# ---------------------------------------------------------------------------------------------
# Frozen models: references, reward models, the start of a KL penalty
# ---------------------------------------------------------------------------------------------

def frozen_copy(lm):
    """A frozen copy of the policy as it is now."""
    return copy.deepcopy(lm).eval().requires_grad_(False)


def load_frozen(path: str, like, flag: str):
    """A frozen model from a local directory, on ``like``'s device; ``flag`` names the option
    that gave the path in the error."""
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise TrainError(f"{flag} {path!r} is not a model directory")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval() \
        .requires_grad_(False).to(like.device)
    check_head(model, flag)
    return model


@torch.no_grad()
def frozen_logprobs(model, batch, impl: str, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of a frozen model, labels' layout, [B, T] (float32, or the model's
    dtype), computed by the same implementation as the policy's: of the model's own logits
    divided by ``temperature`` (the objective's: a reference is scored at the temperature the
    policy is; reward models at 1)."""
    options = {"temperature": temperature}
    if impl == "fused":
        return fused_losses.token_logprobs(model, batch["input_ids"], batch["labels"],
                                           batch["attention_mask"], **options)
    hidden = decode(model, batch)
    lm_head = head(model, hidden)
    return to_label_layout(materialise(hidden, lm_head.weight, batch["labels"],
                                       **merged_options(lm_head, options)).logp)


def reference_context(models: dict, batch, impl: str, opts: dict) -> dict:
    """``ref_logprobs`` from the batch (precomputed) or from the frozen reference (a
    ``Recipe.context``)."""
    if "ref_logprobs" in batch:
        return {"ref_logprobs": batch["ref_logprobs"]}
    return {"ref_logprobs": frozen_logprobs(models["ref"], batch, impl,
                                            opts.get("temperature", 1.0))}


@torch.no_grad()
def precompute_reference(ref_lm, datasets, out: Path, impl: str, pad_id: int,
                         procs: Processes, temperature: float = 1.0) -> None:
    """Reference log-probs of every row at the objective's ``temperature``, computed once and
    cached in the output directory (keyed by the implementation; the checkpoint's fingerprint
    holds the temperature); each record's rows are padded alone, so the values do not depend
    on which batch a record later lands in."""
    path = out / f"ref_logprobs_{impl}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=False)
        for data, ref in zip(datasets, cached):
            data.ref = ref
        return
    device = next(ref_lm.parameters()).device
    for data in datasets:
        refs = []
        for index in range(len(data.rows)):
            batch = {k: v.to(device) for k, v in D.collate(data, [index], pad_id).items()}
            values = frozen_logprobs(ref_lm, batch, impl, temperature).float().cpu()
            refs.append(tuple(values[k, :len(ids)].clone()
                              for k, (ids, _) in enumerate(data.rows[index])))
        data.ref = refs
    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: torch.save([data.ref for data in datasets], tmp))
    barrier(procs)


# ---------------------------------------------------------------------------------------------
# The unfused path's statistics, prediction layout
# ---------------------------------------------------------------------------------------------

class Materialised(NamedTuple):
    logits: torch.Tensor  # [B, T, V] at every position
    logp: torch.Tensor  # [B, T] log-prob of the target, 0 where not scored
    mask: torch.Tensor  # [B, T] float, 1 where the target is scored

    def lse(self) -> torch.Tensor:
        """[B, T] log-sum-exp of the logits at every position (scored or not)."""
        return torch.logsumexp(self.logits, dim=-1)

    def logits_mean(self) -> torch.Tensor:
        """[B, T] mean logit over the vocabulary at every position."""
        return self.logits.mean(-1)


def materialise(hidden, weight, labels, *, bias=None, temperature: float = 1.0,
                softcap: float | None = None) -> Materialised:
    """Full logits, ``log_softmax`` and the target gather, as users run them without fusion;
    the keywords are a :class:`Head`'s ``options`` (``materialise(h, head.weight, labels,
    **head.options)``)."""
    logits = reference_logits(hidden, weight, bias, temperature=temperature, softcap=softcap)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    targets = shift(labels)
    scored = targets != IGNORE
    log_p = torch.log_softmax(logits, dim=-1)
    logp = log_p.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(scored, logp, torch.zeros_like(logp))
    return Materialised(logits, logp, scored.to(logp.dtype))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions (or rows) where ``mask`` is 1; 0 when there are none."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def sequence_sums(values: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """[B, T] -> [B]: ``S`` (summed over scored tokens) or ``Ā`` (their mean)."""
    total = (values * mask).sum(-1)
    return total / mask.sum(-1).clamp_min(1) if average else total


def suffix_sums(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """``out[:, t] = Σ_{k≥t} γ^{k−t} values[:, k]``, written as the loop it is."""
    out = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        running = values[:, t] + gamma * running
        out[:, t] = running
    return out


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for x < 0, stable on both sides of −log 2."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
