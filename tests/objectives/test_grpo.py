"""GRPO / PPO against a float64 naive implementation of ``objectives.md`` §7, TRL's own
``GRPOTrainer._compute_loss`` (called on the naive per-token log-probs and entropies, so its
gradients reach hidden and weight too) and Liger's ``LigerFusedLinearGRPOLoss``."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fused_losses import FusedGRPOLoss, FusedPPOLoss, grpo_loss, ppo_loss
from fused_losses.objectives import TOKEN_WEIGHTS, _common
from tests.helpers import HAS_TRITON, assert_close
from tests.objectives import naive
from tests.objectives.naive import batch, grads

F64 = torch.float64
TORCH = dict(backend="torch")
LOSS_TYPES = sorted(TOKEN_WEIGHTS)


# ----------------------------------------------------------------------------------------
# Inputs and the naive objective (labels layout throughout)
# ----------------------------------------------------------------------------------------

def rl_batch(rows=4, T=9, *, bias=False, seed=None):
    """``naive.batch`` plus old/ref log-probs near the policy's (ratios around 1, some
    clipped at ε = 0.2), advantages of both signs and the scored mask."""
    hidden, weight, labels, b = batch(rows=rows, T=T, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(5)
    logps, _, mask = naive.labels_logps(hidden.detach(), weight.detach(),
                                        labels, None if b is None else b.detach())
    old = (logps + 0.3 * torch.randn(logps.shape, generator=g, dtype=F64)) * mask
    ref = (logps + 0.5 * torch.randn(logps.shape, generator=g, dtype=F64)) * mask
    adv = torch.randn(rows, generator=g, dtype=F64)
    return SimpleNamespace(hidden=hidden, weight=weight, labels=labels, bias=b, old=old,
                           ref=ref, adv=adv, mask=mask)


def naive_entropy(hidden, weight, labels, bias=None):
    """[B, T] entropy of the logits that predict labels[:, t] (labels layout, 0 at t = 0)."""
    z = naive.logits_of(hidden, weight, bias)
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    return torch.nn.functional.pad(entropy[:, :-1], (1, 0))


def naive_grpo(x, *, old=None, ref=None, adv=None, beta=0.0, eps_low=0.2, eps_high=0.2,
               loss_type="dapo", level="token", max_len=None, entropy_coef=0.0,
               is_ratio=None, delta=None, num_items=None):
    """The contract written token by token, float64."""
    logps, _, mask = naive.labels_logps(x.hidden, x.weight, x.labels, x.bias)
    entropy = naive_entropy(x.hidden, x.weight, x.labels, x.bias)
    adv = x.adv if adv is None else adv
    B, T = x.labels.shape
    counts = mask.sum(-1)
    total_tokens = max(int(counts.sum()), 1) if num_items is None else num_items
    zero = (x.hidden.sum() + x.weight.sum()) * 0  # a graph even when nothing is scored
    loss = zero
    for b in range(B):
        scored = [t for t in range(T) if mask[b, t]]
        old_b = logps[b].detach() if old is None else old[b]
        seq_log_ratio = sum((logps[b, t] - old_b[t] for t in scored), zero) \
            / max(len(scored), 1)
        for t in scored:
            r = torch.exp(seq_log_ratio if level == "sequence" else logps[b, t] - old_b[t])
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            if loss_type == "cispo":
                term = -torch.clamp(r, max=eps_high).detach() * a * logps[b, t]
            else:
                r1 = r if delta is None else torch.clamp(r, max=delta)
                term = -torch.minimum(r1 * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
            if is_ratio is not None:
                term = term * (is_ratio[b] if is_ratio.dim() == 1 else is_ratio[b, t])
            if beta:
                d = ref[b, t] - logps[b, t]
                term = term + beta * (torch.exp(d) - d - 1)
            weight = {"grpo": 1 / (B * max(len(scored), 1)),
                      "bnpo": 1 / max(int(counts.sum()), 1),
                      "dr_grpo": 1 / (B * (max_len or 1)),
                      "dapo": 1 / total_tokens, "cispo": 1 / total_tokens}[loss_type]
            loss = loss + weight * term - entropy_coef * entropy[b, t] / total_tokens
    return loss


def _check(got, want, x, dtype=F64, scale=10):
    assert_close(got, want, dtype, scale=scale, name="loss")
    for g, w, name in zip(grads(got, x.hidden, x.weight, x.bias),
                          grads(want, x.hidden, x.weight, x.bias), ("dH", "dW", "db")):
        assert_close(g, w, dtype, scale=scale, name=name)


# ----------------------------------------------------------------------------------------
# Against the naive float64 objective
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_naive(loss_type, level):
    x = rl_batch()
    kw = dict(beta=0.1, loss_type=loss_type, max_len=12)
    out = grpo_loss(x.hidden, x.weight, x.labels, x.adv, old_logprobs=x.old, ref_logprobs=x.ref,
                    beta=0.1, loss_type=loss_type, importance_sampling_level=level,
                    max_completion_length=12, **TORCH)
    _check(out.loss, naive_grpo(x, old=x.old, ref=x.ref, level=level, **kw), x)


@pytest.mark.parametrize("case", [
    dict(entropy_coef=0.05, bias=True),
    dict(per_token_adv=True, is_ratio="token", delta=1.5, num_items=40),
    dict(is_ratio="sequence", eps_low=0.1, eps_high=0.3, level="sequence"),
    dict(on_policy=True, entropy_coef=-0.02, per_token_adv=True),
], ids=["entropy-bias", "token-adv-isratio-delta-numitems", "seq-isratio", "on-policy"])
def test_options_match_naive(case):
    x = rl_batch(bias=case.get("bias", False))
    g = torch.Generator().manual_seed(9)
    adv = torch.randn(x.labels.shape, generator=g, dtype=F64) if case.get("per_token_adv") \
        else x.adv
    is_ratio = {"token": 0.5 + torch.rand(x.labels.shape, generator=g, dtype=F64),
                "sequence": 0.5 + torch.rand(x.labels.shape[0], generator=g, dtype=F64),
                None: None}[case.get("is_ratio")]
    old = None if case.get("on_policy") else x.old
    kw = dict(eps_low=case.get("eps_low", 0.2), eps_high=case.get("eps_high", 0.2),
              level=case.get("level", "token"), entropy_coef=case.get("entropy_coef", 0.0),
              delta=case.get("delta"), num_items=case.get("num_items"))
    out = grpo_loss(x.hidden, x.weight, x.labels, adv, old_logprobs=old, ref_logprobs=x.ref,
                    beta=0.05, bias=x.bias, epsilon_low=kw["eps_low"],
                    epsilon_high=kw["eps_high"], importance_sampling_level=kw["level"],
                    entropy_coef=kw["entropy_coef"], vllm_is_ratio=is_ratio, delta=kw["delta"],
                    num_items_in_batch=kw["num_items"], **TORCH)
    _check(out.loss, naive_grpo(x, old=old, ref=x.ref, adv=adv, beta=0.05, is_ratio=is_ratio,
                                **kw), x)


@pytest.mark.parametrize("rows,T", [(1, 2), (3, 5)], ids=["one-token", "all-ignored"])
def test_one_token_and_all_ignored(rows, T):
    x = rl_batch(rows=rows, T=T)
    if T == 5:
        x.labels[:] = -100
    else:
        x.labels[0] = torch.tensor([-100, 3])
    for loss_type in LOSS_TYPES:
        out = grpo_loss(x.hidden, x.weight, x.labels, x.adv, old_logprobs=x.old,
                        ref_logprobs=x.ref, beta=0.1, loss_type=loss_type,
                        max_completion_length=4, entropy_coef=0.1, **TORCH)
        want = naive_grpo(x, old=x.old, ref=x.ref, beta=0.1, loss_type=loss_type, max_len=4,
                          entropy_coef=0.1)
        _check(out.loss, want, x)
        assert all(torch.isfinite(v) for v in out.metrics.values()), out.metrics


def test_garbage_at_unscored_positions_never_leaks():
    """NaN/inf in old, ref, advantages and the sampler ratio where nothing is scored (a
    sampler that could not score a token writes NaN there) changes nothing."""
    x = rl_batch()
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(x.labels.shape, generator=g, dtype=F64)
    is_ratio = 0.5 + torch.rand(x.labels.shape, generator=g, dtype=F64)
    clean = dict(old_logprobs=x.old, ref_logprobs=x.ref, vllm_is_ratio=is_ratio)
    dirty = {k: torch.where(x.mask, v, torch.tensor(float("nan"), dtype=F64))
             for k, v in clean.items()}
    dirty["old_logprobs"][:, 0] = float("inf")
    bad_adv = torch.where(x.mask, adv, torch.tensor(float("-inf"), dtype=F64))
    for level in ("token", "sequence"):
        kw = dict(beta=0.1, entropy_coef=0.1, importance_sampling_level=level, **TORCH)
        a = grpo_loss(x.hidden, x.weight, x.labels, adv, **clean, **kw)
        b = grpo_loss(x.hidden, x.weight, x.labels, bad_adv, **dirty, **kw)
        ga, gb = grads(a.loss, x.hidden, x.weight), grads(b.loss, x.hidden, x.weight)
        assert torch.isfinite(b.loss) and all(torch.isfinite(t).all() for t in gb)
        _check_same(a, b, ga, gb)


def _check_same(a, b, ga, gb):
    assert_close(b.loss, a.loss, F64, name="loss")
    for got, want in zip(gb, ga):
        assert_close(got, want, F64, name="grad")
    for name in a.metrics:
        assert_close(b.metrics[name], a.metrics[name], F64, name=name)


@pytest.mark.parametrize("chunk_size", [3, 20])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradient_in_forward_equals_recompute(level, chunk_size, monkeypatch):
    """The torch backend's default (gradients formed in forward over chunks of tokens, of
    whole sequences for GSPO) and the recompute path agree in loss, metrics and gradients;
    chunks of 3 split sequences, a row without a scored token is in no chunk."""
    one_pass, calls = _common.linear_logprobs_loss, []
    monkeypatch.setattr(_common, "linear_logprobs_loss",
                        lambda *a, **k: calls.append(1) or one_pass(*a, **k))
    x = rl_batch(rows=5, bias=True)
    x.labels[2] = -100
    kw = dict(old_logprobs=x.old, ref_logprobs=x.ref, beta=0.1, entropy_coef=0.05,
              bias=x.bias, importance_sampling_level=level, loss_type="grpo",
              chunk_size=chunk_size, return_argmax=True, **TORCH)
    a = grpo_loss(x.hidden, x.weight, x.labels, x.adv, grad_in_forward=False, **kw)
    b = grpo_loss(x.hidden, x.weight, x.labels, x.adv, **kw)
    assert len(calls) == 1  # the default took the one-pass path, grad_in_forward=False not
    _check_same(a, b, grads(a.loss, x.hidden, x.weight, x.bias),
                grads(b.loss, x.hidden, x.weight, x.bias))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_interpreter_float32():
    """The Triton backend (CPU interpreter) takes the entropy's gradient too."""
    x = rl_batch(rows=2, T=6)
    hidden, weight = (t.detach().float().requires_grad_() for t in (x.hidden, x.weight))
    kw = dict(old_logprobs=x.old.float(), ref_logprobs=x.ref.float(), beta=0.1,
              entropy_coef=0.1)
    got = grpo_loss(hidden, weight, x.labels, x.adv.float(), backend="triton", **kw)
    want = naive_grpo(x, old=x.old, ref=x.ref, beta=0.1, entropy_coef=0.1)
    assert_close(got.loss, want, torch.float32, name="loss")
    for g, w in zip(grads(got.loss, hidden, weight), grads(want, x.hidden, x.weight)):
        assert_close(g, w, torch.float32, name="grad")


