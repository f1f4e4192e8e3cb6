"""KTO against a float64 naive implementation of ``objectives.md`` §8, TRL's own
``KTOTrainer._compute_loss`` (called with a model whose outputs are the naive per-token
log-probs, so its gradients reach hidden and weight) and Liger's ``LigerFusedLinearKTOLoss``."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fused_losses import FusedKTOLoss, kto_loss, mismatched_pairs
from fused_losses.objectives import KTO_LOSSES, _common
from tests.helpers import assert_close
from tests.objectives import naive
from tests.objectives.naive import batch, grads
from tests.objectives.test_grpo import naive_entropy

F64 = torch.float64
TORCH = dict(backend="torch")
DESIRABLE = torch.tensor([True, False, True, True, False])


def kto_batch(rows=5, T=9, *, bias=False):
    """A batch, a mismatched batch of the same policy head (its own hidden states), and
    reference log-probs on both, near the policy's."""
    hidden, weight, labels, b = batch(rows=rows, T=T, bias=bias)
    kl_hidden, _, kl_labels, _ = batch(rows=rows, T=T + 2, seed=99)
    g = torch.Generator().manual_seed(4)
    bias_ = None if b is None else b.detach()

    def ref_near(h, lab, spread):
        logps, _, mask = naive.labels_logps(h.detach(), weight.detach(), lab, bias_)
        return (logps + spread * torch.randn(logps.shape, generator=g, dtype=F64)) * mask

    return SimpleNamespace(hidden=hidden, weight=weight, labels=labels, bias=b,
                           ref=ref_near(hidden, labels, 0.4),
                           kl_hidden=kl_hidden.detach(), kl_labels=kl_labels,
                           kl_ref=ref_near(kl_hidden, kl_labels, 0.4) - 0.3)


def naive_estimate(x, average=False):
    """TRL's z: mean over the mismatched rows of S − S^ref, at least 0."""
    bias = None if x.bias is None else x.bias.detach()
    logps, _, mask = naive.labels_logps(x.kl_hidden, x.weight.detach(), x.kl_labels, bias)
    return (naive.seq(logps, mask, average) - naive.seq(x.kl_ref, mask, average)).mean() \
        .clamp_min(0)


def naive_kto(x, desirable, *, z, beta=0.1, dw=1.0, uw=1.0, loss_type="kto", average=False):
    logps, _, mask = naive.labels_logps(x.hidden, x.weight, x.labels, x.bias)
    rho = naive.seq(logps, mask, average) - naive.seq(x.ref, mask, average)
    terms = []
    for r, d in zip(rho, desirable.tolist()):
        if loss_type == "kto":
            loss = 1 - torch.sigmoid(beta * (r - z)) if d else 1 - torch.sigmoid(beta * (z - r))
        else:
            loss = 1 - torch.sigmoid(beta * r) if d else torch.sigmoid(beta * r)
        terms.append((dw if d else uw) * loss)
    zero = (x.hidden.sum() + x.weight.sum()) * 0  # a graph even when nothing is scored
    return torch.stack(terms).mean() + zero


def _check(got, want, x, dtype=F64, scale=10):
    assert_close(got, want, dtype, scale=scale, name="loss")
    for g, w, name in zip(grads(got, x.hidden, x.weight, x.bias),
                          grads(want, x.hidden, x.weight, x.bias), ("dH", "dW", "db")):
        assert_close(g, w, dtype, scale=scale, name=name)


