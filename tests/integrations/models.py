"""Tiny random-weight Hugging Face models built from configs (no downloads), one per way a
model can place or transform its LM head, and a reference loss on materialised logits."""
import torch
import torch.nn.functional as F

from tests.objectives.models import VOCAB, lm_batch, tiny_model

_COMMON = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
IMAGE_TOKEN = VOCAB - 1


def _llava():
    """A vision-language wrapper: the LM head sits on the wrapper, the text backbone inside."""
    import transformers as tf

    vision = tf.CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, image_size=8, patch_size=4)
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=vision, text_config=tf.LlamaConfig(**_COMMON),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1))


def _from_config(name, **extra):
    import transformers as tf

    config = getattr(tf, f"{name}Config")(**_COMMON, **extra)
    return getattr(tf, f"{name}ForCausalLM")(config)


BUILDERS = {
    "cohere": lambda: _from_config("Cohere", logit_scale=0.25),  # multiplies, tied head
    "granite": lambda: _from_config("Granite", logits_scaling=4.0),  # divides
    "mixtral": lambda: _from_config("Mixtral", num_local_experts=4, num_experts_per_tok=2,
                                    output_router_logits=True, router_aux_loss_coef=0.5),
    "llava": _llava,
    # lm_head_multiplier: a logit scale that causal_lm_head does not read from the config
    "falcon_h1": lambda: _from_config("FalconH1", lm_head_multiplier=0.5, mamba_d_ssm=16,
                                      mamba_n_heads=2, mamba_d_head=8, mamba_d_state=8,
                                      mamba_n_groups=1),
}
# llama, qwen2, gemma2 (final_logit_softcapping) come from the objectives' tests.
ARCHS = ["llama", "llama_tied", "qwen2", "gemma2", "cohere", "granite", "mixtral", "llava"]


def build(arch: str, seed: int = 0):
    """A float64 model in eval mode (no dropout), the same weights for the same seed."""
    if arch in ("llama", "qwen2", "gemma2"):
        return tiny_model(arch, seed=seed)
    if arch == "llama_tied":
        return tiny_model("llama", tie=True, seed=seed)
    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    text_config = model.config.get_text_config()
    text_config._attn_implementation = "eager"
    text_config._experts_implementation = "eager"  # grouped_mm has no float64
    model = model.double().eval()
    with torch.no_grad():  # peaked, not flat, distributions
        model.get_output_embeddings().weight.mul_(8)
    return model


def model_inputs(arch: str, batch=3, length=9, seed=0):
    """(kwargs for the model without labels, HF labels [B, T])."""
    input_ids, labels, attention_mask = lm_batch(batch, length, seed)
    input_ids = input_ids.clamp(max=IMAGE_TOKEN - 1)
    labels = labels.clamp(max=IMAGE_TOKEN - 1)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if arch == "llava":  # 4 image tokens after the first one, and their pixels
        input_ids[:, 1:5] = IMAGE_TOKEN
        labels[:, 1:5] = -100
        inputs["pixel_values"] = torch.randn(batch, 3, 8, 8, dtype=torch.float64,
                                             generator=torch.Generator().manual_seed(seed))
    return inputs, labels


class Wrapper(torch.nn.Module):
    """Like DDP: the model as ``.module``, its forward calls it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def next_token_targets(labels):
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def hf_loss(logits, labels, num_items_in_batch=None, shift_labels=None):
    """Hugging Face's causal-LM loss in float64 on materialised [B, T, V] logits."""
    targets = next_token_targets(labels) if shift_labels is None else shift_labels
    total = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            reduction="sum")
    count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / count
