"""Runs that cannot be mixed, lost or tricked: a run owns its run_dir (lock, refusal to mix),
--resume checks what it resumes, sampled runs checkpoint and resume, every checkpoint failure
falls back or stops in one line, the CLI fails in one line with exit codes 2 / 1; and the
review's protocol bugs: epoch-aligned batches, stage 2 built from what clients received."""

import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import fed
import pilot
import train
from test_faults import _final_states, _same
from test_fed import _cfg
from test_train import ROOT, _write_config


def _main(config, *extra):
    return train.main(["--config", config, *extra])


# -----------------------------------------------------------------------------
# A run owns its run_dir


def test_a_fresh_run_in_a_used_run_dir_is_refused_and_overwrite_replaces_it(tmp_path, embedded_dir):
    config = _write_config(tmp_path, embedded_dir, stage2_rounds=0)
    first = _main(config)
    run = tmp_path / "run"
    before = _final_states(run)
    with pytest.raises(train.ConfigError, match=r"already holds a run .*--resume.*--overwrite"):
        _main(config, "--set", "seed=1")
    assert _same(_final_states(run), before)                          # nothing of the first run was touched
    second = _main(config, "--set", "seed=1", "--overwrite")
    assert second["seed"] == 1 and first["seed"] == 0
    assert json.load(open(run / "run.json"))["identity"]["seed"] == 1
    assert sorted(os.listdir(run / "ckpt")) == ["round_001", "round_002"]


def test_a_second_process_on_the_same_run_dir_is_refused_at_once(tmp_path, embedded_dir):
    config = _write_config(tmp_path, embedded_dir)
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "a+") as held:              # another process holds the run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(train.ConfigError, match="is in use by another running process"):
            _main(config)
    assert os.listdir(tmp_path / "run") == [".lock"]


def test_resume_refuses_another_run_naming_each_key_and_changes_nothing(tmp_path, embedded_dir):
    config = _write_config(tmp_path, embedded_dir, stage2_rounds=0)
    _main(config)
    run = tmp_path / "run"
    files = {f: (run / f).read_bytes() for f in ("log.jsonl", "config.resolved.yaml", "run.json")}
    for extra, keys in ((["--set", "fed.method=fedavg"], ["fed.method"]),
                        (["--set", "seed=3", "--set", "fed.top_k=2"], ["fed.top_k", "seed"]),
                        (["--set", "data.clients_per_task=2"], ["clients", "images_sha256", "records_sha256"]),
                        (["--set", "data.train_per_client=12"], ["clients", "images_sha256", "records_sha256"])):
        with pytest.raises(train.ConfigError) as e:
            _main(config, "--resume", *extra)
        assert str(e.value).startswith("--resume refused")
        for key in keys:
            assert f"{key}: " in str(e.value)
        assert {f: (run / f).read_bytes() for f in files} == files      # config.resolved.yaml untouched


def test_resume_may_change_the_rounds_and_says_what_changed(tmp_path, embedded_dir, capsys):
    # fedavg: one stage, so rounds can be added (a pilot run cannot add stage 2 after stage 1
    # ended it: test_faults.test_stage2_rounds_cannot_be_added_after_stage_1_ended_the_run)
    config = _write_config(tmp_path, embedded_dir, method="fedavg", stage1_rounds=1, stage2_rounds=0)
    _main(config)
    res = _main(config, "--resume", "--set", "fed.stage2_rounds=1", "--set", "fed.lr_connector=1e-3")
    assert len(res["rounds"]) == 2
    assert "changed since the run started, applied from the next round: fed.lr_connector, fed.stage2_rounds" \
        in capsys.readouterr().err
    assert yaml.safe_load(open(tmp_path / "run" / "config.resolved.yaml"))["fed"]["stage2_rounds"] == 1


# -----------------------------------------------------------------------------
# Checkpoints: sampled runs, bad meta, nothing readable


def test_a_sampled_pilot_run_checkpoints_and_resumes_exactly(tmp_path, embedded_dir):
    # one client of three per round: most rounds some task has no upload, so its global
    # adapter is still the initial one (which once shared memory across tasks)
    config = _write_config(tmp_path, embedded_dir, client_fraction=0.34)
    reference = _main(config)
    run = tmp_path / "run"
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert all(len(rec["clients"]) == 1 for rec in log)
    final = _final_states(run)
    shutil.rmtree(run / "ckpt" / "round_003")
    resumed = _main(config, "--resume")
    assert resumed["own"] == reference["own"] and resumed["rounds"] == reference["rounds"]
    assert _same(_final_states(run), final)


def test_server_task_adapters_never_share_memory(tiny_llava_dir):
    f = train.build(_cfg(tiny_llava_dir))
    ptrs = [v.data_ptr() for s in f.coord.server.task_adapters.values() for v in s.values()]
    assert len(ptrs) == len(set(ptrs))


def test_a_meta_json_without_its_keys_falls_back_and_nothing_readable_stops(tmp_path, embedded_dir, capsys):
    config = _write_config(tmp_path, embedded_dir)
    reference = _main(config)
    run = tmp_path / "run"
    (run / "ckpt" / "round_003" / "meta.json").write_text('{"seed": 0}')   # parses, lacks round and stage
    resumed = _main(config, "--resume")
    assert "meta.json is unreadable" in capsys.readouterr().err and resumed["own"] == reference["own"]
    log = (run / "log.jsonl").read_text()
    for d in os.listdir(run / "ckpt"):
        (run / "ckpt" / d / "meta.json").write_text("{")
    with pytest.raises(train.RunError, match="no checkpoint in .* is readable; nothing was changed"):
        _main(config, "--resume")
    assert (run / "log.jsonl").read_text() == log                     # the log was not wiped


