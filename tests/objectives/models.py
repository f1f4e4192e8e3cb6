"""Tiny randomly initialised Hugging Face causal LMs (no downloads), float64, and a batch
with ragged prompts and right padding."""
import torch

VOCAB = 67


def tiny_model(arch: str, tie: bool = False, seed: int = 0):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                  tie_word_embeddings=tie)
    if arch == "llama":
        config, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "gemma2":  # final_logit_softcapping -> the primitive's softcap
        config = tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0,
                                 query_pre_attn_scalar=8, sliding_window=4)
        cls = tf.Gemma2ForCausalLM
    else:
        raise KeyError(arch)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).double().eval()
    with torch.no_grad():  # spread the head so logits are peaked, not flat
        model.get_output_embeddings().weight.mul_(20)
    return model


def lm_batch(B=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    labels = input_ids.clone()
    for b in range(B):
        labels[b, : 2 + b % 2] = -100  # prompt
        pad = b  # right padding of b tokens
        if pad:
            attention_mask[b, T - pad:] = 0
            labels[b, T - pad:] = -100
            input_ids[b, T - pad:] = 0
    return input_ids, labels, attention_mask


class HeadNeverCalled:
    """Context manager: fail if the model's output embedding module ever makes [..., V]
    logits (the one-token probe of its logit transform returns 8 values, not V)."""

    def __init__(self, model):
        self.head = model.get_output_embeddings()

    def __enter__(self):
        def hook(module, args, output):
            if output.shape[-1] == module.weight.shape[0]:
                raise AssertionError("the LM head ran: logits were materialised")
        self.handle = self.head.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
