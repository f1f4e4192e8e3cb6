"""``fused-losses plan``: per-GPU training memory, unfused vs fused loss, and what fits.

    fused-losses plan --model llama3-8b --seq-len 32768 --micro-batch 1 --gpus 8 \\
        --gpu-mem 80 --objective dpo --fsdp --activation-checkpointing --plot plan.png

The estimate is a sum of analytic terms per GPU (bytes), peak taken over the phases of one
step (reference forward, policy forward + head backward, decoder backward)::

    static  = parameters + gradients + optimizer state + FSDP buffers + reference weights
    policy  = stored activations + max(loss/head, one decoder layer's backward)
    peak    = static + max(policy, reference forward)

- parameters / gradients / optimizer: ``--precision mixed`` keeps fp32 parameters and fp32
  gradients with fp32 AdamW moments (16 B/param, the ZeRO paper's count); ``bf16`` keeps bf16
  parameters and gradients and bf16 moments (8 B/param). ``--optimizer adamw-8bit`` stores
  2 B/param of moments, ``sgd`` none. Divided by ``--tp`` and, with ``--fsdp``, by the
  data-parallel size ``gpus / tp`` (ZeRO-3 / FSDP2 ``fully_shard``); offload is not modelled.
- FSDP buffers: two decoder layers gathered in bf16 (current + prefetch), the root unit
  (embeddings + head) gathered for the whole step, and one layer's unsharded gradient.
  Without FSDP under mixed precision, a bf16 working copy of all weights (autocast's cache).
- activations: a Llama-style decoder layer with fused SDPA attention (no ``T^2`` scores)
  and Hugging Face eager RMSNorm/SwiGLU (:func:`layer_activation_bytes`); with
  ``--activation-checkpointing`` only each layer's input is stored, one layer is recomputed.
  ``--tp`` assumes sequence parallelism (activations divided by tp).
- loss/head: :func:`head_bytes`, the one part validated against measurements
  (``python -m fused_losses.planner_validate``; ``docs/planner.md`` states the error).
  ``unfused`` is the trainer's ``--impl unfused`` path: ``[tokens, V]`` logits in the compute
  dtype, upcast to fp32, ``log_softmax``, gather (12 B per token per vocab entry at its peak;
  a Hugging Face model that also returns ``outputs.logits`` holds 2 B more). ``fused`` is one
  term per registered backend (``--backend``, default the CUDA default) and path (``--path``:
  ``one-pass``, gradients in forward, the library's default, with an fp32 dW accumulator; or
  ``recompute``), each counting the tensors the backend's code holds at its peak. With
  ``--tp`` the head is vocabulary-parallel: each GPU holds ``V / tp`` columns, recomputed.

Preference objectives (dpo, simpo, orpo, cpo, dil) run chosen and rejected sequences in one
forward, so a micro-batch of ``b`` pairs is ``2 b`` sequences of ``--seq-len`` tokens. DPO,
DIL, REINFORCE, KTO and GRPO hold a frozen bf16 reference model unless ``--ref precomputed``.
Every token is assumed scored (the fused head skips unscored tokens; the unfused head
cannot).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .backends import BACKENDS, CUDA_DEFAULT, torch_chunked
from .kernels import configs as kernel_configs

GiB = 1 << 30


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelDims:
    """The shapes that set memory: a Llama-style decoder (GQA attention, gated MLP)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None  # default hidden // heads
    tied: bool = False  # lm_head shares the embedding matrix
    qkv_bias: bool = False
    norms_per_layer: int = 2  # Gemma 2 has 4

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def layer_params(self) -> int:
        h, hd = self.hidden, self.hd
        attn = h * hd * (self.heads + 2 * self.kv_heads) + self.heads * hd * h
        if self.qkv_bias:
            attn += hd * (self.heads + 2 * self.kv_heads)
        return attn + 3 * h * self.intermediate + self.norms_per_layer * h

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def params(self) -> int:
        return (self.layers * self.layer_params() + self.embedding_params()
                + self.head_params() + self.hidden)


