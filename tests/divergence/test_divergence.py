"""The two-head divergence primitive against float64 materialised references, on every
implementation (torch in float64; Triton and cuBLAS + epilogues under the interpreter in
float32), odd shapes."""
import pytest
import torch

from fused_losses.divergence import (linear_divergence, linear_divergence_loss,
                                     torch_chunked)
from tests.divergence import naive
from tests.helpers import HAS_TRITON, assert_close, assert_grad_close

F64, F32 = torch.float64, torch.float32
# (divergence, beta, temperature): every kind, JSD's two special ends, temperature != 1
CASES = [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 0.7), ("jsd", 0.3, 2.5),
         ("jsd", 0.0, 1.0), ("jsd", 1.0, 1.5)]
IMPLS = [pytest.param("torch", F64, id="torch")] + [
    pytest.param(name, F32, id=name,
                 marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))
    for name in ("triton", "cublas")]


def heads(n=13, h=37, ht=29, v=101, *, bias=True, ignored=(2, 5), scale=1.0, seed=0):
    """float64 (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets):
    logits of O(scale) spread, H_t != H, V a multiple of no block."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * s

    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(i for i in ignored if i < n)] = -100
    return (rand(n, h, s=scale), rand(v, h, s=h ** -0.5), rand(v, s=0.5) if bias else None,
            rand(n, ht, s=scale), rand(v, ht, s=ht ** -0.5), rand(v, s=0.5) if bias else None,
            targets)


def leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def check(backend, dtype, kind, beta, temperature, tensors, *, scale=1.0, chunk_size=None,
          upstream_seed=1):
    """Values and student gradients (hidden, weight, bias) of divergence + logprobs under
    random upstream gradients, against the reference."""
    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = tensors
    ref = leaves((hidden, weight, bias), F64)
    ours = leaves((hidden, weight, bias), dtype)
    out = linear_divergence(ours[0], ours[1], t_hidden.to(dtype), t_weight.to(dtype), targets,
                            bias=ours[2], teacher_bias=None if t_bias is None else t_bias.to(dtype),
                            divergence=kind, beta=beta, temperature=temperature,
                            return_logprobs=True, backend=backend, chunk_size=chunk_size)
    want_div, want_lp = naive.per_token(ref[0], ref[1], t_hidden, t_weight, targets, bias=ref[2],
                                        teacher_bias=t_bias, kind=kind, beta=beta,
                                        temperature=temperature)
    assert_close(out.divergence, want_div.detach(), dtype, scale=scale, name="divergence")
    assert_close(out.logprobs, want_lp.detach(), dtype, scale=scale, name="logprobs")
    g = torch.Generator().manual_seed(upstream_seed)
    g_div, g_lp = (torch.randn(targets.shape, generator=g, dtype=F64) for _ in range(2))
    ((out.divergence.double() * g_div).sum() + (out.logprobs.double() * g_lp).sum()).backward()
    ((want_div * g_div).sum() + (want_lp * g_lp).sum()).backward()
    for name, got, want in zip(("dH", "dW", "dBias"), ours, ref):
        if want is not None:
            assert_close(got.grad, want.grad, dtype, scale=scale, name=name)


@pytest.mark.parametrize("backend,dtype", IMPLS)
@pytest.mark.parametrize("kind,beta,temperature", CASES)
def test_matches_reference(backend, dtype, kind, beta, temperature):
    # torch: chunks of 4 rows (several chunks); triton: 13 rows cross the interpreter's
    # gradient chunk (2 vocabulary chunks at V=101); cublas: 2 vocabulary chunks of 78
    # columns (recompute path), token chunks of 10 rows (one pass)
    check(backend, dtype, kind, beta, temperature, heads(bias=kind != "reverse_kl"),
          chunk_size=4 if backend == "torch" else None)


@pytest.mark.parametrize("backend,dtype", IMPLS)
def test_one_token_and_every_token_ignored(backend, dtype):
    check(backend, dtype, "jsd", 0.5, 2.0, heads(n=1, ignored=()))
    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = heads(n=4, ignored=range(4))
    ours = leaves((hidden, weight, bias), dtype)
    loss, out = linear_divergence_loss(ours[0], ours[1], t_hidden.to(dtype), t_weight.to(dtype),
                                       targets, bias=ours[2], teacher_bias=t_bias.to(dtype),
                                       hard_weight=0.5, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not out.divergence.any() and not out.logprobs.any()
    for t in ours:
        assert t.grad is not None and not t.grad.any() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend,dtype", IMPLS)
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.7)])
def test_extreme_logits(backend, dtype, kind, beta):
    """Logits spread over hundreds: near one-hot distributions, divergences in the hundreds
    (KL) or at their bound (JSD), probabilities that underflow; nothing may turn NaN."""
    check(backend, dtype, kind, beta, 0.7, heads(n=6, v=77, scale=40.0, ignored=(3,)),
          scale=10.0)


@pytest.mark.parametrize("backend,dtype", IMPLS)
def test_any_layout(backend, dtype):
    """Transposed head views, strided hidden rows and stride-0 upstream gradients: the
    interpreter forgives stride mistakes only if nothing checks the values."""
    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = heads(n=5, ignored=(1,))
    wide = torch.randn(5, 2 * hidden.shape[1], dtype=F64)
    wide[:, ::2] = hidden
    ours_h = wide.to(dtype)[:, ::2].requires_grad_()                  # row stride 2H, col 2
    ours_w = weight.T.contiguous().to(dtype).T.requires_grad_()        # [V, H] with strides (1, V)
    t_w = t_weight.T.contiguous().to(dtype).T
    out = linear_divergence(ours_h, ours_w, t_hidden.to(dtype), t_w, targets, divergence="jsd",
                            beta=0.4, backend=backend)
    out.divergence.sum().backward()                                    # grad expanded: stride 0
    ref_h, ref_w = leaves((hidden, weight), F64)
    want, _ = naive.per_token(ref_h, ref_w, t_hidden, t_weight, targets, kind="jsd", beta=0.4)
    want.sum().backward()
    assert_close(out.divergence, want.detach(), dtype, name="divergence")
    assert_close(ours_h.grad, ref_h.grad, dtype, name="dH")
    assert_close(ours_w.grad, ref_w.grad, dtype, name="dW")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_vocabulary_splits_merge():
    """Several programs per token over vocabulary ranges (as on a GPU): the host merge."""
    from fused_losses.kernels import divergence as kernels

    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = heads(n=5, ignored=())
    f32 = [t.float() for t in (hidden, weight, bias, t_hidden, t_weight, t_bias)]
    rows = torch.arange(5)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        options = dict(kind=kind, beta=0.3, temperature=1.3, with_logprobs=True)
        split = kernels.forward(*f32, rows, targets, num_splits=3, **options)
        whole = torch_chunked.forward(*f32, rows, targets, **options)
        for name, got, want in zip(("divergence", "logprobs", "lse", "teacher_lse", "raw_lse",
                                    "aux"), split, whole):
            if want is not None:
                assert_close(got, want.double(), F32, name=f"{kind} {name}")


def test_torch_row_blocks_and_chunks(monkeypatch):
    """Row blocks of 2 rows inside chunks of 3: the statistics and gradients stay exact."""
    monkeypatch.setattr(torch_chunked, "ROW_BLOCK_BYTES", 2 * 8 * 101)
    check("torch", F64, "jsd", 0.6, 1.7, heads(n=8, ignored=(0,)), chunk_size=3)
    check("torch", F64, "reverse_kl", 0.5, 1.0, heads(n=8, ignored=(7,)), chunk_size=3)


def test_gradcheck_float64():
    """Autograd's finite differences, independent of any reference formula."""
    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = heads(n=3, h=5, ht=4, v=11,
                                                                      ignored=(1,))
    hidden, weight, bias = leaves((hidden, weight, bias), F64)
    for kind, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.35)):
        def fn(h, w, b):
            out = linear_divergence(h, w, t_hidden, t_weight, targets, bias=b,
                                    teacher_bias=t_bias, divergence=kind, beta=beta,
                                    temperature=1.3, return_logprobs=True, backend="torch")
            return out.divergence, out.logprobs
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("backend,dtype", [p for p in IMPLS if p.id != "triton"])
@pytest.mark.parametrize("kind", ["jsd", "reverse_kl"])
def test_grad_in_forward_equals_recompute_and_runs_once(backend, dtype, kind):
    """The one pass (torch: chunks of 4 rows; cublas: token chunks of 10 rows at V = 101)
    against the recompute path: loss, per-token terms, every student gradient."""
    tensors = heads(n=13, ignored=(4,))
    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = tensors
    results = []
    for one_pass in (True, False):
        h, w, b = leaves((hidden, weight, bias), dtype)
        loss, out = linear_divergence_loss(h, w, t_hidden.to(dtype), t_weight.to(dtype),
                                           targets, bias=b, teacher_bias=t_bias.to(dtype),
                                           divergence=kind, beta=0.25, temperature=1.5,
                                           hard_weight=0.8, backend=backend,
                                           chunk_size=4 if backend == "torch" else None,
                                           grad_in_forward=one_pass)
        (loss * 0.5).backward()
        results.append((loss, out, h.grad, w.grad, b.grad))
        if one_pass:
            with pytest.raises(RuntimeError, match="backpropagated once"):
                loss.backward()
    for got, want in zip(results[0], results[1]):
        items = got if isinstance(got, tuple) else (got,)
        for a, b in zip(items, want if isinstance(want, tuple) else (want,)):
            assert_close(a.detach(), b.detach(), dtype)


