"""Independent naive objectives for the tests: materialised float64 logits, the labels'
layout throughout, Python loops where that is clearer. Nothing here imports the package's
objectives, so a shared mistake cannot hide."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def logits_of(hidden, weight, bias=None):
    z = hidden.double() @ weight.double().T
    return z if bias is None else z + bias.double()


def labels_logps(hidden, weight, labels, bias=None):
    """([B, T] log-prob of labels[t] given hidden[t-1], 0 where ignored or t = 0,
    [B, T] lse of hidden[t]'s logits, [B, T] bool scored mask), labels layout."""
    z = logits_of(hidden, weight, bias)
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z - lse.unsqueeze(-1)
    B, T = labels.shape
    logps = torch.zeros(B, T, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in range(1, T):
            if labels[b, t] != IGNORE:
                logps[b, t] = logp_all[b, t - 1, labels[b, t]]
                mask[b, t] = True
    return logps, lse, mask


def seq(values, mask, average):
    total = (values * mask).sum(-1)
    return total / mask.sum(-1).clamp_min(1) if average else total


# ----------------------------------------------------------------------------------------
# f-divergences, written from the table in objectives.md §1
# ----------------------------------------------------------------------------------------

def _phi(name, u):
    if name == "total_variation":
        return u
    if name == "pearson_chi2":
        return u - u * u / 4
    if name == "squared_hellinger":
        return u / (1 + u)
    if name == "kl":
        return -math.exp(-u - 1)
    if name == "reverse_kl":
        return 1 + math.log(u)
    if name == "jensen_shannon":
        return math.log(2 - math.exp(-u))
    if name == "gan":
        return math.log(1 - math.exp(-u))
    raise KeyError(name)


def _dphi(name, u):
    return {"total_variation": lambda: 1.0, "pearson_chi2": lambda: 1 - u / 2,
            "squared_hellinger": lambda: 1 / (1 + u) ** 2, "kl": lambda: math.exp(-u - 1),
            "reverse_kl": lambda: 1 / u, "jensen_shannon": lambda: 1 / (2 * math.exp(u) - 1),
            "gan": lambda: 1 / (math.exp(u) - 1)}[name]()


def cutoff(name, max_weight):
    """u_c where φ'(u_c) = max_weight, solved by hand from the table's φ'."""
    w = max_weight
    return {"squared_hellinger": -1 + 1 / math.sqrt(w), "kl": -1 - math.log(w),
            "reverse_kl": 1 / w, "jensen_shannon": math.log((1 + 1 / w) / 2),
            "gan": math.log(1 + 1 / w)}.get(name)


def phi_safe_scalar(name, u: torch.Tensor, max_weight=10.0):
    """A 0-d float64 tensor u -> φ_safe(u) (differentiable through u)."""
    c = cutoff(name, max_weight)
    if c is not None and float(u.detach()) < c:
        return _phi(name, c) + _dphi(name, c) * (u - c)
    if name == "kl":
        return -torch.exp(-u - 1)
    if name == "reverse_kl":
        return 1 + torch.log(u)
    if name == "jensen_shannon":
        return torch.log(2 - torch.exp(-u))
    if name == "gan":
        return torch.log(1 - torch.exp(-u))
    if name == "squared_hellinger":
        return u / (1 + u)
    if name == "pearson_chi2":
        return u - u * u / 4
    return u


def sft(hidden, weight, labels, ref, *, divergence, beta=1.0, value_mode="sequence",
        value_grad=False, num_items=None, max_weight=10.0, bias=None):
    """objectives.md §1 in the labels layout: label t is predicted from hidden t-1, so the
    state s_t before label t has its lse at hidden t-1 and the state after it at hidden t."""
    logps, lse, mask = labels_logps(hidden, weight, labels, bias)
    if not value_grad:
        lse = lse.detach()
    linear = divergence == "total_variation"
    terms = []
    for b in range(labels.shape[0]):
        scored = [t for t in range(labels.shape[1]) if mask[b, t]]
        if not scored:
            continue
        if value_mode == "token":
            for t in scored:
                rho = logps[b, t] - (0 if linear else ref[b, t])
                dv = lse[b, t - 1] - lse[b, t]  # V(s_t) - V(s_{t+1})
                u = beta * (rho + dv) if (value_grad or not linear) else beta * rho
                terms.append(phi_safe_scalar(divergence, u, max_weight))
        else:
            rho = sum(logps[b, t] - (0 if linear else ref[b, t]) for t in scored)
            dv = lse[b, scored[0] - 1] - lse[b, scored[-1]]  # V(s_0) - V(s_T)
            u = beta * (rho + dv) if (value_grad or not linear) else beta * rho
            terms.append(phi_safe_scalar(divergence, u, max_weight))
    if not terms:
        return hidden.sum() * 0
    total = -torch.stack(terms).sum()
    return total / (int(mask.sum()) if num_items is None else num_items)


# ----------------------------------------------------------------------------------------
# Preference losses, from TRL's formulas
# ----------------------------------------------------------------------------------------

def ls(x):
    return F.logsigmoid(x)


def dpo_pair(loss_type, w, l, beta, eps=0.0, tau=0.05, delta=None):
    h = w - l
    if loss_type == "sigmoid":
        return -(1 - eps) * ls(beta * h) - eps * ls(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * ls(beta * h) + eps * ls(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.clamp(1 - beta * h, min=0)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        e = eps if eps else 1e-3
        p = torch.sigmoid(beta * h)
        return p * (torch.log(p) - math.log(1 - e)) + (1 - p) * (torch.log(1 - p) - math.log(e))
    if loss_type == "nca_pair":
        return -ls(beta * w) - 0.5 * ls(-beta * w) - 0.5 * ls(-beta * l)
    if loss_type == "bco_pair":
        d = torch.cat((beta * w, beta * l)).mean().detach() if delta is None else delta
        return -ls(beta * w - d) - ls(-(beta * l - d))
    if loss_type == "sppo_hard":
        return (w - 0.5 / beta) ** 2 + (l + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * w) + torch.sigmoid(beta * l)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * w) + 1 - torch.sigmoid(beta * h)
    if loss_type == "discopop":
        x = beta * h
        m = torch.sigmoid(x / tau)
        return -ls(x) * (1 - m) + torch.exp(-x) * m
    raise KeyError(loss_type)


def halves(x):
    n = x.shape[0] // 2
    return x[:n], x[n:]


def chosen_nll(logps, mask):
    """Token-mean NLL of the chosen rows; 0 when none of their tokens is scored."""
    lw, mw = halves(logps)[0], halves(mask)[0]
    return -(lw * mw).sum() / max(int(mw.sum()), 1)


def batch(rows=3, T=9, H=16, V=67, *, bias=False, seed=None):
    """Float64 (hidden, weight, labels, bias) with ragged prompts and padding per row: row r
    has a prompt of 1 + r % 3 tokens and r % 2 padding tokens at the end (prompt and padding
    labels are -100); one extra row-wise hole keeps the masks irregular."""
    g = torch.Generator().manual_seed(1234 if seed is None else seed)
    hidden = (torch.randn(rows, T, H, generator=g, dtype=torch.float64) / H ** 0.25)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.25)
    labels = torch.randint(0, V, (rows, T), generator=g)
    for r in range(rows):
        labels[r, : 1 + r % 3] = IGNORE
        if r % 2:
            labels[r, T - 1:] = IGNORE
    if T > 6:
        labels[0, T - 3] = IGNORE  # a hole inside a response
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    leaves = [t.requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return leaves[0], leaves[1], labels, leaves[2]


def pairs(B=2, **kw):
    """``batch`` of B preference pairs: chosen rows first, then rejected."""
    return batch(rows=2 * B, **kw)


def ref_for(hidden, weight, labels, spread=0.3):
    """Reference = policy ± noise, so ρ is O(spread) and every loss is in its curved part."""
    logps, _, mask = labels_logps(hidden.detach(), weight.detach(), labels)
    return (logps + spread * torch.randn(logps.shape, dtype=torch.float64)) * mask


def grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None], allow_unused=True)
