"""Training objectives as functions of the primitive's per-token outputs (``objectives.md``)."""
from ._common import LossOutput
from .dil import DIL_LOSSES, dil_loss
from .distill import distill_loss
from .dpo import DPO_LOSSES, dpo_loss
from .grpo import TOKEN_WEIGHTS, grpo_loss, ppo_loss
from .ift import ift_loss
from .kto import KTO_LOSSES, kto_loss, mismatched_pairs
from .logprobs import token_logprobs
from .ref_free import cpo_loss, orpo_loss, simpo_loss
from .reinforce import reinforce_loss, token_rewards
from .render import render_token_rewards
from .sft import DIVERGENCES, phi_safe, sft_loss

__all__ = [
    "LossOutput", "sft_loss", "dpo_loss", "simpo_loss", "orpo_loss", "cpo_loss", "dil_loss",
    "ift_loss", "reinforce_loss", "token_rewards", "token_logprobs", "render_token_rewards",
    "phi_safe", "DIVERGENCES", "DPO_LOSSES", "DIL_LOSSES",
]
__all__ += ["distill_loss"]
__all__ += ["grpo_loss", "ppo_loss", "TOKEN_WEIGHTS", "kto_loss", "mismatched_pairs",
            "KTO_LOSSES"]