@pytest.mark.parametrize("backend", [p.id for p in IMPLS])
def test_teacher_gets_no_gradient_and_may_have_its_own_dtype(backend):
    """A bf16 teacher (its own head and hidden) under an fp32 student; the teacher's tensors
    stay without gradient even when they require one. Its logits come from a bf16 matmul, so
    the comparison is at bf16's tolerance."""
    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = heads(n=6)
    t_hidden, t_weight, t_bias = (t.to(torch.bfloat16).requires_grad_()
                                  for t in (t_hidden, t_weight, t_bias))
    h, w = leaves((hidden, weight), F32)
    out = linear_divergence(h, w, t_hidden, t_weight, targets, teacher_bias=t_bias,
                            divergence="forward_kl", backend=backend)
    out.divergence.sum().backward()
    assert all(t.grad is None for t in (t_hidden, t_weight, t_bias))
    ref_h, ref_w = leaves((hidden, weight), F64)
    want, _ = naive.per_token(ref_h, ref_w, t_hidden.detach(), t_weight.detach(), targets,
                              teacher_bias=t_bias.detach(), kind="forward_kl")
    want.sum().backward()
    for name, got, expected in (("divergence", out.divergence, want.detach()),
                                ("dH", h.grad, ref_h.grad), ("dW", w.grad, ref_w.grad)):
        assert_close(got, expected, torch.bfloat16, name=name)