# ----------------------------------------------------------------------------------------
# Against the naive float64 objective
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", sorted(KTO_LOSSES))
def test_matches_naive_with_the_estimate(loss_type, average):
    x = kto_batch(bias=True)
    z = naive_estimate(x, average)
    assert z > 0  # the estimate is not clamped away: it matters
    out = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=x.ref, bias=x.bias,
                   kl_hidden=x.kl_hidden, kl_labels=x.kl_labels, kl_ref_logprobs=x.kl_ref,
                   beta=0.5, desirable_weight=1.3, undesirable_weight=0.7, loss_type=loss_type,
                   average_log_prob=average, **TORCH)
    want = naive_kto(x, DESIRABLE, z=0.0 if loss_type != "kto" else z, beta=0.5, dw=1.3,
                     uw=0.7, loss_type=loss_type, average=average)
    _check(out.loss, want, x)
    assert_close(out.metrics["kl"], z, F64, name="kl")


def test_reference_point_given_or_from_the_reference_head():
    x = kto_batch()
    ref_hidden = x.hidden.detach() + 0.1 * torch.randn_like(x.hidden.detach())
    kl_ref_hidden = x.kl_hidden + 0.1 * torch.randn_like(x.kl_hidden)
    ref_weight = x.weight.detach() * 1.05
    x.ref = naive.labels_logps(ref_hidden, ref_weight, x.labels)[0]
    x.kl_ref = naive.labels_logps(kl_ref_hidden, ref_weight, x.kl_labels)[0]
    out = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE.long(), ref_hidden=ref_hidden,
                   ref_weight=ref_weight, kl_hidden=x.kl_hidden, kl_labels=x.kl_labels,
                   kl_ref_hidden=kl_ref_hidden, **TORCH)
    _check(out.loss, naive_kto(x, DESIRABLE, z=naive_estimate(x)), x)
    for kl in (0.7, torch.tensor(0.7), torch.full((5,), 0.7), -0.5):  # z = max(kl, 0)
        out = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=x.ref, kl=kl,
                       **TORCH)
        _check(out.loss, naive_kto(x, DESIRABLE, z=max(float(kl.mean() if torch.is_tensor(kl)
                                                             else kl), 0.0)), x)
    per_row = torch.tensor([0.1, 0.9, 0.0, 2.0, 0.3], dtype=F64)
    out = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=x.ref, kl=per_row,
                   **TORCH)
    logps, _, mask = naive.labels_logps(x.hidden, x.weight, x.labels)
    rho = naive.seq(logps, mask, False) - naive.seq(x.ref, mask, False)
    want = torch.where(DESIRABLE, 1 - torch.sigmoid(0.1 * (rho - per_row)),
                       1 - torch.sigmoid(0.1 * (per_row - rho))).mean()
    _check(out.loss, want, x)
    no_z = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=x.ref, **TORCH)
    _check(no_z.loss, naive_kto(x, DESIRABLE, z=0.0), x)
    x.kl_ref = x.kl_ref + 5.0 * (x.kl_labels != -100)  # a negative estimate: z = 0
    assert naive_estimate(x) == 0
    out = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=x.ref,
                   kl_hidden=x.kl_hidden, kl_labels=x.kl_labels, kl_ref_logprobs=x.kl_ref,
                   **TORCH)
    _check(out.loss, naive_kto(x, DESIRABLE, z=0.0), x)
    assert out.metrics["kl"] == 0


def test_edges_one_token_all_ignored_and_garbage():
    x = kto_batch(rows=5, T=4)
    x.labels[1:3] = -100  # two rows with nothing scored: their loss is a constant
    x.labels[0] = torch.tensor([-100, -100, -100, 7])  # one token
    dirty = torch.where(x.labels != -100, x.ref, torch.tensor(float("nan"), dtype=F64))
    out = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=dirty, kl=0.2,
                   **TORCH)
    _check(out.loss, naive_kto(x, DESIRABLE, z=0.2), x)
    assert all(torch.isfinite(v) for v in out.metrics.values())
    x.labels[:] = -100
    out = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=dirty, **TORCH)
    _check(out.loss, naive_kto(x, DESIRABLE, z=0.0), x)


