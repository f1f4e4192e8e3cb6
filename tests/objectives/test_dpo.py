"""The DPO family against naive float64 implementations of TRL's formulas."""
import importlib.util

import pytest
import torch

from fused_losses import FusedDPOLoss, dpo_loss
from fused_losses.objectives import DPO_LOSSES
from tests.helpers import assert_close
from tests.objectives import naive
from tests.objectives.naive import grads, halves, pairs, ref_for

F64 = torch.float64
TORCH = dict(backend="torch")


def naive_dpo(hidden, weight, labels, ref, *, loss_type, beta, eps=0.0, average=False,
              rpo_alpha=None, bias=None, tau=0.05, delta=None):
    logps, _, mask = naive.labels_logps(hidden, weight, labels, bias)
    average = average or loss_type == "ipo"
    rho = naive.seq(logps, mask, average) - naive.seq(ref, mask, average)
    w, l = halves(rho)
    loss = naive.dpo_pair(loss_type, w, l, beta, eps, tau, delta).mean()
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * naive.chosen_nll(logps, mask)
    return loss


def _check(loss, expected, hidden, weight, bias=None):
    assert_close(loss, expected, F64, scale=10, name="loss")
    for got, want, name in zip(grads(loss, hidden, weight, bias),
                               grads(expected, hidden, weight, bias), ("dH", "dW", "db")):
        assert_close(got, want, F64, scale=10, name=name)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_every_loss_type_matches_naive(loss_type, average):
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    beta = 0.1 if average is False else 2.0  # summed: β·h = O(1); averaged: larger β
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, loss_type=loss_type, beta=beta,
                   average_log_prob=average, **TORCH)
    expected = naive_dpo(hidden, weight, labels, ref, loss_type=loss_type, beta=beta,
                         average=average)
    _check(out.loss, expected, hidden, weight)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair"])
def test_label_smoothing(loss_type):
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, loss_type=loss_type,
                   label_smoothing=0.2, **TORCH)
    expected = naive_dpo(hidden, weight, labels, ref, loss_type=loss_type, beta=0.1, eps=0.2)
    _check(out.loss, expected, hidden, weight)


def test_rpo_alpha_bias_and_reference_from_hidden():
    hidden, weight, labels, bias = pairs(bias=True)
    ref_hidden, ref_weight = torch.randn_like(hidden.detach()), torch.randn_like(weight.detach())
    ref_bias = torch.randn(weight.shape[0], dtype=F64)
    ref = naive.labels_logps(ref_hidden, ref_weight, labels, ref_bias)[0]
    out = dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                   ref_weight=ref_weight, ref_bias=ref_bias, rpo_alpha=0.5, **TORCH)
    expected = naive_dpo(hidden, weight, labels, ref, loss_type="sigmoid", beta=0.1,
                         rpo_alpha=0.5, bias=bias)
    _check(out.loss, expected, hidden, weight, bias)
    logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels, bias.detach())
    assert_close(out.metrics["nll_loss"], naive.chosen_nll(logps, mask), F64, name="nll")


def test_discopop_tau():
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, loss_type="discopop", beta=0.5,
                   discopop_tau=0.3, **TORCH)
    expected = naive_dpo(hidden, weight, labels, ref, loss_type="discopop", beta=0.5, tau=0.3)
    _check(out.loss, expected, hidden, weight)


def test_metrics_against_hand_computed_values():
    hidden, weight, labels, _ = pairs(B=3)
    ref = ref_for(hidden, weight, labels, spread=2.0)
    beta = 0.5
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, beta=beta, **TORCH)
    h, w = hidden.detach(), weight.detach()
    logps, _, mask = naive.labels_logps(h, w, labels)
    S = naive.seq(logps, mask, False)
    rho = S - naive.seq(ref, mask, False)
    r_w, r_l = halves(beta * rho)
    z = naive.logits_of(h, w)
    # hidden position t-1 predicts label t: the mean logit over vocab and scored tokens
    pred_mask = torch.nn.functional.pad(mask[:, 1:], (0, 1))
    mean_logit = z.mean(-1)
    chosen_mask, rejected_mask = halves(pred_mask)
    want = {
        "rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
        "rewards/accuracies": (r_w > r_l).double().mean(), "rewards/margins": (r_w - r_l).mean(),
        "logps/chosen": halves(S)[0].mean(), "logps/rejected": halves(S)[1].mean(),
        "logits/chosen": (halves(mean_logit)[0] * chosen_mask).sum() / chosen_mask.sum(),
        "logits/rejected": (halves(mean_logit)[1] * rejected_mask).sum() / rejected_mask.sum(),
    }
    for name, value in want.items():
        assert_close(out.metrics[name], value, F64, name=name)
        assert not out.metrics[name].requires_grad and out.metrics[name].dim() == 0


