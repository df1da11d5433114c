"""Tests of pilot.py: every equation of SPEC sections 2-5 against hand-computed values or a
slow reference written here by loops. Tiny shapes, CPU, seconds."""

import math

import pytest
import torch
import torch.nn as nn

import pilot
from pilot import (AUX_KEYS, LoRALinear, PlainConnector, Stage2Connector, TaskClientConnector, add_lora,
                   stage2_from_stage1, difference_loss, expert_tasks, lora_state_dict,
                   merge_lora, task_average, weighted_average)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def ata_of(states, n, top_m=None, form="spread", tau=None):
    """ATA's W for LoRA states, as the server computes it: pilot.ata over pilot.pairwise_distances."""
    return pilot.ata(pilot.pairwise_distances(states), n, form, top_m, tau)


# -----------------------------------------------------------------------------
# LoRA


def test_lora_output_equals_formula_and_merged_layer():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()                       # make the update non-zero
    x = torch.randn(4, 6)
    expected = base(x) + 2.0 * x @ layer.lora_A.t() @ layer.lora_B.t()   # scale = 6/3
    torch.testing.assert_close(layer(x), expected)
    merged = merge_lora(nn.Sequential(layer))[0]
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_with_zero_B_is_exactly_the_base():
    base = nn.Linear(8, 8)
    x = torch.randn(2, 3, 8)
    assert torch.equal(LoRALinear(base, r=2, alpha=4)(x), base(x))


def test_lora_dropout_acts_on_lora_path_only():
    base = nn.Linear(8, 8)
    layer = LoRALinear(base, r=2, alpha=4, dropout=0.9)   # B = 0: dropout can change nothing
    x = torch.randn(5, 8)
    assert torch.equal(layer.train()(x), base(x))


def test_lora_dropout_masks_come_from_the_set_generator():
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 8)
    pilot.set_dropout_generator(layer, _g(3))
    a = layer(x)
    pilot.set_dropout_generator(layer, _g(3))
    torch.manual_seed(123)                              # the global RNG plays no part
    assert torch.equal(a, layer(x))
    pilot.set_dropout_generator(layer, _g(4))
    assert not torch.equal(a, layer(x))
    # expectation: the mean over many masks approaches the dropout-free output (inverted dropout)
    pilot.set_dropout_generator(layer, _g(0))
    mean = torch.stack([layer(x) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, layer.eval()(x), rtol=0.1, atol=0.1)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(cfg)


def test_add_lora_wraps_exactly_the_decoder_linears():
    model = _tiny_llama()
    wrapped = add_lora(model, r=4, alpha=8)
    expected = [f"model.layers.{i}.{m}" for i in range(2) for m in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(wrapped) == sorted(expected)
    assert type(model.lm_head) is nn.Linear
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"{w}.lora_A" for w in expected] + [f"{w}.lora_B" for w in expected])
    assert sorted(lora_state_dict(model)) == trainable
    ids = torch.randint(0, 50, (2, 7))
    model(ids).logits.sum().backward()               # gradients reach LoRA, nothing else
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_add_lora_refuses_lm_head():
    with pytest.raises(ValueError, match="lm_head"):
        add_lora(_tiny_llama(), r=2, alpha=2, targets=("q_proj", "lm_head"))


def test_merge_lora_keeps_llama_logits():
    model = _tiny_llama().eval()
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids).logits
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# Difference loss


def _naive_difference_loss(a, b):
    """The released code, D x D matrix and all."""
    xa, xb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    xa = xa.div(xa.norm(p=2, dim=1, keepdim=True).detach() + 1e-6)
    xb = xb.div(xb.norm(p=2, dim=1, keepdim=True).detach() + 1e-6)
    return torch.mean(xa.t().mm(xb).pow(2))