def test_each_head_in_its_compute_dtype():
    """As F.linear decides it: a bf16 student hidden with an fp32 head runs in fp32 (each
    input's gradient in its own dtype); under autocast both heads run in bf16."""
    hidden, weight, _, t_hidden, t_weight, _, targets = heads(n=6, bias=False)
    h = hidden.to(torch.bfloat16).requires_grad_()
    w = weight.float().requires_grad_()
    out = linear_divergence(h, w, t_hidden.float(), t_weight.to(torch.bfloat16), targets,
                            backend="torch")
    out.divergence.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref_h, ref_w = leaves((h.detach(), w.detach()), F64)
    want, _ = naive.per_token(ref_h, ref_w, t_hidden.float(), t_weight.to(torch.bfloat16),
                              targets)
    want.sum().backward()
    assert_close(out.divergence, want.detach(), F32, name="divergence")
    assert_grad_close(w.grad, ref_w.grad, F32, name="dW")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = linear_divergence(h, w, t_hidden.float(), t_weight.float(), targets,
                                 backend="torch")
    assert_close(auto.divergence, want.detach(), torch.bfloat16, name="autocast divergence")


@pytest.mark.parametrize("change,error,match", [
    (dict(teacher_weight=torch.randn(100, 29)), ValueError, "vocabulary of 100"),
    (dict(teacher_weight=torch.randn(101, 28)), ValueError, r"teacher_weight.*\[V, 29\]"),
    (dict(teacher_hidden=torch.randn(12, 29)), ValueError, "teacher_hidden.*leading shape"),
    (dict(teacher_weight=torch.randn(101, 29, dtype=F64)), TypeError,
     "teacher_weight.*float64 mixes only with float64"),
    (dict(teacher_bias=torch.randn(100)), ValueError, "teacher_bias"),
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(beta=1.5), ValueError, r"beta must be a number in \[0, 1\]"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(backend="triton", chunk_size=4), ValueError, "chunk_size=4"),
    (dict(backend="cublas", chunk_size=4), ValueError, "chunk_size=4"),
    (dict(teacher_hidden=[0.0]), TypeError, "teacher_hidden must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(change, error, match):
    hidden, weight, _, t_hidden, t_weight, _, targets = heads(n=13)
    args = dict(hidden=hidden.float(), weight=weight.float(), teacher_hidden=t_hidden.float(),
                teacher_weight=t_weight.float(), targets=targets)
    options = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    if "teacher_bias" in options:
        options["teacher_bias"] = options["teacher_bias"].float()
    if not HAS_TRITON and options.get("backend") in ("triton", "cublas"):
        pytest.skip("triton not installed")
    with pytest.raises(error, match=match):
        linear_divergence(**args, **options)


@pytest.mark.parametrize("backend,dtype", IMPLS)
def test_fp16_keeps_tiny_per_token_gradients(backend, dtype):
    """A token mean over 65536 tokens hands each token 2**-16: at V = 512 most entries
    (q − p)·g are below fp16's smallest subnormal unless the gradient chunk is scaled per
    token (kernels/scaling.py's convention; unscaled, dH is off by 12%). The heads are scaled
    so that dH stays in fp16's normal range (dW cannot: its entries are ~3e-8)."""
    hidden, weight, _, t_hidden, t_weight, _, targets = heads(n=16, h=16, ht=12, v=512,
                                                              bias=False, ignored=())
    hidden, weight = hidden / 64, weight * 64
    f16 = leaves((hidden, weight), torch.float16)
    out = linear_divergence(f16[0], f16[1], t_hidden.half(), t_weight.half(), targets,
                            divergence="forward_kl", backend=backend)
    got = torch.autograd.grad(out.divergence.float().sum() / 65536, f16[0])[0]
    ref = leaves((hidden.half(), weight.half()), F64)
    want_div, _ = naive.per_token(ref[0], ref[1], t_hidden.half().double(),
                                  t_weight.half().double(), targets, kind="forward_kl")
    want = torch.autograd.grad(want_div.sum() / 65536, ref[0])[0]
    assert_grad_close(got, want, torch.float16, name="dH")


# A vocabulary mask is a bias of -inf (``fused_losses.backends``: probability 0). Columns
# masked by both heads (padded rows, column 0 among them: an edge the lse trick must not
# trip on), by the teacher only, by the student only; V = 101.
SHARED_MASK, TEACHER_MASK, STUDENT_MASK = [0, 40, 96, 97, 98, 99, 100], [7, 64], [13, 77]
# Which masks each divergence keeps finite: KL(P‖Q) needs Q > 0 wherever P > 0 and
# KL(Q‖P) the reverse; the JSD's mixture is positive wherever either is.
FINITE_MASKS = {"forward_kl": (TEACHER_MASK, []), "reverse_kl": ([], STUDENT_MASK),
                "jsd": (TEACHER_MASK, STUDENT_MASK)}


def masked(tensors, teacher_only, student_only):
    """``heads()`` with -inf biases on the masked columns; no target on a masked column."""
    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = tensors
    bias, t_bias = bias.clone(), t_bias.clone()
    bias[SHARED_MASK + student_only] = -float("inf")
    t_bias[SHARED_MASK + teacher_only] = -float("inf")
    hit = torch.isin(targets, torch.tensor(SHARED_MASK + teacher_only + student_only))
    targets = torch.where(hit, 3, targets)
    return hidden, weight, bias, t_hidden, t_weight, t_bias, targets


@pytest.mark.parametrize("backend,dtype", IMPLS)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_vocabulary_mask(backend, dtype, kind):
    """-inf logits weigh 0 (0·log 0 = 0) wherever the divergence stays finite: values and
    gradients against the reference, and no gradient at all on the student's masked rows."""
    tensors = masked(heads(n=9, ignored=(4,)), *FINITE_MASKS[kind])
    check(backend, dtype, kind, 0.35, 1.3, tensors)
    # the loss's own path (gradients formed in forward where the implementation has it)
    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = tensors
    ours, ref = leaves((hidden, weight, bias), dtype), leaves((hidden, weight, bias), F64)
    loss, _ = linear_divergence_loss(ours[0], ours[1], t_hidden.to(dtype), t_weight.to(dtype),
                                     targets, bias=ours[2], teacher_bias=t_bias.to(dtype),
                                     divergence=kind, beta=0.35, hard_weight=0.5,
                                     backend=backend)
    loss.backward()
    want_div, want_lp = naive.per_token(*ref[:2], t_hidden, t_weight, targets, bias=ref[2],
                                        teacher_bias=t_bias, kind=kind, beta=0.35)
    (want_div.sum() - 0.5 * want_lp.sum()).backward()
    for name, got, want in zip(("dH", "dW", "dBias"), ours, ref):
        assert_close(got.grad, want.grad, dtype, name=name)
    student_masked = bias == -float("inf")
    assert not ours[1].grad[student_masked].any() and not ours[2].grad[student_masked].any()


@pytest.mark.parametrize("backend,dtype", IMPLS)
def test_infinite_divergence_and_nan_rows(backend, dtype):
    """Decided per the contract: a KL is +inf where one model has mass on a token the other
    masks, and an infinite divergence has no derivative, so its rows' gradients are NaN
    (reaching every entry of dW, as a NaN row does); a NaN logit makes its row NaN, and
    leaves the other rows exact."""
    for kind, (teacher_only, student_only) in (("forward_kl", ([], STUDENT_MASK)),
                                               ("reverse_kl", (TEACHER_MASK, []))):
        hidden, weight, bias, t_hidden, t_weight, t_bias, targets = masked(
            heads(n=5, ignored=(1,)), teacher_only, student_only)
        h, w = leaves((hidden, weight), dtype)
        out = linear_divergence(h, w, t_hidden.to(dtype), t_weight.to(dtype), targets,
                                bias=bias.to(dtype), teacher_bias=t_bias.to(dtype),
                                divergence=kind, backend=backend)
        scored = targets != -100
        assert torch.equal(out.divergence[scored], torch.full((4,), float("inf"), dtype=F32)
                           .to(out.divergence.dtype)) and out.divergence[1] == 0
        out.divergence.sum().backward()
        assert h.grad[scored].isnan().all() and not h.grad[~scored].any(), kind
        assert w.grad.isnan().all(), kind
        h, w = leaves((hidden, weight), dtype)  # the loss's own path
        loss, _ = linear_divergence_loss(h, w, t_hidden.to(dtype), t_weight.to(dtype), targets,
                                         bias=bias.to(dtype), teacher_bias=t_bias.to(dtype),
                                         divergence=kind, backend=backend)
        loss.backward()
        assert loss == float("inf") and h.grad[scored].isnan().all() and w.grad.isnan().all()
    hidden, weight, bias, t_hidden, t_weight, t_bias, targets = masked(
        heads(n=5, ignored=(1,)), *FINITE_MASKS["jsd"])
    t_hidden = t_hidden.clone()
    t_hidden[3, 5] = float("nan")
    h, w = leaves((hidden, weight), dtype)
    out = linear_divergence(h, w, t_hidden.to(dtype), t_weight.to(dtype), targets,
                            bias=bias.to(dtype), teacher_bias=t_bias.to(dtype), beta=0.4,
                            backend=backend)
    want, _ = naive.per_token(hidden, weight, t_hidden, t_weight, targets, bias=bias,
                              teacher_bias=t_bias, beta=0.4)
    assert out.divergence[3].isnan() and not out.divergence[[0, 1, 2, 4]].isnan().any()
    assert_close(out.divergence[[0, 1, 2, 4]], want[[0, 1, 2, 4]], dtype, name="other rows")
    out.divergence.sum().backward()
    assert h.grad[3].isnan().all() and torch.isfinite(h.grad[[0, 1, 2, 4]]).all()


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_auto_follows_the_library_cuda_default():
    """'auto' on CUDA is the log-prob primitive's CUDA default (resolved, not launched)."""
    from fused_losses.backends import CUDA_DEFAULT
    from fused_losses.divergence import resolve_implementation

    assert resolve_implementation("auto", torch.device("cuda")) \
        is resolve_implementation(CUDA_DEFAULT, torch.device("cpu"))
    assert resolve_implementation("auto", torch.device("cpu")) is torch_chunked
