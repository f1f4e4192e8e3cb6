"""Training data: the embedded default (generated arithmetic word problems), user JSONL,
the tokenizer, and batches.

The embedded default is generated deterministically from a seed, so it "ships" as code:
- SFT records ``{"prompt", "completion"}``: a multi-step word problem and its worked answer.
- Preference records ``{"prompt", "chosen", "rejected"}``: the same worked answer, and a copy in
  which one number is wrong (the dense-reward paper's Figure 1 is such a pair): a result
  carried into the next step, or into the final answer, is copied off by 1-3, and the
  arithmetic after it is correct for the wrong number. Spotting the slip needs copying, which
  a 2-layer model learns in a few dozen steps, not arithmetic, which it does not.
- A held-out split drawn from a separate seed.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the training split at first
use and cached (``tokenizer-<hash>.json``), so nothing downloads. Its vocabulary is small
(a few hundred ids); the model's vocabulary (32k by default) is larger, as real LMs pad theirs,
so that the LM head dominates the cost as it does in practice.

Batches hold right-padded ``input_ids``, ``attention_mask`` and Hugging Face ``labels``
(``-100`` on prompt and padding). Preference batches hold B chosen rows, then B rejected rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100
GENERATOR_VERSION = 3  # bump when the generated text changes: it keys the tokenizer cache

NAMES = ["Ada", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kofi",
         "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards",
         "stamps", "cookies", "eggs", "beads"]
# (verb phrase, op): the story step and the arithmetic it implies.
STEPS = [("buys {n} more", "+"), ("finds {n} more", "+"), ("is given {n} more", "+"),
         ("gives away {n}", "-"), ("loses {n}", "-"), ("eats {n}", "-"),
         ("doubles the pile", "*2"), ("triples the pile", "*3")]


class DataError(ValueError):
    """A problem with the user's data; the message names the file and line."""


# ---------------------------------------------------------------------------------------------
# The embedded default
# ---------------------------------------------------------------------------------------------

def _problem(rng: random.Random, num_steps: int):
    """One word problem: (prompt, correct answer lines, values, operations)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = value = rng.randint(2, 20)
    story = [f"{name} has {value} {item}."]
    ops = []
    for _ in range(num_steps):
        phrase, op = rng.choice(STEPS)
        if op == "-" and value < 2:
            phrase, op = STEPS[0]
        n = rng.randint(1, value - 1) if op == "-" else rng.randint(1, 12)
        if op.startswith("*") and value > 60:
            phrase, op, n = STEPS[0][0], "+", rng.randint(1, 12)
        story.append(f"Then {name} {phrase.format(n=n)}.")
        ops.append((op, n))
        value = _apply(value, op, n)
    prompt = ("Question: " + " ".join(story) + f" How many {item} does {name} have now?\n"
              "Answer:")
    return prompt, start, ops, item


def _apply(value: int, op: str, n: int) -> int:
    if op == "+":
        return value + n
    if op == "-":
        return value - n
    return value * int(op[1:])


def _worked(start: int, ops, item: str, slip: int | None = None, delta: int = 0) -> str:
    """The worked answer. With ``slip = i`` one number is copied wrong: the first operand of
    step ``i`` (or, for ``i == len(ops)``, the final answer) is off by ``delta``, and the
    arithmetic after it is done correctly on the wrong number, as a model that slipped would."""
    lines, value = [], start
    for i, (op, n) in enumerate(ops):
        value += delta if i == slip else 0
        shown = f"{value} {op if op in '+-' else 'x'} {n if op in '+-' else op[1:]}"
        value = _apply(value, op, n)
        lines.append(f" {shown} = {value}.")
    value += delta if slip == len(ops) else 0
    return "".join(lines) + f" The answer is {value} {item}."


def default_records(split: str, kind: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` generated records; ``kind`` is ``"sft"`` or ``"preference"``, ``split``
    ``"train"`` or ``"eval"`` (a disjoint stream of the generator)."""
    rng = random.Random(f"fused-losses/{GENERATOR_VERSION}/{split}/{seed}")
    records = []
    for _ in range(n):
        prompt, start, ops, item = _problem(rng, num_steps=rng.randint(4, 8))
        chosen = _worked(start, ops, item)
        if kind == "sft":
            records.append({"prompt": prompt, "completion": chosen})
            continue
        delta = rng.choice([-3, -2, -1, 1, 2, 3])
        rejected = _worked(start, ops, item, rng.randrange(len(ops) + 1), delta)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


# ---------------------------------------------------------------------------------------------
# User JSONL
# ---------------------------------------------------------------------------------------------

FIELDS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected")}


