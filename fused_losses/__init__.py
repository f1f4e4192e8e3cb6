"""fused-losses: token-log-prob training objectives on a fused LM-head primitive.

The ``[tokens x vocab]`` logits are never materialised: see :func:`linear_logprobs`.
"""
from .backends import BACKENDS
from .cross_entropy import linear_cross_entropy
from .divergence import DivergenceOutput, linear_divergence, linear_divergence_loss
from .modules import (FusedCPOLoss, FusedDILLoss, FusedDistillLoss, FusedDPOLoss, FusedGRPOLoss,
                      FusedIFTLoss, FusedKTOLoss, FusedLoss, FusedORPOLoss, FusedPPOLoss,
                      FusedReinforceLoss, FusedSFTLoss, FusedSimPOLoss)
from .objectives import (LossOutput, cpo_loss, dil_loss, distill_loss, dpo_loss, grpo_loss,
                         ift_loss, kto_loss, mismatched_pairs, orpo_loss, ppo_loss,
                         reinforce_loss, render_token_rewards, sft_loss, simpo_loss,
                         token_logprobs, token_rewards)
from .primitive import LogProbs, linear_logprobs_loss
from .vocab_parallel import linear_logprobs

# The primitives
__all__ = ["LogProbs", "linear_logprobs", "linear_logprobs_loss", "linear_cross_entropy",
           "BACKENDS", "linear_divergence", "linear_divergence_loss", "DivergenceOutput"]
# The objectives and their modules
__all__ += ["LossOutput", "sft_loss", "dpo_loss", "simpo_loss", "orpo_loss", "cpo_loss",
            "dil_loss", "ift_loss", "reinforce_loss", "grpo_loss", "ppo_loss", "kto_loss",
            "distill_loss", "token_rewards", "token_logprobs", "render_token_rewards",
            "mismatched_pairs"]
__all__ += ["FusedLoss", "FusedSFTLoss", "FusedDPOLoss", "FusedSimPOLoss", "FusedORPOLoss",
            "FusedCPOLoss", "FusedDILLoss", "FusedIFTLoss", "FusedReinforceLoss",
            "FusedGRPOLoss", "FusedPPOLoss", "FusedKTOLoss", "FusedDistillLoss"]
# Integrations
__all__ += ["patch_causal_lm", "unpatch_causal_lm"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The Hugging Face integration imports transformers (~1 s): loaded on first use.
    if name in ("patch_causal_lm", "unpatch_causal_lm"):
        from .integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'fused_losses' has no attribute {name!r}")