# Hard-coded from the public Hugging Face config.json of each model (no downloads).
PRESETS = {m.name: m for m in (
    ModelDims("llama3-8b", 4096, 32, 32, 8, 14336, 128256),
    ModelDims("llama3.1-8b", 4096, 32, 32, 8, 14336, 128256),
    ModelDims("llama3-70b", 8192, 80, 64, 8, 28672, 128256),
    ModelDims("llama3.2-1b", 2048, 16, 32, 8, 8192, 128256, head_dim=64, tied=True),
    ModelDims("llama3.2-3b", 3072, 28, 24, 8, 8192, 128256, head_dim=128, tied=True),
    ModelDims("mistral-7b", 4096, 32, 32, 8, 14336, 32768),
    ModelDims("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, tied=True, qkv_bias=True),
    ModelDims("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, tied=True, qkv_bias=True),
    ModelDims("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, qkv_bias=True),
    ModelDims("gemma2-2b", 2304, 26, 8, 4, 9216, 256000, head_dim=256, tied=True,
              norms_per_layer=4),
    ModelDims("gemma2-9b", 3584, 42, 16, 8, 14336, 256000, head_dim=256, tied=True,
              norms_per_layer=4),
    ModelDims("tiny-llama", 256, 2, 4, 4, 512, 32000),  # the trainer's tiny preset
)}


def model_from_config(config: dict, name: str = "config") -> ModelDims:
    """A :class:`ModelDims` from a Hugging Face ``config.json`` dict (or its ``text_config``)."""
    config = config.get("text_config", config)
    try:
        heads = int(config["num_attention_heads"])
        dims = ModelDims(
            name=name, hidden=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
            head_dim=config.get("head_dim"),
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            norms_per_layer=4 if str(config.get("model_type", "")).startswith("gemma2") else 2)
    except KeyError as err:
        raise ValueError(f"--model: config lacks {err.args[0]!r}; expected a transformers "
                         "decoder config with hidden_size, num_hidden_layers, "
                         "num_attention_heads, intermediate_size, vocab_size") from None
    return dims


def load_model(spec: str) -> ModelDims:
    """A preset name or a path to a ``config.json``."""
    if spec in PRESETS:
        return PRESETS[spec]
    try:
        with open(spec) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--model: {spec!r} is neither a preset ({', '.join(sorted(PRESETS))})"
                         " nor a config.json path") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--model: {spec} is not valid JSON ({err.msg})") from None
    return model_from_config(config, name=spec)


# ---------------------------------------------------------------------------------------------
# The loss/head term (validated by fused_losses.planner_validate)
# ---------------------------------------------------------------------------------------------

# How the library forms the head's gradients (fused_losses.backends):
# "one-pass": gradients in forward, the default of every objective and of
#   linear_cross_entropy(reduction="mean"/"sum") whenever a gradient is wanted
#   (grad_in_forward=None or True): the backend's forward_backward over token chunks of whole
#   groups, each logit formed once (6NHV). A group whose [rows, V] fp32 logits exceed the
#   backend's ONE_PASS_BYTES is formed by forward + backward inside the loss's forward instead
#   (primitive._group_fits_one_pass), with the recompute path's memory.
# "recompute": linear_logprobs + autograd, or grad_in_forward=False: forward, then a backward
#   that recomputes the logits (8NHV).
PATHS = ("one-pass", "recompute")
# Compute dtypes modelled, bytes per element. fp16 (per-token scaled gradient chunks) adds
# scaled copies the terms below do not count.
HEAD_DTYPES = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class Chunking:
    """The budgets the backends size their chunk buffers by, read from the library: a GPU's
    (the defaults) or the Triton interpreter's (:meth:`interpreter`, the CPU validation)."""

    torch_chunk_bytes: int = torch_chunked.CHUNK_BYTES  # torch: [c, V] fp32 logits a chunk
    torch_one_pass_bytes: int = torch_chunked.ONE_PASS_BYTES  # torch: largest one-pass group
    grad_chunk_bytes: int = kernel_configs.GRAD_CHUNK_BYTES  # triton backward: [N, VC] chunk
    product_chunk_bytes: int = kernel_configs.CUBLAS_CHUNK_BYTES  # cublas: [N, C] fp32 products
    one_pass_rows: int | None = kernel_configs.ONE_PASS_ROWS  # None: the interpreter's rule
    one_pass_bytes: int = kernel_configs.ONE_PASS_BYTES  # cublas/triton: largest one-pass group
    interpreting: bool = False  # the Triton kernels' block configs: the interpreter's

    @classmethod
    def interpreter(cls, **overrides) -> "Chunking":
        """The budgets under ``TRITON_INTERPRET=1`` (a few KiB, so chunks are many)."""
        return cls(**dict(dict(grad_chunk_bytes=kernel_configs.INTERPRETER_GRAD_CHUNK_BYTES,
                               product_chunk_bytes=kernel_configs.INTERPRETER_CHUNK_BYTES,
                               one_pass_rows=None, interpreting=True), **overrides))

    def pass_rows(self, vocab: int) -> int:
        """Token rows a cublas/triton one-pass chunk aims at: ``configs.one_pass_rows`` (under
        the interpreter the rows of ``product_chunk_bytes`` of fp32 logits)."""
        return self.one_pass_rows or max(1, self.product_chunk_bytes // (4 * vocab))

    def backward_block_v(self, dtype: str) -> int:
        """The Triton backward's BLOCK_V (its gradient chunks are multiples of it)."""
        return kernel_configs.config_for("bwd", getattr(torch, dtype),
                                         interpreting=self.interpreting)["BLOCK_V"]

    def one_pass_budget(self, backend: str) -> int:
        """The largest group's fp32 logits the backend's one pass takes (its module's
        ``ONE_PASS_BYTES``: torch's own, ``configs.ONE_PASS_BYTES`` for cublas and triton)."""
        return self.torch_one_pass_bytes if backend == "torch" else self.one_pass_bytes

    def one_pass_fits(self, backend: str, group: int | None, vocab: int) -> bool:
        """Whether one group's fp32 logits fit the backend's one-pass budget."""
        return (group or 1) * vocab * 4 <= self.one_pass_budget(backend)


GPU_CHUNKING = Chunking()


def _chunk_rows(rows: int, size: int, group: int | None) -> int:
    """Rows of the largest row chunk ``torch_chunked._chunks`` cuts: about ``size`` rows,
    ending only at group boundaries (uniform groups of ``group`` rows)."""
    step = size if group is None else group * max(1, size // group)
    return min(step, rows)


@dataclass(frozen=True)
class _Head:
    """One head call's sizes, in elements; ``d`` bytes per compute-dtype element."""

    m: int  # hidden rows [M, H]
    n: int  # scored rows
    h: int
    v: int
    d: int
    dtype: str
    group: int | None
    in_order: bool
    softcap: bool
    chunking: Chunking

    @property
    def low(self) -> bool:  # 16-bit: casts to and from fp32 make copies
        return self.d < 4

    @property
    def gathered(self) -> bool:  # the scored rows are not hidden itself, in order
        return self.n < self.m or not self.in_order


def _torch_term(s: _Head, path: str) -> int:
    """``backends/torch_chunked.py``: ``_Accumulator`` (dH zeros_like(hidden), fp32 dW) and one
    ``_Workspace`` per call; ``backward`` and ``forward_backward`` hold the same buffers, only
    their chunks differ (the one pass's end at group boundaries)."""
    size = max(1, s.chunking.torch_chunk_bytes // (4 * s.v))
    c = _chunk_rows(s.n, size, s.group if path == "one-pass" else None)
    d, h, v = s.d, s.h, s.v
    accumulators = d * s.m * h + 4 * v * h
    # workspace: the chunk's fp32 logits, their 16-bit copy for the GEMMs, the soft-cap factor
    work = 4 * c * v + (d * c * v if s.low else 0) + (4 * c * v if s.softcap else 0)
    # the chunk's hidden rows (index_select) and its dH part [c, H] (freed before dW's update,
    # which allocates nothing: addmm_ in place, or 16-bit operands into fp32 by cuBLAS)
    loop = accumulators + work + 2 * d * c * h
    end = accumulators + (d * v * h if s.low else 0)  # dW's cast, the workspace freed
    return max(loop, end)


def _triton_recompute(s: _Head) -> int:
    """``kernels/logprobs_bwd.backward``: dW in the compute dtype (written once), fp32 dH of
    the scored rows, one ``[N, VC]`` gradient chunk; at the end, the chunk freed, dH's cast
    and its scatter into ``zeros_like(hidden)`` (always: the launcher does not look at the
    rows, which would cost a host sync)."""
    d, n, h, v = s.d, s.n, s.h, s.v
    columns = kernel_configs.chunk_width(n, v, d, s.chunking.backward_block_v(s.dtype),
                                         s.chunking.grad_chunk_bytes)
    loop = d * v * h + 4 * n * h + d * n * columns
    return max(loop, d * v * h + _grad_hidden_end(s, scatter=True))


def _cublas_recompute(s: _Head) -> int:
    """``cublas_epilogue.backward``: dW in the compute dtype (one GEMM per vocabulary chunk),
    fp32 dH of the scored rows, one ``[N, C]`` fp32 products chunk, the scored rows gathered
    when they are not ``hidden`` itself in order; at the end, the products and the gathered
    rows freed, dH's cast beside the fp32 dH, then (gathered) the cast's scatter into
    ``zeros_like(hidden)``, the fp32 dH freed first. Its forward holds less (the products and
    the gather)."""
    d, n, h, v = s.d, s.n, s.h, s.v
    columns = kernel_configs.product_columns(n, v, s.chunking.product_chunk_bytes)
    loop = d * v * h + 4 * n * h + 4 * n * columns + (d * n * h if s.gathered else 0)
    return max(loop, d * v * h + _grad_hidden_end(s, scatter=s.gathered))


def _grad_hidden_end(s: _Head, scatter: bool) -> int:
    """A recompute backward's dH at its end: the fp32 dH of the scored rows beside its cast,
    then, with ``scatter``, the cast (fp32: the fp32 dH itself) beside the scatter's
    ``zeros_like(hidden)``."""
    cast = s.d * s.n * s.h if s.low else 4 * s.n * s.h
    return max(4 * s.n * s.h + (cast if s.low else 0),
               cast + s.d * s.m * s.h if scatter else 0)


def _fused_one_pass(s: _Head, gathers_rows: bool) -> int:
    """``backends/_one_pass.run`` (cublas and triton): dH zeros_like(hidden), the fp32 dW
    accumulator, one ``[r, V]`` fp32 products buffer (the largest chunk's); per chunk, on
    cuBLAS, its gathered hidden rows, and GEMM 2's fresh fp32 ``[r, H]`` dH rows beside their
    cast; at the end dW's cast, the products and the last chunk's buffers freed before it."""
    d, h, v = s.d, s.h, s.v
    r = _chunk_rows(s.n, s.chunking.pass_rows(v), s.group)
    base = d * s.m * h + 4 * v * h
    operand = d * r * h if gathers_rows else 0
    cast = d * r * h if s.low else 0  # dH rows' cast before index_copy_
    loop = base + 4 * r * v + operand + 4 * r * h + cast
    end = base + (d * v * h if s.low else 0)
    return max(loop, end)


# One entry per registered backend (fused_losses.backends.BACKENDS, "auto" excepted):
# (recompute term, one-pass term). tests/test_planner.py checks the two lists agree.
_FUSED_TERMS = {
    "torch": (lambda s: _torch_term(s, "recompute"), lambda s: _torch_term(s, "one-pass")),
    "triton": (_triton_recompute, lambda s: _fused_one_pass(s, gathers_rows=False)),
    "cublas": (_cublas_recompute, lambda s: _fused_one_pass(s, gathers_rows=True)),
}


def resolve_backend_name(backend: str) -> str:
    """A registered backend name; ``"auto"`` is the CUDA default (the planner plans GPUs)."""
    if backend == "auto":
        return CUDA_DEFAULT
    if backend not in _FUSED_TERMS:
        registered = [b for b in BACKENDS if b != "auto"]
        if backend in registered:
            raise ValueError(f"backend {backend!r} is registered but the planner has no memory "
                             "term for it (fused_losses/planner.py, _FUSED_TERMS)")
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_path(path: str) -> None:
    """``path`` is one of :data:`PATHS`, else a ValueError naming the choices."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def effective_path(backend: str, path: str, group: int | None, vocab: int,
                   chunking: Chunking = GPU_CHUNKING) -> str:
    """The path the library takes: ``"one-pass"`` falls back to ``"recompute"``'s memory when
    one group's fp32 logits exceed the backend's one-pass budget."""
    backend = resolve_backend_name(backend)
    check_path(path)
    if path == "one-pass" and not chunking.one_pass_fits(backend, group, vocab):
        return "recompute"
    return path


def head_bytes(impl: str, *, rows: int, scored: int, hidden: int, vocab: int,
               dtype: str = "bfloat16", backend: str = CUDA_DEFAULT, path: str = "one-pass",
               group: int | None = None, in_order: bool = True, softcap: bool = False,
               chunking: Chunking = GPU_CHUNKING) -> int:
    """Peak bytes of the LM head + loss, forward and backward, gradients included.

    ``rows`` hidden rows [M, H] enter the head, ``scored`` of them have a target; ``vocab``
    columns on this GPU; ``dtype`` the compute dtype (``HEAD_DTYPES``). Excludes the inputs
    (hidden, weight) themselves; counts every tensor the code allocates that is alive at the
    peak (dW and dH included), the per-token vectors as a flat 16 B a scored row.

    impl ``"unfused"``: logits [M, V] (compute dtype, then fp32), ``log_softmax`` saved,
    and in backward the gather's and ``log_softmax``'s fp32 gradients: 3 fp32 ``[M, V]``
    live at once. impl ``"fused"``: ``backend`` (a name of ``fused_losses.BACKENDS``;
    ``"auto"`` = the CUDA default) on ``path`` (``PATHS``): ``"one-pass"`` (gradients in
    forward, the library's default) or ``"recompute"`` (``grad_in_forward=False``,
    ``linear_logprobs`` + autograd). ``group``: rows per group of the one pass (a sequence, a
    preference pair; None: every token its own, ``linear_cross_entropy``); a group beyond the
    backend's one-pass budget takes the recompute path's memory (:func:`effective_path`).
    ``in_order``: the scored rows reach the backend in hidden's order (False: pairs of a
    micro-batch regrouped). ``softcap``: logits soft-capped (the torch backend keeps a
    factor). ``chunking``: the GPU's budgets, or the interpreter's for a CPU measurement.
    Models what the code allocates on CUDA with torch >= 2.8 (fp32-output cuBLAS GEMMs).
    """
    if dtype not in HEAD_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(HEAD_DTYPES)}, got {dtype!r}")
    m, n, h, v, d = rows, scored, hidden, vocab, HEAD_DTYPES[dtype]
    stats = 16 * max(n, 1)  # [N] fp32 statistics, targets, rows
    if impl == "unfused":
        low = d < 4
        peak_logits = 12 * m * v
        at_matmul = (4 + (d if low else 0)) * m * v + d * (v * h + m * h)
        return max(peak_logits, at_matmul) + stats
    if impl != "fused":
        raise ValueError(f"impl must be 'unfused' or 'fused', got {impl!r}")
    backend = resolve_backend_name(backend)
    taken = effective_path(backend, path, group, v, chunking)
    recompute, one_pass = _FUSED_TERMS[backend]
    shape = _Head(m, n, h, v, d, dtype, group, in_order, softcap, chunking)
    return (one_pass if taken == "one-pass" else recompute)(shape) + stats


def head_forward_bytes(impl: str, *, rows: int, scored: int, hidden: int, vocab: int,
                       dtype: str = "bfloat16", backend: str = CUDA_DEFAULT,
                       chunking: Chunking = GPU_CHUNKING) -> int:
    """Peak bytes of the head's forward alone (no gradient: a reference model's log-probs).

    Unfused: compute-dtype logits, their fp32 copy and ``log_softmax`` (10 B a token a vocab
    entry in bf16). Fused: the backend's forward chunk (torch: [c, V] fp32 logits and the
    chunk's rows; cublas: [N, C] fp32 products and the gather; triton: O(N) partials).
    """
    if dtype not in HEAD_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(HEAD_DTYPES)}, got {dtype!r}")
    m, n, h, v, d = rows, scored, hidden, vocab, HEAD_DTYPES[dtype]
    stats = 16 * max(n, 1)
    if impl == "unfused":
        return (d + 8) * m * v + stats
    backend = resolve_backend_name(backend)
    if backend == "torch":
        c = _chunk_rows(n, max(1, chunking.torch_chunk_bytes // (4 * v)), None)
        return 4 * c * v + d * c * h + stats
    if backend == "cublas":
        columns = kernel_configs.product_columns(n, v, chunking.product_chunk_bytes)
        return 4 * n * columns + (d * n * h if n < m else 0) + stats
    return stats


# ---------------------------------------------------------------------------------------------
# The rest of the model
# ---------------------------------------------------------------------------------------------

OBJECTIVES = {  # sequences per example, holds a frozen reference model
    "sft": (1, False), "ift": (1, False), "reinforce": (1, True), "kto": (1, True),
    "grpo": (1, True), "dpo": (2, True), "dil": (2, True), "simpo": (2, False),
    "orpo": (2, False), "cpo": (2, False), "ce": (1, False),
}
# The objectives' one pass runs over chunks of whole groups (objectives/_common.py,
# fused_objective): a sequence, or a chosen + rejected pair; GRPO's token-level ratios make
# each token its own group, and so does "ce", linear_cross_entropy(reduction="mean").
TOKEN_LEVEL = ("ce", "grpo")


def group_rows(objective: str, seq_len: int) -> int | None:
    """Rows of one group of the objective's one pass (None: every token its own)."""
    if objective in TOKEN_LEVEL:
        return None
    return OBJECTIVES[objective][0] * seq_len
OPTIMIZER_BYTES = {("adamw", "mixed"): 8, ("adamw", "bf16"): 4,
                   ("adamw-8bit", "mixed"): 2, ("adamw-8bit", "bf16"): 2,
                   ("sgd", "mixed"): 0, ("sgd", "bf16"): 0}


@dataclass(frozen=True)
class Setup:
    """One training configuration (the command line, one field per flag)."""

    seq_len: int = 32768  # tokens per sequence
    micro_batch: int = 1  # examples (pairs for preference objectives) per GPU per micro-step
    gpus: int = 8
    gpu_mem: float = 80.0  # GiB per GPU
    reserve: float = 2.0  # GiB kept back: CUDA context, NCCL buffers, allocator slack
    objective: str = "dpo"
    fsdp: bool = False
    tp: int = 1
    checkpointing: bool = False
    precision: str = "mixed"  # mixed | bf16
    optimizer: str = "adamw"  # adamw | adamw-8bit | sgd
    ref: str = "resident"  # resident | precomputed (reference log-probs computed offline)
    backend: str = CUDA_DEFAULT  # fused head implementation (fused_losses.BACKENDS)
    path: str = "one-pass"  # how its gradients are formed (PATHS; the library's default)

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def budget(self) -> float:
        return (self.gpu_mem - self.reserve) * GiB


def layer_activation_bytes(model: ModelDims, d: int = 2) -> int:
    """Saved-for-backward bytes per token of one decoder layer (no recompute).

    Per RMSNorm (HF eager): its fp32 input (4H) and its output (dH). Attention (SDPA /
    flash): q, k, v after RoPE, its output, fp32 log-sum-exp per head. Gated MLP: gate, up,
    act(gate) and their product (4 x I).
    """
    h, hd = model.hidden, model.hd
    norms = 2 * (4 * h + d * h)
    attn = d * hd * (model.heads + 2 * model.kv_heads) + d * hd * model.heads + 4 * model.heads
    mlp = 4 * d * model.intermediate
    extra_norms = (model.norms_per_layer - 2) * d * h  # Gemma 2's post-norms
    return norms + attn + mlp + extra_norms


def layer_backward_bytes(model: ModelDims, d: int = 2) -> int:
    """Transient gradient buffers per token while one layer runs backward."""
    return d * (4 * model.hidden + 2 * model.intermediate)


def head_path(setup: Setup) -> str:
    """The path the fused head's gradients take: vocabulary parallelism (``--tp``) has only
    the recompute path (``vocab_parallel.py``)."""
    check_path(setup.path)
    return "recompute" if setup.tp > 1 else setup.path


def head_call(model: ModelDims, setup: Setup) -> dict:
    """:func:`head_bytes`'s keywords for the head of ``setup`` (every token scored)."""
    tokens = OBJECTIVES[setup.objective][0] * setup.micro_batch * setup.seq_len
    pairs = OBJECTIVES[setup.objective][0] == 2
    return dict(rows=tokens, scored=tokens, hidden=model.hidden,
                vocab=math.ceil(model.vocab / setup.tp), dtype="bfloat16",
                backend=setup.backend, path=head_path(setup),
                group=group_rows(setup.objective, setup.seq_len),
                # the one pass orders rows group by group: pairs k and b + k of a micro-batch
                in_order=not (pairs and setup.micro_batch > 1))


def breakdown(model: ModelDims, setup: Setup, fused: bool) -> dict:
    """Per-GPU bytes by component, and ``peak``."""
    if setup.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, "
                         f"got {setup.objective!r}")
    seqs, has_ref = OBJECTIVES[setup.objective]
    has_ref = has_ref and setup.ref == "resident"
    t, dp, d = setup.tp, setup.dp, 2
    shard = t * (dp if setup.fsdp else 1)
    p = model.params()
    p_bytes, g_bytes = (4, 4) if setup.precision == "mixed" else (2, 2)
    o_bytes = OPTIMIZER_BYTES[(setup.optimizer, setup.precision)]
    out = {
        "parameters": p * p_bytes / shard,
        "gradients": p * g_bytes / shard,
        "optimizer state": p * o_bytes / shard,
    }
    layer = model.layer_params()
    root = model.embedding_params() + model.head_params() + model.hidden
    if setup.fsdp:
        buffers = (d * (2 * layer + root) + g_bytes * layer) / t
    else:
        buffers = d * p / t if setup.precision == "mixed" else 0.0
    out["fsdp/working copies"] = buffers
    out["reference model"] = d * p / shard if has_ref else 0.0

    tokens = seqs * setup.micro_batch * setup.seq_len
    per_layer = layer_activation_bytes(model, d)
    edges = (d * model.hidden + 4 * model.hidden + d * model.hidden) * tokens  # embed, final norm
    if setup.checkpointing:
        stored = (model.layers * d * model.hidden * tokens + edges) / t
        layer_peak = (per_layer + layer_backward_bytes(model, d)) * tokens / t
    else:
        stored = (model.layers * per_layer * tokens + edges) / t
        layer_peak = layer_backward_bytes(model, d) * tokens / t
    out["activations"] = stored
    head_vocab = math.ceil(model.vocab / t)
    head = head_bytes("fused" if fused else "unfused", **head_call(model, setup))
    out["loss/head"] = head
    static = sum(out.values()) - stored - head
    policy = stored + max(head, layer_peak)
    ref_fwd = 0.0
    if has_ref:  # no-grad forward: one layer's activations, the head's forward logits
        ref_tokens = tokens
        ref_head = head_forward_bytes("fused" if fused else "unfused", rows=ref_tokens,
                                      scored=ref_tokens, hidden=model.hidden,
                                      vocab=head_vocab, backend=setup.backend)
        ref_fwd = (per_layer * ref_tokens / t) + ref_head
    out["layer backward"] = layer_peak
    out["reference forward"] = ref_fwd
    out["peak"] = static + max(policy, ref_fwd)
    return out


def fits(model: ModelDims, setup: Setup, fused: bool) -> bool:
    return breakdown(model, setup, fused)["peak"] <= setup.budget


def max_seq_len(model: ModelDims, setup: Setup, fused: bool, limit: int = 1 << 24) -> int:
    """Largest ``seq_len`` whose peak fits (0 if not even one token fits)."""
    if not fits(model, replace(setup, seq_len=1), fused):
        return 0
    lo, hi = 1, limit
    if fits(model, replace(setup, seq_len=hi), fused):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(model, replace(setup, seq_len=mid), fused) else (lo, mid)
    return lo


def min_gpus(model: ModelDims, setup: Setup, fused: bool, limit: int = 4096) -> int | None:
    """Fewest GPUs (a multiple of ``tp``) for which the run fits; None if none up to limit.

    Without ``--fsdp`` more data-parallel GPUs do not lower per-GPU memory, so the answer is
    ``tp`` or None.
    """
    for dp in range(1, limit // setup.tp + 1):
        if fits(model, replace(setup, gpus=dp * setup.tp), fused):
            return dp * setup.tp
        if not setup.fsdp:
            return None
    return None


def fewest_gpus_any_layout(model: ModelDims, setup: Setup, fused: bool,
                           tps=(1, 2, 4, 8)) -> tuple[int, int] | None:
    """(GPUs, tp): the fewest GPUs over tensor-parallel sizes ``tps`` with FSDP on, keeping
    the other flags; ties go to the smaller tp. None if no layout fits."""
    best = None
    for tp in tps:
        if model.heads % tp:  # attention heads split evenly (kv heads may replicate)
            continue
        gpus = min_gpus(model, replace(setup, tp=tp, fsdp=True), fused)
        if gpus is not None and (best is None or gpus < best[0]):
            best = (gpus, tp)
    return best


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

STATIC = ("parameters", "gradients", "optimizer state", "fsdp/working copies", "reference model")
ROWS = STATIC + ("activations", "loss/head", "layer backward", "reference forward", "peak")
PEAK_RULE = ("peak = static + max(activations + max(loss/head, layer backward), "
             "reference forward)")


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _tokens(n: int) -> str:
    return f"{n:,}" + (f" (~{n / 1024:.1f}k)" if n >= 1024 else "")


def head_assumption(model: ModelDims, setup: Setup) -> list[str]:
    """Which fused head the numbers assume, the path the library takes at this length, and
    what the other path would give where it fits longer sequences."""
    backend = resolve_backend_name(setup.backend)
    call = head_call(model, setup)
    taken = effective_path(backend, call["path"], call["group"], call["vocab"])
    named = "the CUDA default" if backend == CUDA_DEFAULT else "not the CUDA default"
    line = (f"fused head: backend {backend} ({named}), path {setup.path} ("
            + ("gradients in forward, the library's default" if setup.path == "one-pass"
               else "grad_in_forward=False: recomputed in backward") + ")")
    if setup.tp > 1:
        line += f"; vocabulary-parallel (tp {setup.tp}) heads recompute in backward"
    elif taken != setup.path:
        kind = "pair" if OBJECTIVES[setup.objective][0] == 2 else "sequence"
        fits_rows = GPU_CHUNKING.one_pass_budget(backend) // (4 * call["vocab"])
        line += (f"; a {kind} ({call['group']:,} rows) is longer than {backend}'s one pass "
                 f"takes ({fits_rows:,} rows of fp32 logits at V={call['vocab']:,}): the "
                 "library forms it by forward + backward inside the forward, the recompute "
                 "path's memory")
    lines = [line]
    other = replace(setup, path="one-pass" if setup.path == "recompute" else "recompute")
    longest, alternative = (max_seq_len(model, s, True) for s in (setup, other))
    if alternative > longest:
        here, there = (breakdown(model, s, True)["loss/head"] for s in (setup, other))
        lines.append(f"  recommended: --path {other.path} "
                     + ("(grad_in_forward=False) " if other.path == "recompute" else "")
                     + f"fits longer sequences: {alternative:,} tokens instead of "
                     f"{longest:,} (loss/head at seq-len {setup.seq_len}: {there / GiB:.2f} "
                     f"GiB instead of {here / GiB:.2f})")
    return lines


def report(model: ModelDims, setup: Setup) -> str:
    parts = {name: breakdown(model, setup, fused) for name, fused in
             (("unfused", False), ("fused", True))}
    lines = [
        f"model {model.name}: {model.params() / 1e9:.2f}B params, H={model.hidden}, "
        f"L={model.layers}, V={model.vocab}",
        f"{setup.objective}, seq-len {setup.seq_len}, micro-batch {setup.micro_batch}, "
        f"{setup.gpus} GPU(s) x {setup.gpu_mem:g} GiB (budget {setup.budget / GiB:.1f} GiB "
        f"after {setup.reserve:g} GiB reserve), tp {setup.tp}, "
        f"{'FSDP' if setup.fsdp else 'no FSDP'}, checkpointing "
        f"{'on' if setup.checkpointing else 'off'}, precision {setup.precision}, "
        f"optimizer {setup.optimizer}"
        + (f", reference {setup.ref}" if OBJECTIVES[setup.objective][1] else ""),
        "",
        *head_assumption(model, setup),
        "",
        f"{'per GPU (GiB)':<22}{'unfused':>10}{'fused':>10}",
    ]
    for row in ROWS:
        if row == "peak":
            lines.append("-" * 42)
        lines.append(f"{row:<22}{_gib(parts['unfused'][row]):>10}{_gib(parts['fused'][row]):>10}")
    lines.append(PEAK_RULE)
    lines.append("")
    for name, fused in (("unfused", False), ("fused", True)):
        ok = "fits" if parts[name]["peak"] <= setup.budget else "does NOT fit"
        longest = max_seq_len(model, setup, fused)
        fewest = min_gpus(model, setup, fused)
        lines.append(
            f"{name:>8}: {ok}; longest seq-len that fits on {setup.gpus} GPU(s): "
            f"{_tokens(longest) if longest else 'none (the model state alone does not fit)'}; "
            f"fewest GPUs at seq-len {setup.seq_len}: "
            f"{fewest if fewest else 'none' + ('' if setup.fsdp else ' (try --fsdp or --tp)')}")
    for name, fused in (("unfused", False), ("fused", True)):
        layout = fewest_gpus_any_layout(model, setup, fused)
        lines.append(
            f"{name:>8}: fewest GPUs at seq-len {setup.seq_len} with FSDP and any tp in "
            f"1/2/4/8: " + (f"{layout[0]} (tp {layout[1]})" if layout else "none"))
    return "\n".join(lines)


def plot(model: ModelDims, setup: Setup, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, fused in enumerate((False, True)):
        parts = breakdown(model, setup, fused)
        segments = [(row, parts[row]) for row in STATIC + ("activations", "loss/head")]
        segments.append(("layer backward (beyond head)",
                         max(0.0, parts["layer backward"] - parts["loss/head"])))
        bottom = 0.0
        for j, (row, value) in enumerate(segments):
            bars.bar(i, value / GiB, bottom=bottom, color=f"C{j}", label=row if i == 0 else None)
            bottom += value / GiB
        bars.plot([i - 0.4, i + 0.4], [parts["peak"] / GiB] * 2, color="k", lw=2,
                  label="peak" if i == 0 else None)
    bars.axhline(setup.budget / GiB, color="k", ls="--", lw=1, label="budget")
    bars.set_xticks([0, 1], ["unfused", "fused"])
    bars.set_ylabel("GiB per GPU (stacked; peak takes max over phases)")
    bars.set_title(f"{model.name} {setup.objective}, {setup.seq_len} tokens, {setup.gpus} GPU(s)")
    bars.legend(fontsize=7)
    lengths = [2 ** k for k in range(9, 21)]
    for fused, style in ((False, "C3-o"), (True, "C2-o")):
        peaks = [breakdown(model, replace(setup, seq_len=s), fused)["peak"] / GiB
                 for s in lengths]
        curve.plot(lengths, peaks, style, ms=3, label="fused" if fused else "unfused")
    curve.axhline(setup.budget / GiB, color="k", ls="--", lw=1, label="budget")
    curve.set_xscale("log", base=2)
    curve.set_yscale("log")
    curve.set_xlabel("sequence length (tokens)")
    curve.set_ylabel("peak GiB per GPU")
    curve.legend()
    curve.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fused-losses plan",
        description="Per-GPU memory of a training run, unfused vs fused loss: breakdown, "
                    "longest sequence that fits, fewest GPUs.")
    p.add_argument("--model", required=True,
                   help=f"config.json path or preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--seq-len", type=int, default=32768, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="examples per GPU per micro-step (pairs for preference objectives)")
    p.add_argument("--gpus", type=int, default=8, help="total GPUs")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--reserve", type=float, default=2.0,
                   help="GiB per GPU kept back for the CUDA context, NCCL, allocator slack")
    p.add_argument("--objective", default="dpo", choices=sorted(OBJECTIVES))
    p.add_argument("--fsdp", action="store_true", help="shard model state over data parallel")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (with sequence "
                   "parallelism; the head is vocabulary-parallel)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--precision", default="mixed", choices=("mixed", "bf16"),
                   help="mixed: fp32 params/grads/moments (16 B/param); bf16: bf16 params, "
                        "grads and moments (8 B/param)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw-8bit", "sgd"))
    p.add_argument("--ref", default="resident", choices=("resident", "precomputed"),
                   help="reference model (dpo, dil, reinforce, kto, grpo): a frozen bf16 "
                        "model in memory, or log-probs computed beforehand")
    p.add_argument("--backend", default=CUDA_DEFAULT, choices=BACKENDS,
                   help="fused head implementation whose memory is modelled (default: "
                        f"{CUDA_DEFAULT}, what 'auto' picks on CUDA)")
    p.add_argument("--path", default="one-pass", choices=PATHS,
                   help="how the fused head forms its gradients: one-pass (gradients in "
                        "forward, the library's default) or recompute (grad_in_forward=False)")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart and a peak-vs-length curve")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead")
    return p