# ----------------------------------------------------------------------------------------
# Against TRL's GRPOTrainer loss, called on the naive per-token inputs
# ----------------------------------------------------------------------------------------

class _OneProcess:
    """The accelerator calls ``GRPOTrainer._compute_loss`` makes, for a single process."""

    num_processes, sync_gradients = 1, True

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t


def trl_grpo(x, *, loss_type, level, beta, old, adv, entropy_coef=0.0, is_ratio=None,
             eps_low=0.2, eps_high=0.2, max_len=None, accumulation=1):
    """(loss, metrics) from TRL's own ``GRPOTrainer._compute_loss`` with ``self`` a stand-in
    whose model returns the naive float64 log-probs and entropies (labels layout: the mask
    says which columns count, so the prompt columns play no part). ``accumulation``: this
    batch is one of that many equal micro-batches of a generation batch (TRL then divides
    dapo's sum by all their tokens and the entropy bonus by the step count)."""
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    logps, _, mask = naive.labels_logps(x.hidden, x.weight, x.labels, x.bias)
    entropy = naive_entropy(x.hidden, x.weight, x.labels, x.bias)
    metrics = defaultdict(lambda: defaultdict(list))
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), _metrics=metrics, accelerator=_OneProcess(),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropy, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, beta=beta,
        importance_sampling_level=level, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, max_completion_length=max_len,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None,
                             steps_per_generation=accumulation),
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        current_gradient_accumulation_steps=accumulation,
        _entropy_bonus_enabled=entropy_coef != 0,
        entropy_coef=entropy_coef, use_adaptive_entropy=False, aux_loss_enabled=False)
    rows, length = x.labels.shape
    count = mask.sum() * accumulation
    inputs = {"prompt_ids": x.labels.new_zeros(rows, 0), "prompt_mask": mask[:, :0].long(),
              "completion_ids": x.labels.clamp_min(0), "completion_mask": mask.to(F64),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": x.ref,
              "num_items_in_batch": count,
              "importance_sampling_ratio": None if is_ratio is None
              else is_ratio.view(rows, -1)}
    loss = trainer.GRPOTrainer._compute_loss(stand_in, None, inputs)
    # entropy_coef is logged too: TRL's adaptive controller moves it; ours is an argument.
    return loss, {k: v[-1] for k, v in metrics["train"].items() if k != "entropy_coef"}


