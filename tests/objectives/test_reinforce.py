"""Dense-Path REINFORCE, token rewards and the HTML renderer."""
import re

import pytest
import torch

from fused_losses import (FusedReinforceLoss, reinforce_loss, render_token_rewards,
                          token_rewards)
from tests.helpers import assert_close
from tests.objectives import naive
from tests.objectives.models import HeadNeverCalled, lm_batch, tiny_model
from tests.objectives.naive import batch, grads
from tests.objectives.test_logprobs import naive_token_logprobs

F64 = torch.float64
TORCH = dict(backend="torch")


def naive_reinforce(hidden, weight, labels, rewards, gamma, whiten, kl_coef, init):
    logps, _, mask = naive.labels_logps(hidden, weight, labels)
    B, T = labels.shape
    r = rewards * mask
    if kl_coef:
        r = r - kl_coef * (logps.detach() - init).clamp(-10, 10) * mask
    G = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        acc = 0.0
        for t in reversed(range(T)):
            acc = r[b, t] + gamma * acc
            G[b, t] = acc
    G = G * mask
    if whiten and mask.any():  # nothing scored: nothing to whiten
        vals = G[mask]
        G = (G - vals.mean()) / (vals.std(unbiased=False) + 1e-8) * mask
    return -(logps * G).sum() / B


@pytest.mark.parametrize("gamma,whiten,kl_coef", [(1.0, False, 0.0), (0.9, True, 0.0),
                                                  (0.8, False, 0.3), (1.0, True, 0.1)])
def test_reinforce_matches_naive(gamma, whiten, kl_coef):
    hidden, weight, labels, _ = batch()
    rewards = torch.randn(labels.shape, dtype=F64)
    init = naive.labels_logps(hidden.detach(), weight.detach(), labels)[0] \
        + 0.5 * torch.randn(labels.shape, dtype=F64)
    out = reinforce_loss(hidden, weight, labels, rewards=rewards, gamma=gamma, whiten=whiten,
                         kl_coef=kl_coef, init_logprobs=init if kl_coef else None, **TORCH)
    expected = naive_reinforce(hidden, weight, labels, rewards, gamma, whiten, kl_coef, init)
    assert_close(out.loss, expected, F64, scale=10, name="loss")
    for got, want, name in zip(grads(out.loss, hidden, weight),
                               grads(expected, hidden, weight), ("dH", "dW")):
        assert_close(got, want, F64, scale=10, name=name)
    mask = naive.labels_logps(hidden.detach(), weight.detach(), labels)[2]
    assert_close(out.metrics["reward/mean"], rewards[mask].mean(), F64)


def test_kl_penalty_needs_the_initial_policy():
    hidden, weight, labels, _ = batch()
    rewards = torch.zeros(labels.shape, dtype=F64)
    with pytest.raises(ValueError, match="init_logprobs"):
        reinforce_loss(hidden, weight, labels, rewards=rewards, kl_coef=0.1, **TORCH)
    with pytest.raises(ValueError, match="rewards must have the shape of labels"):
        reinforce_loss(hidden, weight, labels, rewards=rewards[:, 1:], **TORCH)
    with pytest.raises(ValueError, match="gamma must be a finite number in"):
        reinforce_loss(hidden, weight, labels, rewards=rewards, gamma=1.5, **TORCH)
    init_hidden = torch.randn_like(hidden.detach())
    a = reinforce_loss(hidden, weight, labels, rewards=rewards + 1, kl_coef=0.2,
                       init_hidden=init_hidden, init_weight=weight.detach(), **TORCH)
    init = naive.labels_logps(init_hidden, weight.detach(), labels)[0]
    b = reinforce_loss(hidden, weight, labels, rewards=rewards + 1, kl_coef=0.2,
                       init_logprobs=init, **TORCH)
    assert_close(a.loss, b.loss.detach(), F64, name="init from hidden")
    module = FusedReinforceLoss(gamma=0.5, kl_coef=0.2, backend="torch")
    init = torch.zeros(labels.shape, dtype=F64)
    a = module(hidden, weight, labels, rewards=rewards + 1, init_logprobs=init)
    b = reinforce_loss(hidden, weight, labels, rewards=rewards + 1, gamma=0.5, kl_coef=0.2,
                       init_logprobs=init, **TORCH)
    assert_close(a.loss, b.loss.detach(), F64)


def test_token_rewards_are_the_log_ratio_of_two_models():
    sft, ref = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    input_ids, labels, attention_mask = lm_batch()
    with HeadNeverCalled(sft), HeadNeverCalled(ref):
        rewards = token_rewards(sft, ref, input_ids, labels, attention_mask, backend="torch")
    want = naive_token_logprobs(sft, input_ids, labels, attention_mask) \
        - naive_token_logprobs(ref, input_ids, labels, attention_mask)
    assert_close(rewards, want, F64, scale=100)
    assert torch.all(rewards[labels == -100] == 0)


def test_render_colours_tokens_by_reward(tmp_path):
    rewards = torch.tensor([[0.0, 2.0, -1.0, 0.5], [1.0, -2.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    tokens = [["<s>", "x<y", "&", "z"], ["a", "b", "c", "<pad>"]]
    page = render_token_rewards(tokens, rewards, mask, title="demo", path=tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == page
    assert "x&lt;y" in page and "&amp;" in page and "<title>demo</title>" in page
    coloured = re.findall(r'background:rgb\((\d+),(\d+),(\d+)\)" title="([^"]+)">([^<]*)<',
                          page)
    by_token = {tok: (tuple(map(int, rgb)), float(v)) for *rgb, v, tok in coloured}
    assert by_token["x&lt;y"][0] == (255, 0, 0)  # the largest reward: full red
    assert by_token["b"][0] == (0, 0, 255)  # the most negative: full blue
    assert by_token["z"][0] == (255, 191, 191)  # 0.5 / 2 of the way to red
    assert by_token["&amp;"][0][2] == 255 and by_token["&amp;"][0][0] < 255
    assert "&lt;s&gt;" in page and "&lt;s&gt;" not in by_token  # masked: shown, uncoloured
    with pytest.raises(ValueError, match="tokens must be"):
        render_token_rewards([["a"]], rewards)