def setup_from_args(args) -> Setup:
    return Setup(seq_len=args.seq_len, micro_batch=args.micro_batch, gpus=args.gpus,
                 gpu_mem=args.gpu_mem, reserve=args.reserve, objective=args.objective,
                 fsdp=args.fsdp, tp=args.tp, checkpointing=args.activation_checkpointing,
                 precision=args.precision, optimizer=args.optimizer, ref=args.ref,
                 backend=args.backend, path=args.path)


def summary(model: ModelDims, setup: Setup) -> dict:
    """The report's numbers as plain data (``--json``)."""
    call = head_call(model, setup)
    result = {"model": asdict(model), "params": model.params(), "setup": asdict(setup),
              "head": {"backend": resolve_backend_name(setup.backend), "path": setup.path,
                       "path_taken": effective_path(setup.backend, call["path"],
                                                    call["group"], call["vocab"]),
                       "notes": head_assumption(model, setup)}}
    for name, fused in (("unfused", False), ("fused", True)):
        parts = breakdown(model, setup, fused)
        result[name] = {
            "GiB": {row: parts[row] / GiB for row in ROWS},
            "fits": parts["peak"] <= setup.budget,
            "max_seq_len": max_seq_len(model, setup, fused),
            "min_gpus": min_gpus(model, setup, fused),
            "fewest_gpus_any_tp_with_fsdp": fewest_gpus_any_layout(model, setup, fused),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    problems = []
    for flag in ("seq_len", "micro_batch", "gpus", "tp"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.gpus >= 1 and args.tp >= 1 and args.gpus % args.tp:
        problems.append(f"--gpus {args.gpus} is not a multiple of --tp {args.tp}")
    for flag in ("gpu_mem", "reserve"):
        if not math.isfinite(getattr(args, flag)):
            problems.append(f"--{flag.replace('_', '-')} must be a finite number of GiB, got "
                            f"{getattr(args, flag)}")
    if not args.gpu_mem > args.reserve >= 0:
        problems.append(f"--gpu-mem {args.gpu_mem} must exceed --reserve {args.reserve} >= 0")
    if args.plot:
        folder = Path(args.plot).parent
        if Path(args.plot).is_dir():
            problems.append(f"--plot {args.plot} is a directory; give a .png file name")
        elif not folder.is_dir():
            problems.append(f"--plot {args.plot}: folder {folder} does not exist")
    try:
        model = load_model(args.model)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        print("fused-losses plan: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    setup = setup_from_args(args)
    if args.json:
        print(json.dumps(summary(model, setup), indent=2))
    else:
        print(report(model, setup))
    if args.plot:
        plot(model, setup, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