TRL_CASES = [dict(loss_type=t, level=lv) for t in LOSS_TYPES for lv in ("token", "sequence")]
TRL_CASES += [dict(loss_type="dapo", level="token", entropy_coef=0.05, is_ratio="token",
                   accumulation=2, on_policy=True),
              dict(loss_type="grpo", level="sequence", entropy_coef=0.1, is_ratio="sequence",
                   per_token_adv=True)]


@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_matches_trl_grpo_trainer(case):
    x = rl_batch()
    g = torch.Generator().manual_seed(11)
    adv = torch.randn(x.labels.shape, generator=g, dtype=F64) if case.get("per_token_adv") \
        else x.adv
    is_ratio = {"token": 0.5 + torch.rand(x.labels.shape, generator=g, dtype=F64),
                "sequence": 0.5 + torch.rand(x.labels.shape[0], generator=g, dtype=F64),
                None: None}[case.get("is_ratio")]
    old = None if case.get("on_policy") else x.old
    eps_high = 1.3 if case["loss_type"] == "cispo" else 0.2  # cispo: a cap on r itself
    common = dict(loss_type=case["loss_type"], beta=0.04, entropy_coef=case.get("entropy_coef",
                                                                                0.0))
    accumulation = case.get("accumulation", 1)
    want, trl_metrics = trl_grpo(x, level=case["level"], old=old,
                                 adv=adv.view(adv.shape[0], -1), is_ratio=is_ratio,
                                 eps_high=eps_high, max_len=11, accumulation=accumulation,
                                 **common)
    # With accumulation, num_items_in_batch counts the step's tokens (dapo's divisor and the
    # entropy bonus's); the other loss types are divided by the step count, as TRL does.
    num_items = int(x.mask.sum()) * accumulation if accumulation > 1 else None
    out = grpo_loss(x.hidden, x.weight, x.labels, adv, old_logprobs=old, ref_logprobs=x.ref,
                    importance_sampling_level=case["level"], epsilon_high=eps_high,
                    max_completion_length=11, vllm_is_ratio=is_ratio,
                    num_items_in_batch=num_items, return_entropy=True,
                    **common, **TORCH)
    _check(out.loss, want, x)
    assert set(trl_metrics) <= set(out.metrics), set(trl_metrics) - set(out.metrics)
    for name, value in trl_metrics.items():
        assert_close(out.metrics[name], torch.tensor(value, dtype=F64), F64, name=name)