def test_difference_loss_equals_the_naive_dxd_formula_with_gradients():
    a = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    fast, naive = difference_loss(a, b), _naive_difference_loss(a.float(), b.float())
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=0)
    ga = torch.autograd.grad(fast, (a, b))
    gn = torch.autograd.grad(_naive_difference_loss(a, b), (a, b))
    for x, y in zip(ga, gn):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-9)


def test_difference_loss_by_hand():
    # rows normalise to [1,1,0,0]/sqrt2 and [0,0,1,1]/sqrt2 for both images, so X_a^T X_b has
    # four entries equal to 2 * 1/2 = 1 and twelve zeros: mean of squares = 4 / 16
    a = torch.zeros(2, 4); a[:, :2] = 1.0
    b = torch.zeros(2, 4); b[:, 2:] = 1.0
    assert difference_loss(a, b).item() == pytest.approx(0.25, rel=1e-5)
    # features living on different images never correlate: exactly 0
    a[1] = 0.0
    b[0] = 0.0
    assert difference_loss(a, b).item() == 0.0


# -----------------------------------------------------------------------------
# Connectors


def test_every_connector_returns_the_same_aux_keys():
    h = torch.randn(2, 3, 4)
    for conn in (PlainConnector(4, 6), TaskClientConnector(4, 6), Stage2Connector(4, 6, 3), Stage2Connector(4, 6, 3, top_k=1)):
        out = conn(h)
        assert out.tokens.shape == (2, 3, 6)
        assert tuple(out.aux) == AUX_KEYS


def test_stage1_starts_equal_to_the_task_adapter():
    conn = TaskClientConnector(4, 6)
    h = torch.randn(2, 3, 4)
    assert torch.equal(conn(h).tokens, conn.psi_t(h))     # psi_s zero-initialised [choice]
    released = TaskClientConnector(4, 6, released_init=True)
    assert released.psi_s(h).abs().sum() > 0


def _random_ctmoa(T=3, top_k=None, seed=0, gate=1.0):
    moa = Stage2Connector(4, 6, T, top_k, gate=gate, generator=_g(seed))
    with torch.no_grad():
        for p in moa.parameters():
            p.normal_(std=0.5, generator=_g(seed + 1))     # non-zero psi_c, a non-uniform router
    return moa


def _slow_ctmoa(moa, h):
    """Reference: loops over images, tokens and experts, like the released code (and slower)."""
    B, N, _ = h.shape
    out = torch.zeros(B, N, moa.psi_s.linear_2.out_features)
    for b in range(B):
        for n in range(N):
            x = h[b, n]
            p = torch.softmax(moa.moa.router(x), dim=-1)
            top = torch.topk(p, moa.moa.top_k).indices.tolist()
            z = sum(p[i] for i in top)
            mix = torch.zeros(out.shape[-1])
            for i in top:
                if i == 0:
                    e = moa.moa.psi_t(x)
                else:
                    e = moa.moa.psi_t_other[i - 1](x) + moa.moa.psi_c[i - 1](x)
                mix += p[i] / z * e
            if moa.gate != 1:   # during the ramp: h_0 + g (mixture - h_0); at g = 1 the paper's sum
                mix = moa.moa.psi_t(x) + moa.gate * (mix - moa.moa.psi_t(x))
            out[b, n] = moa.psi_s(x) + mix
    return out


