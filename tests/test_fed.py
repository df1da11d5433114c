"""Tests of fed.py: the protocol's invariants on a tiny random LLaVA and tiny synthetic data."""

import pytest
import torch

import fed
import pilot
import train
from tools import runs


def _cfg(llava_dir, method="pilot", **fed_kw):
    cfg = train.Config()
    cfg.model.llava = llava_dir
    cfg.model.lora_r = 4
    cfg.data.clients_per_task = 2
    cfg.data.train_per_client = 4
    cfg.data.test_per_client = 2
    cfg.fed = fed.FedConfig(method=method, stage1_rounds=1, stage2_rounds=1, batch_size=2, local_epochs=1,
                            lr_connector=1e-2, lr_lora_stage1=1e-2, lr_lora_stage2=1e-2, **fed_kw)
    return cfg


def _equal_states(a, b):
    return len(a) == len(b) and all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_fedavg_with_one_client_equals_local_training(tiny_llava_dir):
    ran = {}
    for method in ("fedavg", "local"):
        cfg = _cfg(tiny_llava_dir, method)
        cfg.data.clients_per_task = 1
        f = train.build(cfg, clients=train.load_data(cfg)[:1])
        for r in (1, 2):
            f.run_round(r)
        ran[method] = f.engine.states
    assert _equal_states(ran["fedavg"], ran["local"])
    assert not _equal_states(ran["fedavg"], [train.build(_cfg(tiny_llava_dir, "local")).engine.states[0]])  # it trained


def _equidistant_uploads(K, with_adapter):
    """LoRA uploads whose pairwise distances are all equal: one-hot rows scaled."""
    ups = {}
    for k in range(K):
        v = torch.zeros(K)
        v[k] = 2.0
        msg = {"lora": {"lm.x.lora_A": v.clone(), "lm.x.lora_B": v[:1].clone() * 0}}
        if with_adapter:
            msg["task_adapter"] = {"connector.psi_t.linear_1.weight": torch.full((2,), float(k))}
        else:
            msg["projector"] = {"connector.projector.linear_1.weight": torch.full((2,), float(k))}
        ups[k] = msg
    return ups


def test_pilot_with_equal_distances_and_m_k_minus_1_aggregates_lora_like_fedavg():
    n = [3, 1, 2, 6]
    tasks = ["a", "a", "b", "b"]
    pil = fed.Server("pilot", tasks, n, ata_top_m=None, ata_form="top_m").aggregate(_equidistant_uploads(4, True), False).downloads
    avg = fed.Server("fedavg", tasks, n, None).aggregate(_equidistant_uploads(4, False), False).downloads
    for k in range(4):
        torch.testing.assert_close(pil[k]["lora"], avg[k]["lora"])
    expected = torch.tensor(n, dtype=torch.float32) * 2.0 / sum(n)      # by hand: 2 * n_j / N
    torch.testing.assert_close(avg[0]["lora"]["lm.x.lora_A"], expected)
    # task adapters: mean within a task only; client k gets its own task's adapter in stage 1
    torch.testing.assert_close(pil[0]["task_adapter.a"]["connector.psi_t.linear_1.weight"], torch.full((2,), 0.25))
    torch.testing.assert_close(pil[2]["task_adapter.b"]["connector.psi_t.linear_1.weight"], torch.full((2,), 2.75))
    assert set(pil[0]) == {"lora", "task_adapter.a"}


FORBIDDEN = ("psi_s", "psi_c", "router", "psi_t_other")


@pytest.mark.parametrize("method", fed.METHODS)
def test_uploads_never_carry_client_private_parts(tiny_llava_dir, method):
    f = train.build(_cfg(tiny_llava_dir, method))
    sent = []
    real = fed.make_upload

    def spy(m, state):
        msg = real(m, state)
        sent.append(msg)
        return msg
    fed.make_upload = spy
    try:
        for r in (1, 2):
            f.run_round(r)
    finally:
        fed.make_upload = real
    assert len(sent) == 2 * len(f.engine.clients)
    for msg in sent:
        for group in msg.values():
            assert not [k for k in group if any(w in k for w in FORBIDDEN)]
    if method == "local":
        assert all(msg == {} for msg in sent)
    if method.startswith("pilot") and method != "pilot_no_moa":
        assert f.engine.stage == 2 and any("connector.moa.router.weight" in s for s in f.engine.states)


