"""Model set-up: the policy from a preset, a config or a directory; frozen copies; the module
that runs the policy and its loss in one ``forward``; peak memory; the final save.

Any transformers causal LM works: hidden states come from ``lm.get_decoder()``, the head
weight from ``lm.get_output_embeddings()``; there is no per-architecture code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .._memory import reset_peak_rss, status_kib
from .errors import TrainError
from .fileio import write_atomically


PRESETS = {
    # Random-weight models built from a config. V = 32000 so that the LM head dominates, as in
    # real LMs; the embedded tokenizer uses the first few hundred ids.
    "tiny-llama": dict(model_type="llama", vocab_size=32000, hidden_size=256,
                       intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=512,
                       tie_word_embeddings=False),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=32000, hidden_size=256,
                       intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False),
    # A larger model of the same vocabulary to distil from (--teacher): `make demo` trains it
    # briefly by SFT first, then distils it into tiny-llama.
    "small-llama": dict(model_type="llama", vocab_size=32000, hidden_size=384,
                        intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                        num_key_value_heads=6, max_position_embeddings=512,
                        tie_word_embeddings=False),
}


def build_model(model: str, model_config: str | None, seed: int):
    """``(lm, tokenizer or None)``: random weights from ``model_config`` (``--model-config``)
    or a preset (seeded, so both implementations start from the same weights), else the local
    directory ``model`` (which may bring its tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    torch.manual_seed(seed)
    if model_config or model in PRESETS:
        spec = dict(PRESETS.get(model, {}))
        if model_config:
            text = model_config
            try:
                spec = json.loads(text if text.lstrip()[:1] in ("{", "[")
                                  else Path(text).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise TrainError(f"--model-config {text!r}: not a readable JSON file or "
                                 f"inline JSON ({err})") from None
        if not isinstance(spec, dict) or "model_type" not in spec:
            raise TrainError("--model-config needs a JSON object with a 'model_type' (e.g. "
                             "\"llama\", \"qwen2\")")
        spec = dict(spec)
        model_type = spec.pop("model_type")
        if model_type not in CONFIG_MAPPING:
            raise TrainError(f"--model-config: unknown model_type {model_type!r} (e.g. "
                             "\"llama\", \"qwen2\", \"mistral\", \"gemma2\")")
        try:
            config = AutoConfig.for_model(model_type, **spec)
            return AutoModelForCausalLM.from_config(config, attn_implementation="eager"), None
        except Exception as err:  # noqa: BLE001 - any failure here is the config's
            reason = " ".join(str(err).split())  # transformers' messages span lines
            raise TrainError(f"--model-config: transformers cannot build this model "
                             f"({type(err).__name__}: {reason[:300]})") from None
    if Path(model).is_dir():
        lm = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
        return lm, _local_tokenizer(model)
    raise TrainError(f"--model {model!r} is neither a local directory nor a preset "
                     f"{sorted(PRESETS)}")


def _local_tokenizer(path: str):
    files = {p.name for p in Path(path).iterdir()}
    if not files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def enable_activation_checkpointing(lm) -> None:
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
        lm.activation_checkpointing_enable({"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class PolicyLoss(torch.nn.Module):
    """The policy and its loss in one ``forward``. DDP and FSDP2 run their hooks around
    ``forward``: calling the loss here means FSDP2 has gathered the full head weight (a plain
    tensor, not a DTensor shard) when the fused loss reads it, and reduces its gradient."""

    def __init__(self, lm, loss_step):
        super().__init__()
        self.lm, self.loss_step = lm, loss_step

    def forward(self, batch, ctx):
        return self.loss_step(self.lm, batch, ctx)


def describe_model(lm) -> dict:
    config = lm.config
    return {"type": config.model_type, "vocab_size": lm.get_output_embeddings().weight.shape[0],
            "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "parameters": sum(p.numel() for p in lm.parameters())}


class Memory:
    """Peak memory of the training, in MB. CUDA: the allocator's peak. CPU: the peak RSS
    (``VmHWM``, reset here) above the RSS once the model is built, plus the model's weights:
    so weights, reference copies, gradients, optimizer state, activations and logits count,
    and the interpreter and the libraries the model class imported do not."""

    def __init__(self, device: torch.device, lm):
        self.device = device
        self.weights_mb = sum(p.numel() * p.element_size() for p in lm.parameters()) / 2**20
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        reset_peak_rss()  # so the peak is this run's (best effort)
        self.base = status_kib("VmRSS")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max(status_kib("VmHWM") - self.base, 0) / 1024 + self.weights_mb


def save_final_model(lm, path: Path, sharded: bool) -> None:
    """The trained weights as a transformers directory (usable as --model or --reward-model);
    not for ``sharded`` (FSDP2) weights, whose full state dict is in checkpoint.pt:
    ``save_pretrained`` needs local tensors."""
    if sharded:
        return
    write_atomically(path, lm.save_pretrained)