@pytest.mark.parametrize("chunk_size", [3, 20])
def test_gradient_in_forward_equals_recompute(chunk_size, monkeypatch):
    one_pass, calls = _common.linear_logprobs_loss, []
    monkeypatch.setattr(_common, "linear_logprobs_loss",
                        lambda *a, **k: calls.append(1) or one_pass(*a, **k))
    x = kto_batch(bias=True)
    kw = dict(ref_logprobs=x.ref, kl_hidden=x.kl_hidden, kl_labels=x.kl_labels,
              kl_ref_logprobs=x.kl_ref, bias=x.bias, chunk_size=chunk_size,
              return_entropy=True, **TORCH)
    a = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, grad_in_forward=False, **kw)
    b = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, **kw)
    assert len(calls) == 1
    assert_close(b.loss, a.loss, F64, name="loss")
    for got, want in zip(grads(b.loss, x.hidden, x.weight, x.bias),
                         grads(a.loss, x.hidden, x.weight, x.bias)):
        assert_close(got, want, F64, scale=10, name="grad")
    for name in a.metrics:
        assert_close(b.metrics[name], a.metrics[name], F64, name=name)


# ----------------------------------------------------------------------------------------
# Against TRL's KTOTrainer loss, with a model that returns the naive outputs
# ----------------------------------------------------------------------------------------

def trl_kto(x, desirable, *, beta, dw, uw, loss_type):
    """(loss, metrics) from TRL's ``KTOTrainer._compute_loss``: precomputed reference
    log-probs (``ref_logps``/``ref_KL_logps``, per sequence), and a model returning the naive
    float64 per-token log-probs, entropies and mean logits (TRL's fused-head outputs are in
    the prediction layout: column t is about token t+1)."""
    trainer = pytest.importorskip("trl.trainer.kto_trainer")
    logps, _, mask = naive.labels_logps(x.hidden, x.weight, x.labels)
    kl_logps, _, kl_mask = naive.labels_logps(x.kl_hidden, x.weight.detach(), x.kl_labels)
    mean_logits = naive.logits_of(x.hidden, x.weight).mean(-1)
    main = SimpleNamespace(log_probs=logps[:, 1:], mean_logits=mean_logits[:, :-1],
                           entropy=naive_entropy(x.hidden, x.weight, x.labels)[:, 1:])
    ref_logps, ref_kl_logps = trl_per_sequence(x)
    batch_ = {"input_ids": x.labels.clamp_min(0), "attention_mask": torch.ones_like(x.labels),
              "completion_mask": mask.long(), "label": desirable,
              "KL_input_ids": x.kl_labels.clamp_min(0),
              "KL_attention_mask": torch.ones_like(x.kl_labels),
              "KL_completion_mask": kl_mask.long(),
              "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}

    def model(input_ids, **_):
        if input_ids is batch_["input_ids"]:
            return main
        return SimpleNamespace(log_probs=kl_logps[:, 1:])

    metrics = defaultdict(lambda: defaultdict(list))
    accelerator = SimpleNamespace(device=x.labels.device, gather_for_metrics=lambda t: t)
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, calculate_KL=True,
        aux_loss_enabled=False, precompute_ref_logps=True, loss_type=loss_type, beta=beta,
        desirable_weight=dw, undesirable_weight=uw, _metrics=metrics, _total_train_tokens=0,
        _tp_size=1)
    stand_in._compute_kl_logps = lambda m, b: trainer.KTOTrainer._compute_kl_logps(stand_in, m, b)
    loss = trainer.KTOTrainer._compute_loss(stand_in, model, batch_, return_outputs=False)
    return loss, {k: v[-1] for k, v in metrics["train"].items() if k != "num_tokens"}