def test_a_pilot_run_shares_task_adapters_within_tasks_and_personalises_lora(tiny_llava_dir):
    f = train.build(_cfg(tiny_llava_dir))
    rec = f.run_round(1)
    by_task = {}
    for c, s in zip(f.engine.clients, f.engine.states):
        by_task.setdefault(c.task, []).append(s)
    adapter = "connector.moa.psi_t.linear_1.weight"   # h_0: the clients are in stage 2 after the handover
    for states in by_task.values():
        assert torch.equal(states[0][adapter], states[1][adapter])
    a, b = list(by_task.values())[:2]
    assert not torch.equal(a[0][adapter], b[0][adapter])
    lora = [k for k in f.engine.states[0] if k.endswith("lora_B")][0]
    assert not torch.equal(f.engine.states[0][lora], f.engine.states[1][lora])            # ATA: one LoRA per client
    psi_s = "connector.psi_s.linear_2.weight"
    assert not torch.equal(f.engine.states[0][psi_s], f.engine.states[1][psi_s])          # psi_s stays personal
    for mix in rec.lora_weights.values():                                 # the log says how LoRA was mixed
        assert mix["self"] > 0 and abs(sum(mix.values()) - 1) < 1e-3
    # communication, by hand: up = LoRA + psi_t, down = LoRA + every task's psi_t (last stage-1 round)
    name = f.engine.clients[0].name
    n_lora = sum(v.numel() for k, v in f.engine.states[0].items() if k.endswith(("lora_A", "lora_B")))
    n_adapter = sum(v.numel() for k, v in f.engine.states[0].items() if k.startswith("connector.moa.psi_t."))
    assert rec.comm[name]["up"] == {"lora": 4 * n_lora, "task_adapter": 4 * n_adapter}
    assert rec.comm[name]["down"] == {"lora": 4 * n_lora, "task_adapter": 4 * n_adapter * len(f.coord.tasks)}

    f.run_round(2)   # stage 2: the CT-MoA's frozen experts hold the other tasks' global adapters
    k = 0
    own = f.engine.clients[k].task
    order = pilot.expert_tasks(f.coord.tasks, own)
    j = next(i for i, c in enumerate(f.engine.clients) if c.task == order[1])
    assert torch.equal(f.engine.states[k]["connector.moa.psi_t_other.0.linear_1.weight"], f.engine.states[j][adapter])


def test_same_seed_same_run_other_seed_other_run(tiny_llava_dir):
    def run(seed):
        cfg = _cfg(tiny_llava_dir, client_fraction=0.5)
        cfg.seed = seed
        f = train.build(cfg)
        recs = [f.run_round(r) for r in (1, 2)]
        return f.engine.states, [rec.clients for rec in recs]
    s0, c0 = run(0)
    s0b, c0b = run(0)
    s1, _ = run(1)
    assert c0 == c0b and len(c0[0]) == 3
    assert _equal_states(s0, s0b)
    assert not _equal_states(s0, s1)


def test_non_finite_loss_names_client_round_and_step(tiny_llava_dir):
    f = train.build(_cfg(tiny_llava_dir))
    with torch.no_grad():
        f.engine.states[0] = {k: (v * float("nan") if "psi_t.linear_1.weight" in k else v) for k, v in f.engine.states[0].items()}
    with pytest.raises(FloatingPointError, match=f"client {f.engine.clients[0].name} round 1 step 0"):
        f.run_round(1)


@pytest.mark.parametrize("ramp,gates", [(3, (2 / 3, 1.0)), (None, (1.0, 1.0)), (0, (1.0, 1.0))])
def test_the_gate_ramps_to_the_papers_mixture_and_each_round_logs_it_and_the_distances(tiny_llava_dir, ramp, gates):
    # 4 samples, batch 2, 1 epoch: 2 steps a round. Ramp R: g = min(1, s / R) after s stage-2 steps
    cfg = _cfg(tiny_llava_dir, stage2_ramp_steps=ramp)
    cfg.fed.stage2_rounds = 2
    f = train.build(cfg)
    first = f.run_round(1)
    assert first.gate is None                                                 # stage 1 has no gate
    assert all(s["connector.gate"].item() == (1.0 if ramp == 0 else 0.0) for s in f.engine.states)   # at the handover
    for r, want in zip((2, 3), gates):
        opened = f.coord.train_and_aggregate(r, f.engine)
        f.engine.deliver(r, opened.agg.downloads, opened.handover)
        rec = runs.round_record(f.coord.names, f.coord.client_tasks, opened, f.engine.taken())
        assert rec.gate == {name: pytest.approx(want, abs=1e-7) for name in f.coord.names}
        assert all(s["connector.gate"].item() == pytest.approx(want, abs=1e-7) for s in f.engine.states)
        ids = sorted(opened.uploads)
        d = pilot.pairwise_distances([opened.uploads[k]["lora"] for k in ids])
        assert rec.lora_distances["clients"] == [f.coord.names[k] for k in ids]
        torch.testing.assert_close(torch.tensor(rec.lora_distances["d"], dtype=torch.float64), d, atol=1e-6, rtol=0)


def test_the_task_oracle_averages_lora_within_each_task_only():
    n, tasks = [1, 3, 2], ["a", "a", "b"]
    ups = {k: {"lora": {"lm.x.lora_A": torch.full((2,), float(10 ** k))},
               "task_adapter": {"connector.psi_t.w": torch.zeros(1)}} for k in range(3)}
    down = fed.Server("pilot_task_oracle", tasks, n, None).aggregate(ups, False).downloads
    torch.testing.assert_close(down[0]["lora"]["lm.x.lora_A"], torch.full((2,), (1 * 1 + 3 * 10) / 4))
    torch.testing.assert_close(down[1]["lora"]["lm.x.lora_A"], torch.full((2,), (1 * 1 + 3 * 10) / 4))
    torch.testing.assert_close(down[2]["lora"]["lm.x.lora_A"], torch.full((2,), 100.0))