# ----------------------------------------------------------------------------------------
# Against Liger's LigerFusedLinearGRPOLoss (pure PyTorch, fp32, aligned layout)
# ----------------------------------------------------------------------------------------

LIGER_CASES = [dict(loss_type=t, level="token") for t in LOSS_TYPES]
LIGER_CASES += [dict(loss_type=t, level="sequence") for t in ("grpo", "bnpo", "dr_grpo", "dapo")]
LIGER_CASES += [dict(loss_type="bnpo", level="token", is_ratio=True, beta=0.0, bias=True)]


@pytest.mark.parametrize("case", LIGER_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_matches_liger(case):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    x = rl_batch(bias=case.get("bias", False))
    f32 = [None if t is None else t.detach().float().requires_grad_()
           for t in (x.hidden, x.weight, x.bias)]
    hidden, weight, bias = f32
    beta = case.get("beta", 0.04)
    eps_high = 1.3 if case["loss_type"] == "cispo" else 0.2
    is_ratio = 0.5 + torch.rand(x.labels.shape) if case.get("is_ratio") else None
    loss_fn = liger.LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta != 0, epsilon_high=eps_high,
        loss_type=case["loss_type"], max_completion_length=11,
        importance_sampling_level=case["level"])
    # Liger is aligned: hidden[:, t] predicts selected[:, t] = labels[:, t+1].
    selected = x.labels[:, 1:]
    want, liger_metrics = loss_fn(
        hidden[:, :-1], weight, selected.clamp_min(0), (selected != -100).float(),
        x.adv.float(), bias, ref_per_token_logps=x.ref[:, 1:].float(),
        old_per_token_logps=x.old[:, 1:].float(),
        vllm_is_ratio=None if is_ratio is None else is_ratio[:, 1:])
    out = grpo_loss(hidden, weight, x.labels, x.adv.float(), old_logprobs=x.old.float(),
                    ref_logprobs=x.ref.float(), beta=beta, bias=bias,
                    loss_type=case["loss_type"], importance_sampling_level=case["level"],
                    epsilon_high=eps_high, max_completion_length=11, vllm_is_ratio=is_ratio,
                    **TORCH)
    assert_close(out.loss, want.detach().double(), torch.float32, name="loss")
    for got, w, name in zip(grads(out.loss, *f32), grads(want, *f32), ("dH", "dW", "db")):
        assert_close(got, w, torch.float32, name=name)
    if beta:  # Liger's first metric is the mean k3 over scored tokens
        assert_close(out.metrics["kl"], liger_metrics[0].double(), torch.float32, name="kl")
    if case["level"] == "token" and case["loss_type"] != "cispo":  # its last: the region
        assert_close(out.metrics["clip_ratio/region_mean"], liger_metrics[-1].double(),
                     torch.float32, name="clip")