def test_accuracies_count_strict_wins():
    """Hand-built rewards: pairs where the chosen wins, loses and ties."""
    hidden, weight, labels, _ = pairs(B=3)
    logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)
    S = naive.seq(logps, mask, False)
    margins = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0], dtype=F64)  # ρ = +1, -1, 0 | 0
    ref = logps.clone()
    first = mask.double().argmax(-1)  # move the wanted ρ onto each row's first scored token
    ref[torch.arange(6), first] -= margins
    out = dpo_loss(hidden, weight, labels, ref_logprobs=ref, beta=1.0, **TORCH)
    assert_close(out.metrics["rewards/accuracies"], torch.tensor(1 / 3, dtype=F64), F64)
    assert_close(out.metrics["rewards/margins"], torch.tensor(0.0, dtype=F64), F64)
    assert_close(out.metrics["logps/chosen"], halves(S)[0].mean(), F64)


def test_bco_pair_running_mean_in_the_module():
    hidden, weight, labels, _ = pairs()
    module = FusedDPOLoss(loss_type="bco_pair", beta=0.3, backend="torch")
    deltas, batch_means = [], []
    for step in range(3):
        ref = ref_for(hidden, weight, labels, spread=1.0 + step)
        logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)
        rho = naive.seq(logps, mask, False) - naive.seq(ref, mask, False)
        batch_means.append(0.3 * rho.mean())
        delta = torch.stack(batch_means).mean()  # the running mean over batches, this one in
        out = module(hidden, weight, labels, ref_logprobs=ref)
        w, l = halves(rho)
        # the loss uses δ including this batch, as TRL's RunningMoments.update then .mean
        expected = naive.dpo_pair("bco_pair", w, l, 0.3, delta=delta).mean()
        assert_close(out.loss, expected, F64, name=f"loss step {step}")
        deltas.append(float(module.bco_delta))
        assert_close(module.bco_delta.double(), delta, torch.float32, name="delta")
    assert float(module.bco_count) == 3
    assert "bco_delta" in module.state_dict()
    module.eval()
    module(hidden, weight, labels, ref_logprobs=ref)
    assert float(module.bco_count) == 3  # eval does not move the running mean


def test_bco_delta_given_to_the_module_replaces_the_buffers():
    """Was an internal error (the keyword given twice); now the call's δ and count are used
    and the buffers continue from them."""
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    module = FusedDPOLoss(loss_type="bco_pair", backend="torch")
    out = module(hidden, weight, labels, ref_logprobs=ref, bco_delta=0.5, bco_count=3)
    want = dpo_loss(hidden, weight, labels, ref_logprobs=ref, loss_type="bco_pair",
                    bco_delta=0.5, bco_count=3, **TORCH)
    assert_close(out.loss, want.loss.detach(), F64)
    assert float(module.bco_count) == 4
    assert_close(module.bco_delta.double(), want.metrics["bco/delta"], torch.float32)
    # given at construction: the buffers' starting values (they were ignored before)
    started = FusedDPOLoss(loss_type="bco_pair", backend="torch", bco_delta=0.5, bco_count=3)
    assert_close(started(hidden, weight, labels, ref_logprobs=ref).loss, want.loss.detach(),
                 torch.float32)
    with pytest.raises(ValueError, match="bco_delta must be a finite number"):
        FusedDPOLoss(loss_type="bco_pair", bco_delta=float("nan"))