@pytest.mark.parametrize("per_sequence", [False, True], ids=["per_token", "trl_columns"])
@pytest.mark.parametrize("loss_type", sorted(KTO_LOSSES))
def test_matches_trl_kto_trainer(loss_type, per_sequence):
    """Per-token references, or TRL's own per-sequence columns (the values TRL is fed)."""
    x = kto_batch()
    want, trl_metrics = trl_kto(x, DESIRABLE, beta=0.3, dw=1.2, uw=0.8, loss_type=loss_type)
    ref_logps, ref_kl_logps = trl_per_sequence(x)
    refs = dict(ref_logps=ref_logps, ref_KL_logps=ref_kl_logps) if per_sequence \
        else dict(ref_logprobs=x.ref, kl_ref_logprobs=x.kl_ref)
    out = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, **refs,
                   kl_hidden=x.kl_hidden, kl_labels=x.kl_labels,
                   beta=0.3, desirable_weight=1.2, undesirable_weight=0.8, loss_type=loss_type,
                   return_entropy=True, **TORCH)
    if loss_type != "kto":  # TRL estimates z for the metric; the loss does not use it
        out_no_z = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=x.ref,
                            beta=0.3, desirable_weight=1.2, undesirable_weight=0.8,
                            loss_type=loss_type, **TORCH)
        assert_close(out_no_z.loss, out.loss.detach(), F64)
    _check(out.loss, want, x)
    assert set(trl_metrics) <= set(out.metrics), set(trl_metrics) - set(out.metrics)
    for name, value in trl_metrics.items():
        assert_close(out.metrics[name], torch.tensor(value, dtype=F64), F64, name=name)


def trl_per_sequence(x):
    """TRL's precomputed columns: the references summed per row (``ref_logps`` [B],
    ``ref_KL_logps`` [B'])."""
    mask, kl_mask = x.labels != -100, x.kl_labels != -100
    return naive.seq(x.ref, mask, False), naive.seq(x.kl_ref, kl_mask, False)


@pytest.mark.parametrize("average", [False, True])
def test_trl_per_sequence_references_equal_per_token(average):
    """TRL's ``ref_logps``/``ref_KL_logps`` (summed per row; divided by the row's count
    here with ``average_log_prob``) give the loss, gradients and metrics of the per-token
    references they sum; with a row that has nothing scored."""
    x = kto_batch(bias=True)
    x.labels[3] = -100
    ref_logps, ref_kl_logps = trl_per_sequence(x)
    kw = dict(kl_hidden=x.kl_hidden, kl_labels=x.kl_labels, bias=x.bias, beta=0.5,
              average_log_prob=average, **TORCH)
    a = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=x.ref,
                 kl_ref_logprobs=x.kl_ref, **kw)
    b = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logps=ref_logps,
                 ref_KL_logps=ref_kl_logps, **kw)
    assert a.metrics["kl"] > 0
    _check(b.loss, a.loss, x)
    for name in a.metrics:
        assert_close(b.metrics[name], a.metrics[name], F64, name=name)
    module = FusedKTOLoss(beta=0.5, average_log_prob=average, backend="torch")
    c = module(x.hidden, x.weight, x.labels, DESIRABLE, ref_logps=ref_logps,
               ref_KL_logps=ref_kl_logps, kl_hidden=x.kl_hidden, kl_labels=x.kl_labels,
               bias=x.bias)
    assert_close(c.loss, a.loss.detach(), F64, name="module loss")


def test_per_sequence_reference_with_the_reference_head_on_the_mismatched_batch():
    """``ref_logps`` for the batch while ``ref_weight`` scores ``kl_ref_hidden``: the
    weight belongs to the estimate, not a second reference of the batch."""
    x = kto_batch()
    kl_ref_hidden = x.kl_hidden + 0.1 * torch.randn_like(x.kl_hidden)
    ref_weight = x.weight.detach() * 1.05
    x.kl_ref = naive.labels_logps(kl_ref_hidden, ref_weight, x.kl_labels)[0]
    out = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logps=trl_per_sequence(x)[0],
                   kl_hidden=x.kl_hidden, kl_labels=x.kl_labels, kl_ref_hidden=kl_ref_hidden,
                   ref_weight=ref_weight, **TORCH)
    _check(out.loss, naive_kto(x, DESIRABLE, z=naive_estimate(x)), x)


