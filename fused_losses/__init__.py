"""fused-losses: token-log-prob training objectives on a fused LM-head primitive.

The ``[tokens x vocab]`` logits are never materialised: see :func:`linear_logprobs`.
"""
from .cross_entropy import linear_cross_entropy
from .primitive import LogProbs, linear_logprobs

__all__ = ["LogProbs", "linear_logprobs", "linear_cross_entropy"]
__version__ = "0.1.0"