def _bco_rank_batches(rank, world, steps=2, B=2):
    """Per step, this rank's pairs out of one global batch of world·B pairs."""
    for step in range(steps):
        hidden, weight, labels, _ = pairs(B=world * B, seed=100 + step)
        torch.manual_seed(step)  # ref_for's noise: the same in every process
        ref = ref_for(hidden.detach(), weight.detach(), labels, spread=1.0 + step)
        rows = [i for i in range(world * B)][rank * B:(rank + 1) * B]
        rows = rows + [world * B + i for i in rows]
        yield hidden.detach()[rows], weight.detach(), labels[rows], ref[rows]


def _bco_worker(rank, world, port, out_dir):
    import json
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        module = FusedDPOLoss(loss_type="bco_pair", beta=0.3, backend="torch",
                              bco_process_group=dist.group.WORLD)
        losses = []
        for hidden, weight, labels, ref in _bco_rank_batches(rank, world):
            losses.append(float(module(hidden, weight, labels, ref_logprobs=ref).loss))
        result = dict(losses=losses, delta=float(module.bco_delta),
                      count=float(module.bco_count))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_bco_running_mean_over_ranks(tmp_path):
    """Under DDP every rank folds in every rank's batch mean, as TRL's RunningMoments
    gathers them: the ranks' δ agree and equal the single-process running mean over the
    ranks' batch means (2 gloo processes)."""
    import json
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    world = 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_bco_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    means, delta, count = [], None, 0
    expected_losses = [[] for _ in range(world)]
    for step in range(2):
        per_rank = [list(_bco_rank_batches(r, world))[step] for r in range(world)]
        rhos = []
        for hidden, weight, labels, ref in per_rank:
            logps, _, mask = naive.labels_logps(hidden, weight, labels)
            rhos.append(naive.seq(logps, mask, False) - naive.seq(ref, mask, False))
        means += [0.3 * rho.mean() for rho in rhos]
        delta = torch.stack(means).mean()  # the running mean of every rank's batch means
        count = len(means)
        for r, rho in enumerate(rhos):
            w, l = halves(rho)
            expected_losses[r].append(naive.dpo_pair("bco_pair", w, l, 0.3, delta=delta).mean())
    for r, res in enumerate(results):
        assert res["count"] == count
        assert_close(torch.tensor(res["delta"], dtype=F64), delta, torch.float32,
                     name=f"delta rank {r}")
        for got, want in zip(res["losses"], expected_losses[r]):
            # the module's buffers hold δ in float32 between steps
            assert_close(torch.tensor(got, dtype=F64), want, torch.float32,
                         name=f"loss rank {r}")


@pytest.mark.parametrize("loss_type,average", [("sigmoid", False), ("sigmoid", True),
                                               ("ipo", False)])
def test_trl_per_sequence_reference_equals_per_token(loss_type, average):
    """TRL's precomputed ref_chosen_logps / ref_rejected_logps ([B], summed) give the same
    loss as the per-token reference they sum (length-normalised here where the loss is)."""
    hidden, weight, labels, _ = pairs(B=3)
    ref = ref_for(hidden, weight, labels)
    chosen, rejected = halves(ref.sum(-1))
    kw = dict(loss_type=loss_type, average_log_prob=average, **TORCH)
    a = dpo_loss(hidden, weight, labels, ref_logprobs=ref, **kw)
    b = dpo_loss(hidden, weight, labels, ref_chosen_logps=chosen, ref_rejected_logps=rejected,
                 **kw)
    _check(b.loss, a.loss, hidden, weight)
    for name in a.metrics:
        assert_close(b.metrics[name], a.metrics[name], F64, name=name)