# ----------------------------------------------------------------------------------------
# Against Liger's LigerFusedLinearKTOLoss (pure PyTorch; fp32 log-softmax; aligned layout)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("average,kl", [(False, None), (True, 0.4), (False, 1.5)])
def test_matches_liger(average, kl):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    x = kto_batch(bias=True)
    ref_hidden = (x.hidden.detach() + 0.2 * torch.randn_like(x.hidden.detach())).float()
    ref_weight = x.weight.detach().float() * 1.1
    hidden, weight, bias = (t.detach().float().requires_grad_()
                            for t in (x.hidden, x.weight, x.bias))
    loss_fn = liger.LigerFusedLinearKTOLoss(beta=0.5, compiled=False, use_ref_model=True,
                                            average_log_prob=average)
    # Liger is aligned: hidden[:, t] predicts target[:, t] = labels[:, t+1].
    want, aux = loss_fn(hidden[:, :-1], weight, x.labels[:, 1:], bias,
                        preference_labels=DESIRABLE, ref_input=ref_hidden[:, :-1],
                        ref_weight=ref_weight, kl=None if kl is None else torch.tensor(kl))
    out = kto_loss(hidden, weight, x.labels, DESIRABLE, ref_hidden=ref_hidden,
                   ref_weight=ref_weight, bias=bias, kl=kl, beta=0.5, average_log_prob=average,
                   **TORCH)
    assert_close(out.loss, want.detach().double(), torch.float32, name="loss")
    for got, w, name in zip(grads(out.loss, hidden, weight, bias), grads(want, hidden, weight,
                                                                        bias), ("dH", "dW", "db")):
        assert_close(got, w, torch.float32, scale=3, name=name)
    chosen_logps_sum, rejected_logps_sum = aux[0], aux[1]
    assert_close(out.metrics["logps/chosen"] * 3, chosen_logps_sum.double(), torch.float32,
                 scale=10, name="logps/chosen")
    assert_close(out.metrics["logps/rejected"] * 2, rejected_logps_sum.double(), torch.float32,
                 scale=10, name="logps/rejected")


# ----------------------------------------------------------------------------------------
# The mismatched batch, the module, arguments
# ----------------------------------------------------------------------------------------

def test_mismatched_pairs_rotate_completions_like_trl():
    input_ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14], [15, 16, 17, 0, 0, 0]])
    attention = (input_ids != 0).long()
    labels = torch.tensor([[-100, -100, 7, 8, -100, -100], [-100, 10, -100, 12, 13, 14],
                           [-100, -100, 17, -100, -100, -100]])
    ids, lab, mask = mismatched_pairs(input_ids, labels, attention, pad_token_id=0)
    # row i = prompt i + completion i-1 (row 0 takes the last row's); a hole stays a hole
    want_ids = [[5, 6, 17], [9, 7, 8], [15, 16, 10, 11, 12, 13, 14]]
    want_labels = [[-100, -100, 17], [-100, 7, 8], [-100, -100, 10, -100, 12, 13, 14]]
    assert ids.shape == (3, 7) and lab.shape == (3, 7)
    for row in range(3):
        n = len(want_ids[row])
        assert ids[row, :n].tolist() == want_ids[row] and lab[row, :n].tolist() == want_labels[row]
        assert mask[row].tolist() == [1] * n + [0] * (7 - n)
        assert (ids[row, n:] == 0).all() and (lab[row, n:] == -100).all()
    with pytest.raises(ValueError, match="B >= 2"):
        mismatched_pairs(input_ids[:1], labels[:1])


