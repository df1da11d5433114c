"""The protocol's promises, checked by value (not by names or counts): what a client uploads is,
tensor for tensor, the state it may send; every loss term reaches the optimiser; scores are
computed on what they claim (a spy metric sees each call's records); sampling, the logged mix,
the learning-rate groups and schedule, the spread ATA's neighbours and every resume-refusal key
against hand-computed values. benchmarks/mutants.py applies one-line breaks of these promises to
a copy of the code and shows each is caught (docs/mutants.md)."""

import math
import os

import pytest
import torch

import data
import fed
import model
import pilot
import train
from test_fed import _cfg
from tools import runs

# -----------------------------------------------------------------------------
# The privacy boundary, by value


def _allowed(method: str, state: dict) -> dict:
    """What SPEC section 5 lets a client send, picked here by hand from its state's names: Pilot's
    methods its own task's adapter (psi_t in stage 1, the CT-MoA's h_0 in stage 2) and its LoRA
    factors; fedavg/fedprox the one projector and LoRA; local nothing."""
    shares = fed.METHODS[method].shares
    lora = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
    if shares == "nothing":
        return {}
    if shares == "model":
        own = "connector.projector."
    else:
        own = "connector.moa.psi_t." if "connector.moa.psi_t.linear_1.weight" in state else "connector.psi_t."
    adapter = {k[len(own):]: v for k, v in state.items() if k.startswith(own)}
    assert set(adapter) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"} and lora
    return {("projector" if shares == "model" else "task_adapter"): adapter, "lora": lora}


def _private_adapters(state: dict) -> dict[str, dict]:
    """Every adapter a client keeps, by its prefix: psi_s, each psi_c, the other tasks' frozen
    experts (the same Adapter names as psi_t, so only their values can tell them apart)."""
    out = {}
    for k, v in state.items():
        if k.startswith("connector.") and not k.startswith(("connector.psi_t.", "connector.moa.psi_t.",
                                                             "connector.projector.")) and ".linear_" in k:
            prefix, name = k.split(".linear_")
            out.setdefault(prefix, {})["linear_" + name] = v
    return out


@pytest.mark.parametrize("method", fed.METHODS)
def test_what_a_client_uploads_is_the_state_it_may_send_tensor_for_tensor(tiny_llava_dir, method):
    f = train.build(_cfg(tiny_llava_dir, method))
    for r in (1, 2):                                  # stage 1 (with the handover), then stage 2
        opened = f.coord.train_and_aggregate(r, f.engine)
        assert sorted(opened.uploads) == list(range(len(f.engine.clients)))   # local: each an empty message
        for k, up in opened.uploads.items():
            want = _allowed(method, f.engine.states[k])      # the state local training left the client with
            assert set(up) == set(want)
            for group in want:
                assert set(up[group]) == set(want[group])
                assert all(torch.equal(up[group][n], want[group][n]) for n in want[group]), (method, r, group)
            # and the adapter sent is none of those the client keeps (psi_s has psi_t's names once
            # the prefix is stripped: only the values tell them apart)
            sent = up.get("task_adapter")
            kept = _private_adapters(f.engine.states[k])
            assert (sent is None) == (method == "local" or fed.METHODS[method].shares == "model")
            assert sent is None or ("connector.psi_s" in kept or "connector.moa.psi_s" in kept)
            for prefix, adapter in kept.items():
                if sent is not None and set(adapter) == set(sent):
                    assert not all(torch.equal(sent[n], adapter[n]) for n in sent), (method, r, prefix)
        f.engine.deliver(r, opened.agg.downloads, opened.handover)
    if method in ("pilot", "pilot_no_diff", "pilot_fedavg_lora", "pilot_task_oracle"):
        assert f.engine.stage == 2 and "connector.moa.psi_c.0.linear_1.weight" in f.engine.states[0]


# -----------------------------------------------------------------------------
# Every loss term reaches the optimiser


def test_total_loss_adds_each_weighted_term_by_hand():
    out = model.Output(torch.tensor(2.0), {"difference": torch.tensor(3.0), "balance": torch.tensor(5.0),
                                           "router_z": torch.tensor(7.0)}, None)
    loss = fed.total_loss(out, {"difference": 0.1, "balance": 0.01, "router_z": 0.001})
    assert loss.item() == pytest.approx(2.0 + 0.3 + 0.05 + 0.007)


@pytest.mark.parametrize("method,stage,want", [
    ("pilot", 1, {"difference": 0.1, "balance": 0.0, "router_z": 0.0}),
    ("pilot_no_diff", 1, {"difference": 0.0, "balance": 0.0, "router_z": 0.0}),
    ("pilot", 2, {"difference": 0.5, "balance": 0.1, "router_z": 0.01}),
    ("pilot_no_diff", 2, {"difference": 0.5, "balance": 0.1, "router_z": 0.01})])
def test_each_stage_weighs_the_losses_the_spec_names(method, stage, want):
    cfg = fed.FedConfig(method=method, lambda_d=0.1, lambda_d_stage2=0.5, lambda_b=0.1, lambda_z=0.01)
    client = fed.Client.__new__(fed.Client)
    client.cfg = cfg
    assert client.loss_weights(stage) == want