def test_per_sequence_reference_errors_name_the_argument():
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    chosen, rejected = halves(ref.sum(-1))
    with pytest.raises(ValueError, match="ref_chosen_logps and ref_rejected_logps go together"):
        dpo_loss(hidden, weight, labels, ref_chosen_logps=chosen, **TORCH)
    with pytest.raises(ValueError, match=r"ref_rejected_logps must be a tensor of shape \[2\]"):
        dpo_loss(hidden, weight, labels, ref_chosen_logps=chosen,
                 ref_rejected_logps=rejected[:1], **TORCH)
    with pytest.raises(TypeError, match="ref_chosen_logps must be a floating tensor"):
        dpo_loss(hidden, weight, labels, ref_chosen_logps=chosen.long(),
                 ref_rejected_logps=rejected, **TORCH)
    with pytest.raises(ValueError, match="not both"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref, ref_chosen_logps=chosen,
                 ref_rejected_logps=rejected, **TORCH)


def test_discopop_finite_for_large_margins():
    hidden, weight, labels, _ = pairs()
    ref = torch.zeros(labels.shape, dtype=F64)
    for shift in (-1e4, 1e4):
        ref2 = ref.clone()
        ref2[: labels.shape[0] // 2, -2] = shift
        out = dpo_loss(hidden, weight, labels, ref_logprobs=ref2, loss_type="discopop",
                       beta=1.0, **TORCH)
        dh, dw = grads(out.loss, hidden, weight)
        assert torch.isfinite(out.loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()


def test_bad_inputs_are_clear_errors():
    hidden, weight, labels, _ = pairs()
    ref = torch.zeros(labels.shape, dtype=F64)
    with pytest.raises(ValueError, match="odd number"):
        dpo_loss(hidden[:3], weight, labels[:3], ref_logprobs=ref[:3], **TORCH)
    with pytest.raises(ValueError, match="loss_type must be one of .*'ipo'.*'sigmoid'"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref, loss_type="dpo", **TORCH)
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref, beta=-0.1, **TORCH)
    with pytest.raises(ValueError, match="ref_logprobs must have the shape of labels"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref[:, 1:], **TORCH)
    with pytest.raises(ValueError, match="needs a reference"):
        dpo_loss(hidden, weight, labels, **TORCH)
    with pytest.raises(ValueError, match="label_smoothing must be a finite number in"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref, label_smoothing=0.5, **TORCH)
    with pytest.raises(ValueError, match="not both"):
        dpo_loss(hidden, weight, labels, ref_logprobs=ref, ref_hidden=hidden.detach(),
                 ref_weight=weight.detach(), **TORCH)


# ------------------------------------------------------------------------------------------
# Against the peers' own implementations, where they install (they are not dependencies).
# ------------------------------------------------------------------------------------------

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


LIGER_TOL = torch.float32
LIGER_TYPES = ["sigmoid", "robust", "hinge", "exo_pair", "nca_pair", "sppo_hard", "apo_zero",
               "apo_down", "discopop"]  # Liger has no ipo; its bco_pair keeps no running mean


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel not installed (optional peer; "
                    "`pip install liger-kernel` to compare against LigerFusedLinearDPOLoss)")
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_dpo_matches_liger(loss_type, average):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    hidden, weight, labels, _ = pairs()
    ref_hidden, ref_weight = torch.randn_like(hidden.detach()), weight.detach().clone()
    smoothing = {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type, 0.0)
    ours = dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                    beta=0.1, average_log_prob=average, loss_type=loss_type,
                    label_smoothing=smoothing, **TORCH)
    # Liger takes aligned inputs: shift ourselves (hidden[:, t] predicts labels[:, t+1]).
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    liger = LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=False, use_ref_model=True,
                                    average_log_prob=average, compiled=False,
                                    loss_type=loss_type, label_smoothing=smoothing)
    loss, aux = liger(w, h[:, :-1], labels[:, 1:].contiguous(), None,
                      ref_hidden[:, :-1].contiguous(), ref_weight, None)
    # Liger accumulates in float32 whatever the input dtype: compare at float32 tolerance.
    assert_close(ours.loss, loss, LIGER_TOL, name="loss vs Liger")
    for got, want, name in zip(grads(ours.loss, hidden, weight), grads(loss, h, w),
                               ("dH", "dW")):
        assert_close(got, want, LIGER_TOL, name=f"{name} vs Liger")
    chosen_logps, rejected_logps = aux[0], aux[1]
    assert_close(ours.metrics["logps/chosen"], chosen_logps.mean(), LIGER_TOL)
    assert_close(ours.metrics["logps/rejected"], rejected_logps.mean(), LIGER_TOL)
    # (Liger's logits/* average over every position, prompt and padding included; ours, as
    # TRL's, over scored tokens only, so those are not compared.)


