"""Drop-ins where users already train: any Hugging Face causal LM (``hf``) and TRL's
fused-LM-head protocol (``trl``). They sit above the primitive and the objectives and use
their public functions only."""
from .hf import add_fused_lm_head, is_patched, patch_causal_lm, patch_trainer, unpatch_causal_lm
from .trl import FusedCausalLMOutput

__all__ = ["patch_causal_lm", "unpatch_causal_lm", "is_patched", "FusedCausalLMOutput",
           "add_fused_lm_head", "patch_trainer"]