# -----------------------------------------------------------------------------
# The CLI: one line, exit code 2 (config, data) or 1 (run)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("content,expect", [
    (None, "config not found"),
    (b"\xff\xfe bad bytes", "config is not UTF-8 text"),
    (b"fed: [unclosed", "config is not valid YAML"),
    (b"fed:\n  metod: pilot\n", "unknown config key 'fed.metod'; did you mean fed.method?"),
])
def test_config_failures_are_one_line_with_exit_code_2(tmp_path, content, expect):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_bytes(content)
    out = _cli("--config", str(path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in out.stderr
    if content is None or b"\xff" in content or b"unclosed" in content:
        assert str(path) in lines[0]


def test_a_data_failure_names_the_data_file_not_the_config(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("- {name: c0, task: t, train: missing.json, test: missing.json, image_folder: .}\n")
    out = _cli("--config", os.path.join(ROOT, "config.yaml"), "--set", "data.scenario=manifest",
               "--set", f"data.manifest={bad}", "--set", f"run_dir={tmp_path / 'run'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.json'}: file not found"]


def test_debug_shows_the_traceback(tmp_path):
    out = _cli("--config", str(tmp_path / "none.yaml"), "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr


# -----------------------------------------------------------------------------
# The review's protocol bugs


def test_batches_are_planned_epoch_by_epoch_with_no_empty_step():
    cfg = fed.FedConfig(batch_size=8, local_epochs=4, grad_accum=1)
    plan = fed.plan_batches(33, cfg, torch.Generator().manual_seed(0))
    assert len(plan) == 4 * 5 and all(step and all(step) for step in plan)
    for e in range(4):                                                # each epoch: every sample exactly once
        epoch = [i for step in plan[e * 5:(e + 1) * 5] for mb in step for i in mb]
        assert sorted(epoch) == list(range(33))
    cfg.grad_accum = 2                                                # 5 micro-batches -> 3 steps an epoch
    plan = fed.plan_batches(33, cfg, torch.Generator().manual_seed(0))
    assert [len(step) for step in plan] == [2, 2, 1] * 4


def test_local_train_loss_means_are_over_the_steps_it_took(tiny_llava_dir):
    f = train.build(_cfg(tiny_llava_dir))
    f.coord.cfg.local_epochs, f.coord.cfg.batch_size = 2, 3                       # 4 samples: 2 micro-batches an epoch
    out = f.engine.nodes[0].train(f.engine.states[0], 1, 1)
    assert out["steps"] == 4


def test_stage2_is_built_from_the_adapters_each_client_received(tiny_llava_dir, monkeypatch):
    f = train.build(_cfg(tiny_llava_dir))                            # stage1_rounds = 1: round 1 hands over
    sent = {}
    real = fed.Server.aggregate

    def spy(self, uploads, all_tasks):
        agg = real(self, uploads, all_tasks)
        sent.update({k: {g: {n: t.clone() for n, t in msg.items()} for g, msg in d.items()} for k, d in agg.downloads.items()})
        # whatever the server holds next, clients use what they received
        self.task_adapters = {t: {n: torch.zeros_like(v) for n, v in s.items()} for t, s in self.task_adapters.items()}
        return agg
    monkeypatch.setattr(fed.Server, "aggregate", spy)
    rec = f.run_round(1)
    assert f.engine.stage == 2
    for k, client in enumerate(f.engine.clients):
        order = pilot.expert_tasks(f.coord.tasks, client.task)
        for i, task in enumerate(order):
            got = fed.adapter_tensors(f.engine.states[k], fed.adapter_prefix(client.task, f.coord.tasks, task))
            assert all(torch.equal(got[n], sent[k][f"task_adapter.{task}"][n]) for n in got), (client.name, task)
            assert got["linear_1.weight"].abs().sum() > 0
        assert rec.comm[client.name]["down"]["task_adapter"] == sum(
            t.numel() * 4 for g, msg in sent[k].items() if g.startswith("task_adapter.") for t in msg.values())


def test_at_the_handover_each_clients_connector_still_computes_its_stage1_output(tiny_llava_dir):
    f = train.build(_cfg(tiny_llava_dir))
    f.run_round(1)                                                    # ends with every client in stage 2
    b = f.engine.shared.base
    h = torch.randn(2, 16, b.vision_width, generator=torch.Generator().manual_seed(0))
    for k in range(len(f.engine.clients)):
        state = f.engine.states[k]
        stage1 = pilot.TaskClientConnector(b.vision_width, b.llm_width)
        stage1.psi_t.load_state_dict(fed.adapter_tensors(state, fed.own_adapter(state)))   # the own global adapter
        stage1.psi_s.load_state_dict(fed.adapter_tensors(state, "connector.psi_s."))
        moa = pilot.Stage2Connector(b.vision_width, b.llm_width, len(f.coord.tasks))
        moa.load_state_dict(fed.adapter_tensors(state, "connector."))
        with torch.no_grad():
            want, got = stage1(h).tokens, moa(h).tokens
        assert state["connector.gate"].item() == 0.0
        assert ((got - want).norm() / want.norm()).item() <= 1e-5