# ----------------------------------------------------------------------------------------
# PPO, modules, arguments
# ----------------------------------------------------------------------------------------

def test_ppo_is_grpo_with_per_token_advantages():
    x = rl_batch()
    adv = torch.randn(x.labels.shape, dtype=F64)
    a = ppo_loss(x.hidden, x.weight, x.labels, adv, old_logprobs=x.old, epsilon_low=0.1, **TORCH)
    want = naive_grpo(x, old=x.old, adv=adv, eps_low=0.1, loss_type="bnpo")  # no num_items
    _check(a.loss, want, x)
    b = FusedPPOLoss(epsilon_low=0.1, backend="torch")(x.hidden, x.weight, x.labels, adv,
                                                        old_logprobs=x.old)
    assert_close(b.loss, want.detach(), F64, scale=10)
    with pytest.raises(ValueError, match=r"per-token advantages \[B, T\]"):
        ppo_loss(x.hidden, x.weight, x.labels, x.adv, old_logprobs=x.old)
    with pytest.raises(ValueError, match="needs old_logprobs"):
        ppo_loss(x.hidden, x.weight, x.labels, adv, old_logprobs=None)


def test_module_stores_options():
    x = rl_batch()
    module = FusedGRPOLoss(loss_type="dr_grpo", max_completion_length=11, beta=0.1,
                           backend="torch")
    a = module(x.hidden, x.weight, x.labels, x.adv, old_logprobs=x.old, ref_logprobs=x.ref)
    b = grpo_loss(x.hidden, x.weight, x.labels, x.adv, old_logprobs=x.old, ref_logprobs=x.ref,
                  loss_type="dr_grpo", max_completion_length=11, beta=0.1, **TORCH)
    assert_close(a.loss, b.loss.detach(), F64)
    assert "loss_type='dr_grpo'" in repr(module)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(epsilon=0.1), TypeError, r"grpo_loss\(\) got an unexpected keyword argument 'epsilon'"),
    (dict(importance_sampling_level="group"), ValueError, "importance_sampling_level"),
    (dict(beta=-0.1), ValueError, "beta must be a"),
    (dict(epsilon_low=1.0), ValueError, "epsilon_low must be a"),
    (dict(epsilon_high=0), ValueError, "epsilon_high must be a positive"),
    (dict(entropy_coef=float("nan")), ValueError, "entropy_coef must be a"),
    (dict(loss_type="dr_grpo"), ValueError, "pass max_completion_length"),
    (dict(max_completion_length=0), ValueError, "max_completion_length must be a positive"),
    (dict(delta=0.0), ValueError, "delta must be a positive"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be a positive"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch must be"),
    (dict(beta=0.1), ValueError, "needs a reference: pass ref_logprobs"),
    (dict(old_logprobs=torch.zeros(4, 8)), ValueError, "old_logprobs must have the shape"),
    (dict(vllm_is_ratio=torch.ones(4, 3)), ValueError, r"vllm_is_ratio must have shape \[B\]"),
    (dict(advantages=torch.ones(5)), ValueError, r"advantages must have shape \[B\] = \[4\]"),
    (dict(advantages=torch.ones(4, dtype=torch.long)), TypeError, "advantages must be a "
                                                                  "floating tensor"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    x = rl_batch()
    adv = kwargs.pop("advantages", x.adv)
    with pytest.raises(error, match=match):
        grpo_loss(x.hidden, x.weight, x.labels, adv, **kwargs, **TORCH)
