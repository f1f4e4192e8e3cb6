"""Tiny random-weight models, a word-level tokenizer and embedded data for the examples:
no downloads, seconds on a CPU. Replace them with ``AutoModelForCausalLM.from_pretrained``,
``AutoTokenizer.from_pretrained`` and your data set; nothing else in an example changes."""
import torch
import transformers

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = SPECIAL + [str(n) for n in range(20)] + ["what", "is", "plus", "minus", "?"]


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``WORDS`` (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>")


def model(arch: str = "llama", seed: int = 0, **config) -> transformers.PreTrainedModel:
    """A 2-layer causal LM with random weights from its config (``arch``: any
    ``transformers`` name with a ``<Name>Config`` and ``<Name>ForCausalLM``)."""
    name = {"llama": "Llama", "qwen2": "Qwen2", "gemma2": "Gemma2"}.get(arch, arch)
    settings = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2, **config)
    if name == "Gemma2":
        settings.setdefault("head_dim", 8)
    torch.manual_seed(seed)
    built = getattr(transformers, f"{name}ForCausalLM")(
        getattr(transformers, f"{name}Config")(**settings))
    built.config._attn_implementation = "eager"  # identical on every machine
    return built


def _sums(count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, 10, (count, 2), generator=g).tolist()
    return [(a, b, a + b) for a, b in pairs]


def texts(count: int = 32, seed: int = 0) -> list[str]:
    """Plain-text examples for language modelling: ``"what is 3 plus 4 ? 7"``."""
    return [f"what is {a} plus {b} ? {c}" for a, b, c in _sums(count, seed)]


def prompt_completions(count: int = 32, seed: int = 0) -> list[dict]:
    """``{"prompt", "completion"}`` pairs: the loss goes on the completion only."""
    return [{"prompt": f"what is {a} plus {b} ?", "completion": f" {c}"}
            for a, b, c in _sums(count, seed)]


def preferences(count: int = 16, seed: int = 0) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` triples: the right sum against an off-by-one."""
    return [{"prompt": f"what is {a} plus {b} ?", "chosen": f" {c}",
             "rejected": f" {(c + 1) % 20}"} for a, b, c in _sums(count, seed)]