def read_jsonl(path: str | os.PathLike, kind: str) -> list[dict]:
    """Records of ``kind`` from a JSONL file; a bad line raises ``DataError`` with file:line."""
    want = FIELDS[kind]
    records = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read data file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with keys {list(want)}, "
                            f"got {type(obj).__name__}")
        missing = [k for k in want if k not in obj]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}; a {kind} record needs "
                            f"{list(want)} (got {sorted(obj)})")
        bad = [k for k in want if not isinstance(obj[k], str)]
        if bad:
            raise DataError(f"{where}: key(s) {bad} must be strings")
        records.append({k: obj[k] for k in want})
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_records(data: str | None, eval_data: str | None, kind: str, train_size: int,
                 eval_size: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out) records: ``data`` (its last ``eval_size`` records held out unless
    ``eval_data`` is given) or the embedded default; at most ``eval_size`` held out."""
    if data:
        records = read_jsonl(data, kind)
        if eval_data:
            held_out = read_jsonl(eval_data, kind)
        else:
            if len(records) <= eval_size:
                raise DataError(f"{data}: {len(records)} records leave none for training "
                                f"after holding out --eval-size {eval_size}")
            records, held_out = records[:-eval_size], records[-eval_size:]
    else:
        records = default_records("train", kind, train_size)
        held_out = (read_jsonl(eval_data, kind) if eval_data
                    else default_records("eval", kind, eval_size))
    return records, held_out[:eval_size]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("FUSED_LOSSES_CACHE", Path.home() / ".cache" / "fused_losses"))


def embedded_tokenizer(cache_dir: str | os.PathLike | None = None, vocab_size: int = 1024):
    """A byte-level BPE trained on the default training text, cached after the first call."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256(f"{GENERATOR_VERSION}/{vocab_size}".encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / f"tokenizer-{key}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [r["prompt"] + r["rejected"] for r in default_records("train", "preference", 3000)]
    tok.train_from_iterator(corpus, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent first uses (torchrun ranks) never see half a file
    return tok


@dataclass
class Encoder:
    """Text -> ids for either a ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    tokenizer: object
    eos_id: int
    pad_id: int

    @classmethod
    def make(cls, tokenizer) -> "Encoder":
        if hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer
            return cls(tokenizer, tokenizer.token_to_id("<eos>"), tokenizer.token_to_id("<pad>"))
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(tokenizer, eos, pad)

    def encode(self, text: str) -> list[int]:
        if hasattr(self.tokenizer, "token_to_id"):
            return self.tokenizer.encode(text).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; ids past the tokenizer's vocabulary (a model's padded vocabulary
        can sample them) decode to nothing."""
        known = [i for i in ids if 0 <= i < self.vocab_size]
        if hasattr(self.tokenizer, "token_to_id"):
            return self.tokenizer.decode(known)
        return self.tokenizer.decode(known, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        if hasattr(self.tokenizer, "get_vocab_size"):
            return self.tokenizer.get_vocab_size()
        return len(self.tokenizer)


# ---------------------------------------------------------------------------------------------
# Encoding with an explicit too-long policy
# ---------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """Token rows of one split: ``rows[i]`` is a tuple of (ids, num_prompt_tokens), one per
    response (1 for SFT, 2 for preference: chosen then rejected)."""

    rows: list[tuple[tuple[list[int], int], ...]]
    counts: dict = field(default_factory=dict)  # records kept / truncated / dropped
    # Optional precomputed reference log-probs, one [len(ids)] tensor per row (labels layout).
    ref: list[tuple[torch.Tensor, ...]] | None = None


# The responses of a record of each kind: one row each, in this order.
RESPONSES = {"sft": ("completion",), "preference": ("chosen", "rejected")}


def encode_records(records: list[dict], kind: str, enc: Encoder, max_length: int,
                   too_long: str) -> Encoded:
    """Tokenize; a record longer than ``max_length`` is truncated, dropped or an error as
    ``too_long`` says, and counted. Truncation cuts the end of the response; a record whose
    prompt leaves no response token is dropped (counted as such) whatever the policy."""
    responses = RESPONSES[kind]
    out, truncated, dropped = [], 0, 0
    for index, record in enumerate(records):
        prompt = enc.encode(record["prompt"])
        seqs = [prompt + enc.encode(record[key]) + [enc.eos_id] for key in responses]
        longest = max(len(s) for s in seqs)
        if longest > max_length:
            if too_long == "error":
                raise DataError(f"record {index}: {longest} tokens > --max-length {max_length} "
                                "(choose --too-long truncate or drop)")
            if too_long == "drop" or len(prompt) >= max_length:
                dropped += 1
                continue
            truncated += 1
            seqs = [s[:max_length] for s in seqs]
        out.append(tuple((s, len(prompt)) for s in seqs))
    if not out:
        raise DataError(f"every record was dropped as longer than --max-length {max_length}")
    return Encoded(out, {"records": len(records), "kept": len(out), "truncated": truncated,
                         "dropped": dropped})


# ---------------------------------------------------------------------------------------------
# Batches: a stateless function of the global batch index, so resuming needs only that index
# ---------------------------------------------------------------------------------------------

def batch_indices(num_rows: int, batch_size: int, index: int, seed: int) -> list[int]:
    """Record indices of global batch ``index``: epochs of a seeded permutation, the last
    partial batch of each epoch dropped so every batch has ``batch_size`` records."""
    per_epoch = num_rows // batch_size
    if per_epoch == 0:
        raise DataError(f"{num_rows} records are fewer than --batch-size {batch_size}")
    epoch, within = divmod(index, per_epoch)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))
    return order[within * batch_size:(within + 1) * batch_size].tolist()


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; preference rows are all chosen responses first, then rejected."""
    width = len(data.rows[indices[0]])
    seqs = [data.rows[i][k] for k in range(width) for i in indices]
    length = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, (ids, num_prompt) in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, num_prompt:len(ids)] = torch.tensor(ids[num_prompt:])
        mask[row, :len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if data.ref is not None:
        ref = torch.zeros((len(seqs), length), dtype=torch.float32)
        for row, values in enumerate(data.ref[i][k] for k in range(width) for i in indices):
            ref[row, :values.numel()] = values
        batch["ref_logprobs"] = ref
    return batch


def split_rows(batch: dict[str, torch.Tensor], parts: int, part: int, width: int):
    """Part ``part`` of ``parts`` equal slices of a batch, by record: a record's ``width`` rows
    (a preference record's chosen row in the first half, its rejected row in the second) stay
    together."""
    records = batch["input_ids"].shape[0] // width
    size = records // parts
    take = [k * records + i for k in range(width) for i in range(part * size, (part + 1) * size)]
    idx = torch.tensor(take)
    return {k: v.index_select(0, idx) for k, v in batch.items()}