def test_module_stores_options():
    x = kto_batch()
    module = FusedKTOLoss(beta=0.2, undesirable_weight=2.0, backend="torch")
    a = module(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=x.ref, kl=0.1)
    b = kto_loss(x.hidden, x.weight, x.labels, DESIRABLE, ref_logprobs=x.ref, kl=0.1, beta=0.2,
                 undesirable_weight=2.0, **TORCH)
    assert_close(a.loss, b.loss.detach(), F64)
    assert "undesirable_weight=2.0" in repr(module)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(loss_type="bco"), ValueError, "loss_type must be one of"),
    (dict(betta=0.2), TypeError, "did you mean 'beta'"),
    (dict(average_log_prob=1), TypeError, "average_log_prob must be a bool"),
    (dict(beta=0), ValueError, "beta must be a positive"),
    (dict(desirable_weight=-1), ValueError, "desirable_weight must be a"),
    (dict(preference_labels=torch.ones(5)), ValueError, "preference_labels must be a bool"),
    (dict(preference_labels=torch.ones(4, dtype=torch.bool)), ValueError, r"\[B\] = \[5\]"),
    (dict(ref_logprobs=None), ValueError, "needs a reference"),
    (dict(kl=0.1, kl_hidden=torch.zeros(5, 9, 16)), ValueError, "not both"),
    (dict(kl=float("nan")), ValueError, "kl must be a"),
    (dict(kl=torch.zeros(3)), ValueError, r"kl must be a scalar or \[B\]"),
    (dict(kl_hidden=torch.zeros(5, 9, 16)), ValueError, "go together"),
    (dict(kl_hidden=torch.zeros(5, 9, 16), kl_labels=torch.zeros(5, 9)), ValueError,
     "kl_labels must be an integer tensor"),
    (dict(kl_hidden=torch.zeros(5, 9, 16), kl_labels=torch.zeros(5, 9, dtype=torch.long)),
     ValueError, "exactly one of kl_ref_logprobs"),
    (dict(kl_hidden=torch.zeros(5, 9, 16), kl_labels=torch.zeros(5, 9, dtype=torch.long),
          kl_ref_hidden=torch.zeros(5, 9, 16)), ValueError, "pass ref_weight"),
    (dict(ref_logps=torch.zeros(5, dtype=F64)), ValueError,
     r"per-token reference \(ref_logprobs or ref_hidden/ref_weight\) or a per-sequence one "
     r"\(ref_logps\), not both"),
    (dict(ref_logprobs=None, ref_logps=torch.zeros(4, dtype=F64)), ValueError,
     r"ref_logps must be a tensor of shape \[5\]"),
    (dict(ref_logprobs=None, ref_logps=torch.zeros(5, dtype=torch.long)), TypeError,
     "ref_logps must be a floating tensor"),
    (dict(ref_logprobs=None), ValueError, "or TRL's per-sequence ref_logps"),
    (dict(kl_hidden=torch.zeros(5, 11, 16, dtype=F64), kl_labels=torch.zeros(5, 11, dtype=torch.long),
          kl_ref_logprobs=torch.zeros(5, 11, dtype=F64), ref_KL_logps=torch.zeros(5, dtype=F64)),
     ValueError, "exactly one of .* got kl_ref_logprobs, ref_KL_logps"),
    (dict(kl_hidden=torch.zeros(5, 11, 16, dtype=F64), kl_labels=torch.zeros(5, 11, dtype=torch.long),
          ref_KL_logps=torch.zeros(3, dtype=F64)), ValueError,
     r"ref_KL_logps must be a tensor of shape \[5\]"),
    (dict(ref_KL_logps=torch.zeros(5, dtype=F64)), ValueError,
     "kl_hidden .* and kl_labels .* go together; got only ref_KL_logps"),
    (dict(kl=0.1, ref_KL_logps=torch.zeros(5, dtype=F64)), ValueError, "not both"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    x = kto_batch()
    preference = kwargs.pop("preference_labels", DESIRABLE)
    kwargs = {"ref_logprobs": x.ref, **kwargs}
    with pytest.raises(error, match=match):
        kto_loss(x.hidden, x.weight, x.labels, preference, **kwargs, **TORCH)