@pytest.mark.parametrize("gate", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("top_k", [3, 2, 1])
def test_ctmoa_equals_a_slow_loop_reference(top_k, gate):
    moa = _random_ctmoa(top_k=top_k, gate=gate)
    h = torch.randn(2, 5, 4, generator=_g(7))
    torch.testing.assert_close(moa(h).tokens, _slow_ctmoa(moa, h), rtol=1e-5, atol=1e-5)


def test_a_ctmoa_built_alone_is_the_papers_formula():
    # x = psi_s(H) + sum_i P_i h_i, by hand, against Stage2Connector's default (no ramp: g = 1)
    moa = _random_ctmoa(top_k=3)
    assert moa.gate.item() == 1.0 and "gate" not in dict(moa.named_parameters())   # a buffer, never learned
    h = torch.randn(2, 5, 4, generator=_g(7))
    with torch.no_grad():
        p = torch.softmax(h @ moa.moa.router.weight.t(), dim=-1)                      # (B, N, T)
        paper = moa.psi_s(h) + sum(p[..., i:i + 1] * moa.moa.expert(i, h) for i in range(3))
    torch.testing.assert_close(moa(h).tokens, paper, rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_k", [3, 1])
def test_the_gate_ramps_from_stage1_to_the_papers_mixture(top_k):
    stage1, adapters = _stage1_and_adapters()
    h = torch.randn(2, 5, 4, generator=_g(9))
    with torch.no_grad():
        stage1.psi_t.load_state_dict(adapters["colour"])
        before = stage1(h).tokens
        moa = stage2_from_stage1(stage1, adapters, "colour", top_k, generator=_g(3))     # g = 0
        paper = stage2_from_stage1(stage1, adapters, "colour", top_k, gate=1.0, generator=_g(3))(h).tokens
        assert torch.equal(moa(h).tokens, before)                       # g = 0: bit for bit the stage-1 output
        moa.gate.fill_(0.25)
        torch.testing.assert_close(moa(h).tokens, 0.75 * before + 0.25 * paper, rtol=0, atol=1e-6)
        moa.gate.fill_(1.0)
        assert torch.equal(moa(h).tokens, paper)                        # g = 1: bit for bit the paper's mixture


def _stage1_and_adapters(seed=0):
    """A trained-looking stage-1 connector and three task adapters that all differ."""
    stage1 = TaskClientConnector(4, 6, generator=_g(seed))
    with torch.no_grad():
        stage1.psi_s.linear_2.weight.normal_(generator=_g(seed + 1))
    adapters = {t: pilot.Adapter(4, 6, generator=_g(seed + 2 + i)).state_dict()
                for i, t in enumerate(("count", "colour", "shape"))}
    return stage1, adapters


@pytest.mark.parametrize("top_k", [3, 2, 1])
def test_continuous_stage2_starts_exactly_where_stage1_ended(top_k):
    stage1, adapters = _stage1_and_adapters()
    h = torch.randn(2, 5, 4, generator=_g(9))
    with torch.no_grad():
        stage1.psi_t.load_state_dict(adapters["colour"])      # stage 1 with psi_t = own global adapter
        before = stage1(h).tokens
        after = stage2_from_stage1(stage1, adapters, "colour", top_k, generator=_g(3))(h).tokens
        jump = stage2_from_stage1(stage1, adapters, "colour", top_k, gate=1.0, generator=_g(3))(h).tokens
    assert ((after - before).norm() / before.norm()).item() <= 1e-5
    assert ((jump - before).norm() / before.norm()).item() > 1e-2   # the paper's mix from step 0 jumps


def test_continuous_stage2_keeps_the_router_learning():
    stage1, adapters = _stage1_and_adapters()
    moa = stage2_from_stage1(stage1, adapters, "colour", generator=_g(3))
    h = torch.randn(2, 5, 4, generator=_g(9))
    out = moa(h)
    (out.tokens.pow(2).sum() + out.aux["balance"] + out.aux["router_z"]).backward()
    assert moa.moa.router.weight.grad.abs().sum().item() > 0          # aux losses train the router from step 0
    moa.zero_grad()
    with torch.no_grad():
        moa.gate.fill_(0.5)
    moa(h).tokens.pow(2).sum().backward()                          # once g != 0 the output reaches it too
    assert moa.moa.router.weight.grad.abs().sum().item() > 0


def test_a_directly_built_ctmoa_adds_nothing_from_psi_s():
    moa = Stage2Connector(4, 6, 3)
    h = torch.randn(2, 3, 4)
    assert torch.equal(moa.psi_s(h), torch.zeros(2, 3, 6))


@pytest.mark.parametrize("top_k", [3, 2, 1])
def test_ctmoa_forward_and_backward_under_bf16_autocast(top_k):
    moa = _random_ctmoa(top_k=top_k)
    h = torch.randn(2, 5, 4, generator=_g(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moa(h)
        loss = out.tokens.float().pow(2).mean() + out.aux["balance"]
    loss.backward()
    ref = _slow_ctmoa(moa, h)
    torch.testing.assert_close(out.tokens.float(), ref, rtol=0.05, atol=0.05)   # bf16 precision
    assert moa.moa.psi_t.linear_1.weight.grad is not None and torch.isfinite(moa.moa.psi_t.linear_1.weight.grad).all()


def test_difference_loss_and_router_stay_float32_under_bf16_autocast():
    # autocast, not the input dtype, picks a matmul's precision: .float() alone is not enough
    a, b = torch.randn(3, 4, 6, generator=_g(1)), torch.randn(3, 4, 6, generator=_g(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = difference_loss(a, b)
    assert under.dtype == torch.float32 and torch.equal(under, difference_loss(a, b))
    moa = _random_ctmoa(top_k=3)
    h = torch.randn(2, 5, 4, generator=_g(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = moa(h).aux["router_z"]
    assert z.dtype == torch.float32 and torch.equal(z, moa(h).aux["router_z"])   # logits in fp32 either way


def test_init_comes_from_the_generator_not_the_global_rng():
    stage1, adapters = _stage1_and_adapters()
    torch.manual_seed(1)
    a = stage2_from_stage1(stage1, adapters, "shape", generator=_g(5)).state_dict()
    torch.manual_seed(2)
    b = stage2_from_stage1(stage1, adapters, "shape", generator=_g(5)).state_dict()
    c = stage2_from_stage1(stage1, adapters, "shape", generator=_g(6)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["moa.router.weight"], c["moa.router.weight"])
    torch.manual_seed(1)
    l1 = LoRALinear(nn.Linear(4, 4), 2, 2.0, generator=_g(5)).lora_A
    torch.manual_seed(2)
    assert torch.equal(l1, LoRALinear(nn.Linear(4, 4), 2, 2.0, generator=_g(5)).lora_A)


def test_ctmoa_top1_sends_each_token_to_one_expert_and_grads_only_to_trainables():
    moa = _random_ctmoa(top_k=1)   # the paper's mixture (g = 1)
    h = torch.randn(2, 5, 4)
    with torch.no_grad():
        chosen = moa.moa.router(h).argmax(-1)                        # (B, N)
    # force expert 2 never to be chosen, then check it gets exactly nothing
    h = h[chosen != 2][None]                                     # (1, n, 4)
    out = moa(h)
    with torch.no_grad():
        chosen = moa.moa.router(h).argmax(-1)[0]
        for n in range(h.shape[1]):
            torch.testing.assert_close(out.tokens[0, n], moa.psi_s(h[0, n]) + moa.moa.expert(int(chosen[n]), h[0, n]))
    out.tokens.sum().backward()
    assert moa.moa.psi_c[1].linear_1.weight.grad is None             # expert 2 unselected: no grad
    assert moa.moa.psi_t.linear_1.weight.grad is not None
    # top-1 renormalised weight is p/p = 1: no signal to the router from the output
    torch.testing.assert_close(moa.moa.router.weight.grad, torch.zeros_like(moa.moa.router.weight))
    assert all(p.grad is None for p in moa.moa.psi_t_other.parameters())  # frozen
    assert all(p.grad is None for p in moa.psi_s.parameters())        # frozen in stage 2


def test_ctmoa_trainable_parameters_are_own_adapter_cross_adapters_and_router():
    names = sorted(n.split(".")[0] for n, p in Stage2Connector(4, 6, 3, gate=0.0).moa.named_parameters() if p.requires_grad)
    assert set(names) == {"psi_t", "psi_c", "router"}         # g is a buffer: the loop sets it
    assert not any(p.requires_grad for p in Stage2Connector(4, 6, 3).psi_s.parameters())


def test_balance_and_z_loss_equal_hand_computed_values():
    moa = Stage2Connector(2, 3, num_tasks=2)
    with torch.no_grad():
        moa.moa.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    h = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])     # one image, two tokens; logits = h
    aux = moa(h).aux
    e = math.e
    p0 = [e * e / (e * e + 1), 0.5]                  # P(expert 0) per token
    # token 0 top-1 = expert 0; token 1 is a tie, argmax picks expert 0 -> f = [1, 0]
    mean_p = [(p0[0] + p0[1]) / 2, 1 - (p0[0] + p0[1]) / 2]
    balance = 4 * (mean_p[0] * 1.0 + mean_p[1] * 0.0) / 2
    z = ((math.log(e * e + 1)) ** 2 + (math.log(2.0)) ** 2) / 2
    assert aux["balance"].item() == pytest.approx(balance, rel=1e-6)
    assert aux["router_z"].item() == pytest.approx(z, rel=1e-6)
    assert aux["difference"].item() == 0.0


def test_a_ctmoa_alone_is_the_papers_ct_moa_and_prox_term_is_fedprox():
    moa = _random_ctmoa(top_k=3).moa                          # CT-MoA(H) = sum_i P_i h_i, nothing else
    h = torch.randn(2, 5, 4, generator=_g(7))
    with torch.no_grad():
        p = torch.softmax(h @ moa.router.weight.t(), dim=-1)                      # (B, N, T)
        out = moa(h)
        torch.testing.assert_close(out.mixture, sum(p[..., i:i + 1] * moa.expert(i, h) for i in range(3)),
                                   rtol=0, atol=1e-6)
        assert torch.equal(out.own, moa.psi_t(h)) and set(out.aux) == {"balance", "router_z"}
        r = pilot.route(h, moa.router, 2)                     # top-2, renormalised
        assert torch.equal(r.top_i, p.topk(2, dim=-1).indices)
        torch.testing.assert_close(r.top_p.sum(-1), torch.ones(2, 5))
    w, a = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [torch.tensor([0.0, 0.0]), torch.tensor([1.0])]
    assert pilot.prox_term(w, a, 0.5).item() == pytest.approx(0.25 * (1 + 4 + 4))   # (mu/2) ||w - w_0||^2


def test_balance_loss_is_exactly_one_for_a_uniform_router():
    moa = Stage2Connector(4, 6, num_tasks=3)
    with torch.no_grad():
        moa.moa.router.weight.zero_()
    assert moa(torch.randn(3, 7, 4)).aux["balance"].item() == pytest.approx(1.0, abs=1e-6)


def test_ctmoa_from_stage1_orders_experts_and_keeps_psi_s():
    torch.manual_seed(0)
    stage1 = TaskClientConnector(4, 6)
    with torch.no_grad():
        stage1.psi_s.linear_2.weight.normal_()
    adapters = {t: pilot.Adapter(4, 6).state_dict() for t in ("count", "colour", "shape")}
    moa = stage2_from_stage1(stage1, adapters, own_task="shape")
    assert expert_tasks(list(adapters), "shape") == ["shape", "colour", "count"]
    assert torch.equal(moa.moa.psi_t.linear_1.weight, adapters["shape"]["linear_1.weight"])
    assert torch.equal(moa.moa.psi_t_other[0].linear_1.weight, adapters["colour"]["linear_1.weight"])
    assert torch.equal(moa.moa.psi_t_other[1].linear_1.weight, adapters["count"]["linear_1.weight"])
    assert torch.equal(moa.psi_s.linear_2.weight, stage1.psi_s.linear_2.weight)
    h = torch.randn(2, 3, 4)
    with torch.no_grad():   # psi_c = 0 at init: expert i is exactly the other task's adapter
        assert torch.equal(moa.moa.expert(1, h), moa.moa.psi_t_other[0](h))


# -----------------------------------------------------------------------------
# Server math


def _states(vectors):
    """Client states with two tensors each, from rows of a (K, 5) matrix."""
    return [{"a": v[:2].clone(), "b": v[2:].reshape(3, 1).clone()} for v in vectors]


def test_weighted_average_by_hand():
    states = _states(torch.tensor([[1.0, 2, 3, 4, 5], [3.0, 4, 5, 6, 7]]))
    avg = weighted_average(states, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(avg["a"], torch.tensor([2.5, 3.5]))
    rows = pilot.weighted_averages(states, torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    torch.testing.assert_close(rows[0]["b"], states[0]["b"])
    torch.testing.assert_close(rows[1]["b"], torch.tensor([[4.0], [5.0], [6.0]]))
    with pytest.raises(ValueError, match="use weighted_averages for a matrix"):   # one return type each
        weighted_average(states, torch.tensor([[1.0, 0.0], [0.5, 0.5]]))


def test_weighted_average_refuses_mismatched_keys():
    with pytest.raises(KeyError):
        weighted_average([{"a": torch.ones(1)}, {"b": torch.ones(1)}], torch.tensor([0.5, 0.5]))


def test_task_average_never_mixes_tasks():
    states = _states(torch.tensor([[1.0] * 5, [3.0] * 5, [100.0] * 5, [7.0] * 5]))
    out = task_average(states, [1, 3, 5, 2], ["vqa", "vqa", "cap", "count"])
    assert sorted(out) == ["cap", "count", "vqa"]
    torch.testing.assert_close(out["vqa"]["a"], torch.full((2,), 2.5))   # (1*1 + 3*3) / 4
    torch.testing.assert_close(out["cap"]["a"], torch.full((2,), 100.0))
    torch.testing.assert_close(out["count"]["b"], torch.full((3, 1), 7.0))


def test_ata_reduces_to_fedavg_when_all_distances_are_equal():
    K = 4
    states = _states(torch.eye(K, 5) * 3.0)          # every pairwise distance is 3 * sqrt(2)
    n = [1, 2, 3, 4]
    W = ata_of(states, n, top_m=K - 1, form="top_m")
    fedavg = torch.tensor(n, dtype=torch.float32) / sum(n)
    torch.testing.assert_close(W, fedavg.expand(K, K))


def test_ata_puts_more_weight_on_nearer_clients_and_only_top_m():
    v = torch.tensor([[0.0] * 5, [1.0] + [0.0] * 4, [3.0] + [0.0] * 4, [10.0] + [0.0] * 4])
    W = ata_of(_states(v), [1, 1, 1, 1], top_m=2, form="top_m")
    torch.testing.assert_close(W.sum(1), torch.ones(4))
    assert W[0, 1] > W[0, 2] > 0 and W[0, 3] == 0      # client 0: neighbours 1 (d=1), 2 (d=3)
    # by hand: a_01 = (1/1)/(1/1 + 1/3) = 0.75; W_00 = 1/3, W_01 = 2/3 * 0.75, W_02 = 2/3 * 0.25
    torch.testing.assert_close(W[0], torch.tensor([1 / 3, 0.5, 1 / 6, 0.0]))


def test_ata_is_invariant_to_scaling_all_lora_tensors():
    torch.manual_seed(0)
    v = torch.randn(5, 5)
    n = [3, 1, 4, 1, 5]
    for form in pilot.ATA_FORMS:
        W = ata_of(_states(v), n, top_m=2, form=form)
        torch.testing.assert_close(ata_of(_states(v * 1000.0), n, top_m=2, form=form), W)
        torch.testing.assert_close(ata_of(_states(v * 1e-3), n, top_m=2, form=form), W)


def test_ata_matches_a_direct_computation_with_cdist():
    torch.manual_seed(1)
    K, M = 6, 3
    v = torch.randn(K, 5, dtype=torch.float64)
    n = torch.tensor([5.0, 1, 2, 8, 3, 3], dtype=torch.float64)
    d = torch.cdist(v, v)
    W = torch.zeros(K, K, dtype=torch.float64)
    for k in range(K):
        others = sorted((d[k, j].item(), j) for j in range(K) if j != k)[:M]
        nbrs = [j for _, j in others]
        score = {j: n[j] / (d[k, j] + 1e-8) for j in nbrs}
        total, n_nbr = sum(score.values()), sum(n[j] for j in nbrs)
        W[k, k] = n[k] / (n[k] + n_nbr)
        for j in nbrs:
            W[k, j] = n_nbr * score[j] / total / (n[k] + n_nbr)
    torch.testing.assert_close(ata_of(_states(v.float()), n.tolist(), top_m=M, form="top_m"), W.float(),
                               rtol=1e-5, atol=1e-6)


def test_ata_top_m_zero_keeps_each_client_local():
    for form in pilot.ATA_FORMS:
        W = ata_of(_states(torch.randn(3, 5)), [1, 2, 3], top_m=0, form=form)
        assert torch.equal(W, torch.eye(3))


# the default form ("spread")

def test_spread_ata_by_hand():
    # clients on a line at 0, 1, 3, 4: every nearest distance is 1, so c = 1 and b_k = 1; the
    # 12 deviations d_kj - o_k are 0,0,0,0,1,1,2,2,2,2,3,3, lower median s = 1
    v = torch.tensor([[0.0] * 5, [1.0] + [0.0] * 4, [3.0] + [0.0] * 4, [4.0] + [0.0] * 4])
    n = [1.0, 2.0, 1.0, 1.0]
    W = ata_of(_states(v), n, form="spread", tau=0.5)
    e = math.exp
    s0 = torch.tensor([1.0, 2 * e(0), 1 * e(-2 / 0.5), 1 * e(-3 / 0.5)])   # z_01 = 0, z_02 = 2, z_03 = 3
    torch.testing.assert_close(W[0], (s0 / s0.sum()).float())
    s1 = torch.tensor([1 * e(0), 2.0, 1 * e(-1 / 0.5), 1 * e(-2 / 0.5)])
    torch.testing.assert_close(W[1], (s1 / s1.sum()).float())
    torch.testing.assert_close(W.sum(1), torch.ones(4))


def _task_world(K: int, ratio: float = 1.2, P: int = 20_000, seed: int = 0):
    """K clients in 3 tasks, LoRA-like vectors: a shared part (the common offset of LoRA
    norms), a task part and a large individual part, scaled so that other tasks sit ~`ratio`
    times as far as task mates (scenario A's LoRAs: ~1.2)."""
    g = _g(seed)
    shared = torch.randn(P, generator=g) * 5
    centres = torch.randn(3, P, generator=g) * (ratio ** 2 - 1) ** 0.5
    tasks = [k % 3 for k in range(K)]
    v = torch.stack([shared + centres[t] + torch.randn(P, generator=g) for t in tasks])
    return [{"A": x[:P // 2].reshape(-1, 4), "B": x[P // 2:]} for x in v], tasks


@pytest.mark.parametrize("K", [9, 27, 81])
def test_spread_ata_keeps_a_clients_weight_on_its_own_task_as_k_grows(K):
    states, tasks = _task_world(K)
    d = pilot.pairwise_distances(states)
    mates, others = d[0, [j for j in range(K) if j and tasks[j] == 0]], d[0, [j for j in range(K) if tasks[j] != 0]]
    assert 1.15 < others.mean() / mates.mean() < 1.25                         # ~20% over a large common offset
    own = lambda W: torch.tensor([sum(W[k, j] for j in range(K) if tasks[j] == tasks[k]) for k in range(K)])
    spread = own(ata_of(states, [8] * K, form="spread"))
    assert spread.min() > 0.9, spread                                          # at every K
    kernel = own(ata_of(states, [8] * K, form="kernel"))
    assert kernel.max() < 0.55                                                 # the earlier form: set by K, not d


def test_spread_ata_gives_fedavg_for_equal_distances_and_is_scale_free():
    n = [1, 2, 3, 4]
    equal = _states(torch.eye(4, 5) * 3.0)                                     # every distance 3 sqrt(2)
    fedavg = (torch.tensor(n, dtype=torch.float32) / sum(n)).expand(4, 4)
    torch.testing.assert_close(ata_of(equal, n, form="spread"), fedavg)
    torch.testing.assert_close(ata_of(_states(torch.ones(4, 5)), n, form="spread"), fedavg)   # identical
    v = torch.randn(6, 5, generator=_g(2))
    W = ata_of(_states(v), n + [2, 2], form="spread")
    torch.testing.assert_close(ata_of(_states(v * 1e4), n + [2, 2], form="spread"), W)


@pytest.mark.parametrize("form", ["spread", "kernel"])
def test_ata_self_weight_rises_as_the_neighbours_move_away(form):
    base = torch.tensor([[0.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0], [0.0, 1, 0, 0, 0], [1.0, 1, 0, 0, 0], [2.0, 1, 0, 0, 0]])
    selfw = []
    for far in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
        v = base.clone()
        v[0, 2] = far                                  # client 0 moves away from all the others
        W = ata_of(_states(v), [1] * 5, form=form)
        torch.testing.assert_close(W.sum(1), torch.ones(5))
        selfw.append(W[0, 0].item())
    assert selfw[0] < 0.5 and selfw[-1] > 0.99, selfw  # a far outlier keeps its own LoRA
    if form == "kernel":                               # (spread's s moves with client 0 too: not monotone)
        assert all(a < b for a, b in zip(selfw, selfw[1:])), selfw


# the earlier distance-driven form ("kernel")

def test_kernel_ata_by_hand():
    # clients on a line at 0, 1, 3: nearest distances 1, 1, 2 -> d_ref = median = 1
    v = torch.tensor([[0.0] * 5, [1.0] + [0.0] * 4, [3.0] + [0.0] * 4])
    n = [1.0, 2.0, 1.0]
    W = ata_of(_states(v), n, form="kernel")       # top_m None: every other client
    e = math.exp
    s0 = torch.tensor([1.0, 2 * e(-1), 1 * e(-3)])     # s_kj = n_j exp(-d_kj / d_ref), s_kk = n_k
    torch.testing.assert_close(W[0], (s0 / s0.sum()).float())
    s2 = torch.tensor([1 * e(-3), 2 * e(-2), 1.0])
    torch.testing.assert_close(W[2], (s2 / s2.sum()).float())
    torch.testing.assert_close(W.sum(1), torch.ones(3))


def test_kernel_ata_gives_fedavg_for_identical_clients_and_is_scale_free():
    n = [3, 1, 2, 6]
    same = _states(torch.ones(4, 5))
    torch.testing.assert_close(ata_of(same, n, form="kernel"),
                               (torch.tensor(n, dtype=torch.float32) / sum(n)).expand(4, 4))
    v = torch.randn(4, 5, generator=_g(2))
    W = ata_of(_states(v), n, top_m=2, form="kernel")
    assert ((W > 0).sum(1) == 3).all()                 # itself and its 2 nearest
    torch.testing.assert_close(ata_of(_states(v * 1e4), n, top_m=2, form="kernel"), W)


def test_top_m_beyond_the_other_clients_means_all_of_them():
    v = torch.randn(3, 5, generator=_g(1))
    for form in pilot.ATA_FORMS:
        torch.testing.assert_close(ata_of(_states(v), [1, 2, 3], top_m=10, form=form),
                                   ata_of(_states(v), [1, 2, 3], top_m=None, form=form))
    with pytest.raises(ValueError, match="ata_top_m"):
        ata_of(_states(v), [1, 2, 3], top_m=-1)