def test_the_stage1_difference_loss_is_that_of_the_two_adapters_outputs(tiny_llava_dir):
    base = model.load_llava(tiny_llava_dir)
    conn = model.build_connector("stage1", base, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(conn.psi_s.linear_2.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    m = model.build_model(base, conn, model.ModelConfig(lora_r=2))
    from test_model import _batch
    enc, samples = _batch(base)
    batch = enc.collate(samples)
    out = m(**batch)
    H = m.image_features(batch["pixel_values"])                       # (B, N, C_v)
    want = pilot.difference_loss(conn.psi_t(H), conn.psi_s(H))
    assert want.item() > 0
    torch.testing.assert_close(out.aux["difference"], want)


def _round1(tiny_llava_dir, method):
    f = train.build(_cfg(tiny_llava_dir, method, lambda_d=10.0, prox_mu=1.0))
    rec = f.run_round(1)
    return f.engine.states, rec.losses


def _differ(a, b):
    return any(not torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_the_logged_loss_is_the_sum_the_optimiser_stepped_on(tiny_llava_dir):
    states, losses = _round1(tiny_llava_dir, "pilot")
    for terms in losses.values():
        assert terms["difference"] > 0
        assert terms["loss"] == pytest.approx(terms["ce"] + 10.0 * terms["difference"], rel=1e-5)
    _, prox = _round1(tiny_llava_dir, "fedprox")
    for terms in prox.values():
        assert terms["prox"] > 0 and terms["loss"] == pytest.approx(terms["ce"] + terms["prox"], rel=1e-5)


def test_the_difference_loss_and_the_proximal_term_change_where_a_round_ends(tiny_llava_dir):
    """From one seed: pilot and pilot_no_diff differ only in lambda_d, fedprox and fedavg only
    in mu; each pair must end round 1 in different states."""
    pilot_states, _ = _round1(tiny_llava_dir, "pilot")
    no_diff, no_diff_losses = _round1(tiny_llava_dir, "pilot_no_diff")
    assert _differ(pilot_states, no_diff)
    assert all(t["loss"] == pytest.approx(t["ce"], rel=1e-6) for t in no_diff_losses.values())
    prox_states, _ = _round1(tiny_llava_dir, "fedprox")
    avg_states, avg_losses = _round1(tiny_llava_dir, "fedavg")
    assert _differ(prox_states, avg_states)
    assert all(t["prox"] == 0 for t in avg_losses.values())


# -----------------------------------------------------------------------------
# Scores that can be wrong: a spy metric sees what every scoring call scores


class Spy:
    """A metric that records the references of every call and returns a number that differs
    whenever the answers do (a digest of them), so that a score computed on the wrong state,
    the wrong records or at the wrong point shows as a different value."""

    def __init__(self):
        self.calls = []

    def __call__(self, predictions, references):
        self.calls.append([r[0] for r in references])
        return (hash(tuple(predictions)) % 100_000) / 100_000


@pytest.fixture
def spy(monkeypatch):
    s = Spy()
    monkeypatch.setitem(data.METRICS, "exact", s)
    return s


def test_rounds_score_the_capped_subset_and_the_end_scores_every_record(tiny_llava_dir, spy):
    cfg = _cfg(tiny_llava_dir, eval_max_samples=1)
    cfg.data.test_per_client = 3
    f = train.build(cfg)
    f.run_round(1)
    per_client = {c.name: fed.eval_subset(c.test, 1, cfg.seed, c.name, "test") for c in f.engine.clients}
    # round 1: every client at both points, each on its one capped record
    assert spy.calls == [[s.turns[0][1] for s in per_client[c.name]] for c in f.engine.clients] * 2
    spy.calls.clear()
    full = f.engine.score(0, full=True)
    assert spy.calls == [[s.turns[0][1] for s in f.engine.clients[0].test]] and len(spy.calls[0]) == 3
    cross = f.engine.evaluate_cross()
    others = [o for o in f.engine.clients if o.task != f.engine.clients[0].task]
    first_others = sorted(o.task for o in others)[0]
    want = [s.turns[0][1] for o in others if o.task == first_others for s in per_client[o.name]]
    assert spy.calls[1] == want and set(cross[f.engine.clients[0].name]) == {o.task for o in others}
    assert full["test"] != cross[f.engine.clients[0].name][first_others] or want != spy.calls[0]


def test_after_local_and_after_download_are_the_scores_of_those_two_states(tiny_llava_dir, spy):
    f = train.build(_cfg(tiny_llava_dir, "fedavg"))
    trained = {}
    real = fed.Client.local_round

    def keep(self, state, r, stage, chosen, progress=None):
        out = real(self, state, r, stage, chosen, progress)
        trained[self.k] = {k: v.clone() for k, v in out[0].items()}
        return out
    fed.Client.local_round = keep
    try:
        rec = f.run_round(1)
    finally:
        fed.Client.local_round = real
    for k, c in enumerate(f.engine.clients):
        local = f.engine.nodes[k].score(trained[k], 1)["test"]
        download = f.engine.nodes[k].score(f.engine.states[k], 1)["test"]
        assert rec.after_local[c.name] == local and rec.after_download[c.name] == download
    assert rec.after_local != rec.after_download      # the two points are told apart here


# -----------------------------------------------------------------------------
# The rest, by hand


def test_sampling_changes_with_the_round_and_reaches_every_client():
    coord = fed.Coordinator(fed.FedConfig(method="fedavg", client_fraction=1 / 3), [f"c{i}" for i in range(9)],
                            ["a"] * 9, [1] * 9, seed=0, initial_adapter=None)
    chosen = [tuple(coord.sample_clients(r)) for r in range(1, 21)]
    assert all(len(c) == 3 for c in chosen) and len(set(chosen)) > 5
    assert set().union(*chosen) == set(range(9))
    assert chosen == [tuple(coord.sample_clients(r)) for r in range(1, 21)]   # a function of (seed, round)


def test_the_logged_mix_is_the_row_of_w_summed_by_hand():
    W = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])
    got = fed.mix_shares(W, ["a", "a", "b"])
    want = [{"self": 0.5, "same_task": 0.2, "other_tasks": 0.3}, {"self": 0.6, "same_task": 0.1, "other_tasks": 0.3},
            {"self": 0.5, "same_task": 0.0, "other_tasks": 0.5}]
    assert [{k: pytest.approx(v) for k, v in w.items()} for w in want] == got


def test_learning_rate_groups_and_the_cosine_schedule_by_hand(tiny_llava_dir):
    base = model.load_llava(tiny_llava_dir)
    m = model.build_model(base, model.build_connector("stage1", base), model.ModelConfig(lora_r=2))
    cfg = fed.FedConfig(lr_connector=0.5, warmup_ratio=0.2)
    opt, _ = fed.make_optimizer(m, cfg, lr_lora=0.25)
    names = {id(p): n for n, p in m.named_parameters()}
    for group in opt.param_groups:
        assert group["params"]
        assert all(group["lr"] == (0.25 if pilot.is_lora(names[id(p)]) else 0.5) for p in group["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in m.parameters())
    sched = fed.cosine_schedule(opt, 10, 0.2)                      # 2 warmup steps, then 8 of cosine
    factors = []
    for _ in range(10):
        factors.append(opt.param_groups[0]["lr"] / 0.5)
        opt.step()
        sched.step()
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert factors == pytest.approx(want)


def test_spread_ata_with_one_neighbour_by_hand():
    # four clients on a line at 0, 1, 3, 7: nearest o = (1, 1, 2, 4), c = lower median = 1, b = 1;
    # s = lower median of d_kj - o_k over the 12 pairs = 1; N_k: 1, 0, 1, 2
    x = torch.tensor([0.0, 1.0, 3.0, 7.0], dtype=torch.float64)
    d = (x[:, None] - x[None, :]).abs()
    n = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    W = pilot.ata_spread(d, n, m=1, tau=0.25)
    e4, e12 = math.exp(-4), math.exp(-12)          # z = (2 - 1) / 1 and (4 - 1) / 1, over tau 0.25
    want = torch.tensor([[1 / 3, 2 / 3, 0, 0], [1 / 3, 2 / 3, 0, 0],
                         [0, 2 * e4 / (3 + 2 * e4), 3 / (3 + 2 * e4), 0],
                         [0, 0, 3 * e12 / (4 + 3 * e12), 4 / (4 + 3 * e12)]], dtype=torch.float64)
    torch.testing.assert_close(W, want)


def _changed(value):
    """Another value of the same kind, for a resume to refuse."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return value + ["o_proj"]
    return (value or "x") + "-other"


@pytest.mark.parametrize("key", runs.IDENTITY_KEYS)
def test_resume_refuses_a_change_of_every_identity_key(tmp_path, key):
    import operator
    cfg = train.Config(run_dir=str(tmp_path))
    clients = train.embedded().synthetic_clients("A", data.DataConfig(clients_per_task=1, train_per_client=2,
                                                                      test_per_client=1), 0)
    runs.check_resume(str(tmp_path), cfg, clients)                   # the run's identity, written
    runs.check_resume(str(tmp_path), cfg, clients)                   # the same run: resumes
    section, _, name = key.rpartition(".")
    holder = operator.attrgetter(section)(cfg) if section else cfg
    setattr(holder, name, _changed(getattr(holder, name)))
    with pytest.raises(train.ConfigError, match=rf"--resume refused: .*\b{key}: "):
        runs.check_resume(str(tmp_path), cfg, clients)


def test_ci_run_sets_ci_itself():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = [line.strip() for line in open(os.path.join(root, ".ci", "run")) if not line.lstrip().startswith("#")]
    assert "export CI=true" in lines
    assert lines.index("export CI=true") < next(i for i, line in enumerate(lines) if "pytest" in line)
