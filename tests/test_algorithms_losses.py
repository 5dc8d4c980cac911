"""Policy losses: clipping at the boundaries (autograd), aggregation modes and external normalizers, KL,
rollout IS, errors; and end-to-end: advantages + selection + prefix + loss against hand-written
GRPO and BPPO references on a tiny torch LM (loss and gradient)."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_bppo.algorithms import (PrefixRule, aggregate, get_selector, group_advantages,
                                      kl_penalty, policy_loss)

SETTINGS = settings(max_examples=40, deadline=None)
D = torch.float64


def _grad(ratio, adv, **kw):
    old = torch.zeros(1, 1, dtype=D)
    lp = torch.log(torch.tensor([[ratio]], dtype=D)).requires_grad_(True)
    loss, m = policy_loss(lp, old, torch.tensor([adv], dtype=D), torch.ones(1, 1, dtype=torch.bool), **kw)
    loss.backward()
    return loss.item(), lp.grad.item(), m


@pytest.mark.parametrize("ratio, adv, clipped", [
    (1.3, 1.0, True), (1.1, 1.0, False), (0.5, 1.0, False),       # A > 0: only the top clips
    (0.7, -1.0, True), (0.9, -1.0, False), (1.5, -1.0, False),     # A < 0: only the bottom clips
    (1.5, 0.0, False), (1.0, 2.0, False),
])
def test_clip_gradient_cases(ratio, adv, clipped):
    loss, g, m = _grad(ratio, adv, clip_low=0.2, clip_high=0.2)
    lo_hi = min(max(ratio, 0.8), 1.2)
    assert math.isclose(loss, max(-adv * ratio, -adv * lo_hi), rel_tol=1e-12)
    if clipped or adv == 0:
        assert g == 0.0
    else:  # d(-A r)/d logp = -A r
        assert math.isclose(g, -adv * ratio, rel_tol=1e-12)
    assert m["clip_frac"].item() == float(clipped)


def test_exact_boundary_keeps_gradient():
    for adv, sign in ((1.0, 1), (-1.0, -1)):
        r = torch.exp(torch.tensor(sign * 0.15, dtype=D)).item()
        clip = abs(r - 1.0)  # exact in float64: 1 + (r - 1) == r
        assert (1.0 + clip if sign > 0 else 1.0 - clip) == r
        _, g, m = _grad(r, adv, clip_low=clip, clip_high=clip)
        assert math.isclose(g, -adv * r, rel_tol=1e-12) and m["clip_frac"].item() == 0.0
        _, g2, _ = _grad(r * (1 + 1e-9) if sign > 0 else r * (1 - 1e-9), adv, clip_low=clip, clip_high=clip)
        assert g2 == 0.0


@SETTINGS
@given(st.lists(st.tuples(st.floats(-1.5, 1.5), st.floats(-3, 3)), min_size=1, max_size=12),
       st.floats(0.0, 0.5), st.floats(0.0, 0.5))
def test_asymmetric_clip_matches_ppo_formula(pairs, cl, ch):
    lr = torch.tensor([[p[0] for p in pairs]], dtype=D)
    adv = torch.tensor([[p[1] for p in pairs]], dtype=D)
    lp = lr.clone().requires_grad_(True)
    mask = torch.ones_like(lr, dtype=torch.bool)
    loss, _ = policy_loss(lp, torch.zeros_like(lr), adv, mask, clip_low=cl, clip_high=ch)
    loss.backward()
    r = torch.exp(lr)
    ref = torch.maximum(-adv * r, -adv * r.clamp(1 - cl, 1 + ch)).mean()
    assert torch.allclose(loss, ref, atol=1e-12)
    clipped = ((adv > 0) & (r > 1 + ch)) | ((adv < 0) & (r < 1 - cl))
    exp_grad = torch.where(clipped, torch.zeros_like(r), -adv * r) / lr.numel()
    assert torch.allclose(lp.grad, exp_grad, atol=1e-12)


def test_aggregation_modes_differ_as_documented():
    v = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]], dtype=D)
    m = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert aggregate(v, m, "token-mean").item() == pytest.approx(8 / 5)          # long sequences weigh more
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx(2.5)   # every sequence weighs 1
    assert aggregate(v, m, "token-sum-norm", norm_constant=4).item() == pytest.approx(8 / 4 / 2)
    assert aggregate(v, m, "token-mean", normalizer=10).item() == pytest.approx(0.8)
    z = aggregate(v.requires_grad_(True), torch.zeros_like(m), "token-mean")
    z.backward()
    assert z.item() == 0.0 and torch.all(v.grad == 0)
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate(v, m, "token-sum-norm")
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(v, m, "sum")
    with pytest.raises(ValueError, match="normalizer"):
        aggregate(v, m, normalizer=0)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 3), st.integers(0, 10 ** 6),
       st.sampled_from(["token-mean", "seq-mean-token-mean", "token-sum-norm"]))
def test_global_normalizer_sums_micro_batches(B, T, M, seed, mode):
    """Split a batch into M micro-batches: with the global denominator, the losses (and grads) add up."""
    g = torch.Generator().manual_seed(seed)
    n = B * M
    lp = (torch.randn(n, T, generator=g, dtype=D) * 0.3).requires_grad_(True)
    old, adv = torch.randn(n, T, generator=g, dtype=D) * 0.3, torch.randn(n, generator=g, dtype=D)
    mask = torch.rand(n, T, generator=g) < 0.7
    kw = dict(aggregation=mode, norm_constant=8.0, clip_low=0.2, clip_high=0.28)
    full, _ = policy_loss(lp, old, adv, mask, **kw)
    gfull, = torch.autograd.grad(full, lp)
    m = mask.to(D)
    den = {"token-mean": m.sum(), "seq-mean-token-mean": (m.sum(1) > 0).sum(),
           "token-sum-norm": (m.sum(1) > 0).sum()}[mode].item()
    if den == 0:
        return
    parts = [policy_loss(lp[i * B:(i + 1) * B], old[i * B:(i + 1) * B], adv[i * B:(i + 1) * B],
                         mask[i * B:(i + 1) * B], normalizer=den, **kw)[0] for i in range(M)]
    total = sum(parts)
    gsum, = torch.autograd.grad(total, lp)
    assert torch.allclose(total, full, atol=1e-12) and torch.allclose(gsum, gfull, atol=1e-12)


def test_kl_estimators_and_penalty():
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=D)
    ref = torch.tensor([[-1.5, -1.0, -0.5]], dtype=D)
    d = ref - lp
    assert torch.allclose(kl_penalty(lp, ref, "k1"), lp - ref)
    assert torch.allclose(kl_penalty(lp, ref, "k2"), 0.5 * d * d)
    assert torch.allclose(kl_penalty(lp, ref, "k3"), torch.exp(d) - d - 1)
    assert torch.all(kl_penalty(lp, ref, "k3") >= 0)
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(lp, ref, "k4")
    mask = torch.ones_like(lp, dtype=torch.bool)
    x = lp.clone().requires_grad_(True)
    loss, m = policy_loss(x, lp, torch.zeros(1, dtype=D), mask, kl_coef=0.5, ref_logprobs=ref, kl_estimator="k3")
    loss.backward()  # adv = 0: only the KL term; d k3 / d logp = 1 - exp(ref - logp)
    assert torch.allclose(x.grad, 0.5 * (1 - torch.exp(d)) / 3, atol=1e-12)
    assert m["kl"].item() == pytest.approx(kl_penalty(lp, ref).mean().item())


def test_rollout_is():
    mask = torch.ones(1, 2, dtype=torch.bool)
    roll = torch.tensor([[0.0, -3.0]], dtype=D)  # weights exp(0)=1 and exp(3) -> capped at 2
    adv = torch.ones(1, dtype=D)
    x = torch.zeros(1, 2, dtype=D, requires_grad=True)
    loss, m = policy_loss(x, torch.zeros(1, 2, dtype=D), adv, mask, rollout_logprobs=roll, rollout_is="truncated",
                          rollout_is_cap=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(-(1 + 2) / 2)
    assert torch.allclose(x.grad, torch.tensor([[-0.5, -1.0]], dtype=D))
    assert m["rollout_is_clip_frac"].item() == 0.5 and m["rollout_is_mean"].item() == pytest.approx(1.5)


def test_metrics_and_errors():
    lp = torch.tensor([[0.0, 0.5, -0.5, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    _, m = policy_loss(lp, torch.zeros_like(lp), torch.ones(1, dtype=D), mask)
    assert m["tokens"].item() == 3 and m["clip_frac"].item() == pytest.approx(1 / 3)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3) and m["clip_frac_low"].item() == 0
    assert m["ratio_max"].item() == pytest.approx(math.exp(0.5))
    assert m["ratio_min"].item() == pytest.approx(math.exp(-0.5))
    z = torch.zeros(2, 3, dtype=D)
    ok = torch.ones(2, 3, dtype=torch.bool)
    for kw, msg in [(dict(old_logprobs=torch.zeros(2, 4)), "old_logprobs"),
                    (dict(advantages=torch.zeros(3)), "advantages"),
                    (dict(aggregation="mean"), "token-mean"), (dict(kl_coef=0.1), "ref_logprobs"),
                    (dict(rollout_is="truncated"), "rollout_logprobs"),
                    (dict(rollout_is="full"), "truncated"), (dict(clip_low=1.0), "clip_low"),
                    (dict(kl_estimator="k5", ref_logprobs=z), "k3"), (dict(mask=torch.ones(3, 2)), "mask")]:
        args = dict(logprobs=z, old_logprobs=z, advantages=torch.zeros(2), mask=ok)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            policy_loss(args.pop("logprobs"), args.pop("old_logprobs"), args.pop("advantages"), args.pop("mask"),
                        **args)


# ---------------------------------------------------------------- end to end on a tiny LM
V, PROMPT = 13, 3


def _tiny_models():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V)).to(D)
    old = copy.deepcopy(model)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.3 * torch.randn_like(p))  # old != new so that some tokens clip
    return model, old


def _rollouts(seed, ng=4, G=5):
    g = torch.Generator().manual_seed(seed)
    seqs, rewards = [], []
    for i in range(ng):
        prompt = torch.randint(0, V, (PROMPT,), generator=g).tolist()
        row = []
        for j in range(G):
            n = int(torch.randint(0, 7, (1,), generator=g))
            seqs.append(prompt + torch.randint(0, V, (n,), generator=g).tolist())
            row.append(float(torch.rand(1, generator=g) < 0.5) if i else 1.0)  # group 0 uniform
        rewards.append(row)
    return seqs, torch.tensor(rewards, dtype=D)


def _token_logprob(model, prev, tok):
    return torch.log_softmax(model(torch.tensor([prev]))[0], -1)[tok]


def _ref_loss(model, old, seqs, rewards, keep, clip=0.2, eps=1e-6):
    """Straightforward GRPO / BPPO loss: loops, full-group population std, -min(rA, clip(r)A), token mean."""
    G = rewards.shape[1]
    terms = []
    for gi in range(rewards.shape[0]):
        r = rewards[gi].tolist()
        mu = sum(r) / G
        sd = math.sqrt(sum((x - mu) ** 2 for x in r) / G)
        for j in range(G):
            A = 0.0 if sd == 0 else (r[j] - mu) / (sd + eps)
            s = seqs[gi * G + j]
            for t in range(PROMPT, PROMPT + keep(gi, j)):
                lp = _token_logprob(model, s[t - 1], s[t])
                with torch.no_grad():
                    olp = _token_logprob(old, s[t - 1], s[t])
                ratio = torch.exp(lp - olp)
                terms.append(-torch.minimum(ratio * A, ratio.clamp(1 - clip, 1 + clip) * A))
    return torch.stack(terms).mean()


def _pipeline_loss(model, old, seqs, rewards, selector, rule):
    ng, G = rewards.shape
    L = torch.tensor([len(s) - PROMPT for s in seqs]).reshape(ng, G)
    adv = group_advantages(rewards)
    sel = get_selector(selector)(rewards > 0.5, L, adv, None)
    flat = sel.mask.flatten().nonzero().flatten().tolist()
    resp = L.flatten()[flat]
    keep = rule.lengths(resp)
    assert torch.all(torch.where(resp > 0, (keep >= 1) & (keep <= resp), keep == 0))  # 1 <= k <= L; 0 if L = 0
    cut = [seqs[i][: PROMPT + k] for i, k in zip(flat, keep.tolist())]  # prompt + first k response tokens
    T = max(len(s) for s in cut) - 1
    inp = torch.zeros(len(cut), T, dtype=torch.long)
    tgt = torch.zeros(len(cut), T, dtype=torch.long)
    mask = torch.zeros(len(cut), T, dtype=torch.bool)
    for b, s in enumerate(cut):
        inp[b, :len(s) - 1], tgt[b, :len(s) - 1] = torch.tensor(s[:-1]), torch.tensor(s[1:])
        mask[b, PROMPT - 1:len(s) - 1] = True
    lp = torch.log_softmax(model(inp), -1).gather(-1, tgt[..., None])[..., 0]
    with torch.no_grad():
        olp = torch.log_softmax(old(inp), -1).gather(-1, tgt[..., None])[..., 0]
    return policy_loss(lp, olp, adv.flatten()[flat], mask, clip_low=0.2, clip_high=0.2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_all_full_grpo_reproduces_reference_loss_and_gradient(seed):
    model, old = _tiny_models()
    seqs, rewards = _rollouts(seed)
    G = rewards.shape[1]
    loss, metrics = _pipeline_loss(model, old, seqs, rewards, "all", PrefixRule(mode="full"))
    got = torch.autograd.grad(loss, list(model.parameters()))
    ref = _ref_loss(model, old, seqs, rewards, keep=lambda g, j: len(seqs[g * G + j]) - PROMPT)
    want = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.allclose(loss, ref, rtol=0, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(got, want))
    assert 0 < metrics["clip_frac"].item() < 1


@pytest.mark.parametrize("seed", [4, 5])
def test_binary_prefix_reproduces_reference(seed):
    model, old = _tiny_models()
    seqs, rewards = _rollouts(seed, ng=5, G=6)
    ng, G = rewards.shape
    L = [[len(seqs[g * G + j]) - PROMPT for j in range(G)] for g in range(ng)]

    def keep(g, j):  # shortest correct / incorrect of mixed groups, first ceil(L/2) tokens, floor 2
        r = rewards[g].tolist()
        cor = [i for i in range(G) if r[i] > 0.5]
        wr = [i for i in range(G) if r[i] <= 0.5]
        if not cor or not wr or j not in (min(cor, key=lambda i: (L[g][i], i)), min(wr, key=lambda i: (L[g][i], i))):
            return 0
        n = L[g][j]
        return 0 if n == 0 else min(n, max(math.ceil(n / 2), 2))

    loss, _ = _pipeline_loss(model, old, seqs, rewards, "binary", PrefixRule(ratio=0.5, min_tokens=2))
    ref = _ref_loss(model, old, seqs, rewards, keep=keep)
    got = torch.autograd.grad(loss, list(model.parameters()))
    want = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.allclose(loss, ref, rtol=0, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(got, want))
