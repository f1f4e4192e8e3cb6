"""Error of gradient filtering (``filter_eps``) on flat and peaked distributions.

``filter_eps`` drops the softmax terms where the probability p is below eps (Cut
Cross-Entropy's 2^-12 is bf16's precision); the target's one-hot term is kept. At
initialisation every p ~ 1/V is below that for V >= 4096, so filtering drops the whole
softmax term exactly where training starts. This script measures the relative error of dH
and dW against the exact gradient for a flat (small logits) and a peaked (large logits)
distribution, on the torch backend and the Triton kernels (CPU interpreter, so small
sizes). The error does not depend on the loss's reduction: p is compared, not p * g.

    TRITON_INTERPRET=1 python benchmarks/filtering_error.py
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from fused_losses import linear_logprobs  # noqa: E402

EPS = 2.0 ** -12


def relative_errors(backend: str, n: int, h: int, v: int, logit_scale: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator)
    weight = torch.randn(v, h, generator=generator) * logit_scale / h ** 0.5
    targets = torch.randint(0, v, (n,), generator=generator)
    grads = []
    for filter_eps in (None, EPS):
        hid, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear_logprobs(hid, w, targets, backend=backend, filter_eps=filter_eps)
        (-out.logprobs.mean()).backward()
        grads.append((hid.grad, w.grad))
    (exact_h, exact_w), (filt_h, filt_w) = grads
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    with torch.no_grad():
        max_p = torch.softmax(hidden @ weight.T, -1).max(-1).values.median().item()
    return rel(filt_h, exact_h), rel(filt_w, exact_w), max_p


def main() -> None:
    print(f"filter_eps = 2^-12; relative L2 error of the filtered gradient vs exact")
    print(f"{'backend':8s} {'N':>5s} {'H':>4s} {'V':>6s} {'distribution':>13s} "
          f"{'median max p':>13s} {'dH err':>8s} {'dW err':>8s}")
    cases = [("torch", 256, 64, 32000), ("triton", 32, 32, 4096)]
    for backend, n, h, v in cases:
        for name, scale in (("flat", 0.1), ("peaked", 30.0)):
            err_h, err_w, max_p = relative_errors(backend, n, h, v, scale)
            print(f"{backend:8s} {n:5d} {h:4d} {v:6d} {name:>13s} {max_p:13.4f} "
                  f"{err_h:8.4f} {err_w:8.4f}", flush=True)


if __name__ == "__main__":
    main()