class _FusedHeadOutput:
    """What TRL's ``model(..., fused_lm_head=True)`` returns, from materialised logits."""

    def __init__(self, hidden, weight, labels):
        z = naive.logits_of(hidden, weight)[:, :-1]
        logp = z.log_softmax(-1)
        targets = labels[:, 1:]
        scored = targets != -100
        picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        self.log_probs = torch.where(scored, picked, torch.zeros_like(picked))
        self.entropy = -(logp.exp() * logp).sum(-1)
        self.mean_logits = z.mean(-1)
        self.is_top1 = z.argmax(-1) == targets


def _trl_dpo_loss(loss_type, hidden, weight, labels, ref_chosen, ref_rejected, *, beta=0.1,
                  label_smoothing=0.0, tau=0.05):
    """TRL's own DPOTrainer._compute_loss (TRL >= 1.16: the loss lives there) with its
    precomputed per-sequence references, on a stand-in trainer and a stand-in fused head."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    completion_mask = (labels != -100).long()
    inputs = dict(input_ids=labels.clamp_min(0), attention_mask=torch.ones_like(labels),
                  completion_mask=completion_mask, ref_chosen_logps=ref_chosen,
                  ref_rejected_logps=ref_rejected)

    def model(input_ids, labels, fused_lm_head, **_):
        assert fused_lm_head
        return _FusedHeadOutput(hidden, weight, labels)

    model.training = True
    identity = lambda t: t  # noqa: E731  (one process: gathering is the identity)
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=hidden.device, gather=identity,
                                                 gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        args=SimpleNamespace(discopop_tau=tau), _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list)})
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


# TRL >= 1.16 has no running δ for bco_pair and takes log(ε) for exo_pair with ε = 0.
TRL_TYPES = ["sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "sppo_hard",
             "apo_zero", "apo_down", "discopop"]


@pytest.mark.parametrize("loss_type", TRL_TYPES)
def test_pair_losses_match_trl(loss_type):
    """Loss, gradients and metrics against TRL's DPOTrainer, fed TRL's precomputed
    per-sequence references (ref_chosen_logps / ref_rejected_logps)."""
    pytest.importorskip("trl")
    hidden, weight, labels, _ = pairs()
    ref = ref_for(hidden, weight, labels)
    ref_chosen, ref_rejected = halves(ref.sum(-1))
    # exact in float32: TRL makes a float32 tensor of exo_pair's ε
    smoothing = {"robust": 0.125, "exo_pair": 2.0 ** -10}.get(loss_type, 0.0)
    out = dpo_loss(hidden, weight, labels, ref_chosen_logps=ref_chosen,
                   ref_rejected_logps=ref_rejected, loss_type=loss_type,
                   label_smoothing=smoothing, return_argmax=True, **TORCH)
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    theirs, metrics = _trl_dpo_loss(loss_type, h, w, labels, ref_chosen, ref_rejected,
                                    label_smoothing=smoothing)
    tol = torch.float32 if loss_type == "exo_pair" else F64  # TRL: log(1-ε), log ε in float32
    assert_close(out.loss, theirs, tol, scale=10, name=f"loss vs TRL {loss_type}")
    for got, want, name in zip(grads(out.loss, hidden, weight), grads(theirs, h, w),
                               ("dH", "dW")):
        assert_close(got, want, tol, scale=10, name=f"{name} vs TRL")
    # ipo: TRL >= 1.16 logs summed log-probs and rewards, ours (as TRL <= 0.28) the
    # length-normalised ones the loss uses.
    sequence_metrics = () if loss_type == "ipo" else (
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected")
    for name in sequence_metrics + ("logits/chosen", "logits/rejected"):
        assert_close(out.metrics[name], torch.tensor(metrics[name], dtype=F64), F64,
                     name=name)
