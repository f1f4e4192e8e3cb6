"""What a bf16 gradient accumulator costs in precision, against fp32 (CPU, minutes).

The cuBLAS backend accumulates across chunks: dH over vocabulary chunks (recompute path,
``[N, H]``) and dW over token chunks (one-pass path, ``[V, H]``). In fp32 that buffer costs
4NH or 4VH bytes beyond the bf16 gradient (134 MB / 2.1 GB at N = 8192, H = 4096,
V = 128256); in bf16 it costs nothing, and each chunk adds one rounding of the running sum
(cuBLAS ``addmm`` with a bf16 C sums ``C + A @ B`` in fp32 and rounds once). This script
measures the normwise relative error of both against float64 for a mean cross-entropy whose
logit gradient is rounded to bf16, as the GEMM operands are, for several chunk counts.

    python benchmarks/accumulator_precision.py [--tokens 2048 --hidden 256 --vocab 8192]
"""
from __future__ import annotations

import argparse

import torch


def logit_gradient(tokens: int, hidden: int, vocab: int, seed: int = 0):
    """(hidden [N, H] bf16, weight [V, H] bf16, G [N, V] float64): mean CE at init-like
    logit spread (std ~2), upstream gradient 1/N per token."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).bfloat16()
    w = (torch.randn(vocab, hidden, generator=gen) * 2 / hidden ** 0.5).bfloat16()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    logits = h.double() @ w.double().T
    grad = logits.softmax(-1)
    grad[torch.arange(tokens), targets] -= 1.0
    return h, w, grad / tokens


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def accumulate(pieces, acc_dtype: torch.dtype) -> torch.Tensor:
    """Sum of fp32 GEMM results, the running sum kept in ``acc_dtype``; returned in bf16."""
    total = None
    for piece in pieces:
        total = piece if total is None else (total.float() + piece).to(acc_dtype)
        total = total.to(acc_dtype)
    return total.bfloat16()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args(argv)
    h, w, grad = logit_gradient(args.tokens, args.hidden, args.vocab)
    grad_bf16 = grad.bfloat16()  # the GEMM operand, in any implementation
    exact_dh, exact_dw = grad @ w.double(), grad.T @ h.double()
    print(f"N={args.tokens} H={args.hidden} V={args.vocab}; normwise relative error vs "
          "float64 (the bf16 operand rounding alone is in the 1-chunk row)")
    print(f"{'chunks':>7} {'dH fp32 acc':>12} {'dH bf16 acc':>12} {'dW fp32 acc':>12} "
          f"{'dW bf16 acc':>12}")
    for chunks in (1, 4, 16, 64):
        vocab_pieces = [g.float() @ wc.float() for g, wc in
                        zip(grad_bf16.chunk(chunks, dim=1), w.chunk(chunks, dim=0))]
        token_pieces = [g.float().T @ hc.float() for g, hc in
                        zip(grad_bf16.chunk(chunks, dim=0), h.chunk(chunks, dim=0))]
        row = [relative_error(accumulate(pieces, dtype), exact)
               for pieces, exact in ((vocab_pieces, exact_dh), (token_pieces, exact_dw))
               for dtype in (torch.float32, torch.bfloat16)]
        print(f"{chunks:>7} " + " ".join(f"{e:>12.2e}" for e in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
