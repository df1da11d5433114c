"""Faults and bad input: a real SIGKILL mid-run and --resume, corrupted checkpoints, non-finite
losses and updates, skipping bad records, the server seeing only uploads."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data
import fed
import train
from test_fed import _cfg
from test_train import ROOT, _write_config
from tools import embedded


def _final_states(run):
    d = run / "ckpt" / sorted(os.listdir(run / "ckpt"))[-1]
    return {f: {k: v.clone() for k, v in load_file(d / f).items()}   # copies: files get rewritten
            for f in sorted(os.listdir(d)) if f.endswith(".safetensors")}


def _same(a, b):
    return a.keys() == b.keys() and all(set(a[f]) == set(b[f]) and all(torch.equal(a[f][k], b[f][k]) for k in a[f])
                                        for f in a)


def _cli(config, *extra):
    return [sys.executable, "train.py", "--config", config, *extra]


# two runs at once on 2 cores: one torch thread each (two threads each would fight over the
# cores in OpenMP's spin-waits and take several times as long)
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def test_sigkill_mid_training_then_resume_equals_an_uninterrupted_run(tmp_path, embedded_dir):
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    ref_cfg = _write_config(ref_dir, embedded_dir, local_epochs=3)
    kill_cfg = _write_config(kill_dir, embedded_dir, local_epochs=3)
    # the uninterrupted reference runs alongside (its result does not depend on the timing)
    ref = subprocess.Popen(_cli(ref_cfg), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(ref_dir / "stderr", "w"),
                           env=ONE_THREAD)
    try:
        _kill_three_times_then_resume(kill_cfg, kill_dir)
        assert ref.wait(timeout=600) == 0, (ref_dir / "stderr").read_text()[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
    reference = json.load(open(ref_dir / "run" / "results.json"))
    resumed = json.load(open(kill_dir / "run" / "results.json"))
    assert resumed["own"] == reference["own"] and resumed["rounds"] == reference["rounds"]
    assert _same(_final_states(kill_dir / "run"), _final_states(ref_dir / "run"))


def _kill_when_logged(proc, run, rounds: int) -> None:
    """SIGKILL the run once its log holds `rounds` rounds (the event: the process is then writing
    that round's checkpoint, training the next round, or scoring at the end), and check that the
    kill landed mid-run: the process died of it, before writing its results. A run that ends
    before the event fails the test rather than passing without a kill."""
    log, deadline = run / "log.jsonl", time.time() + 600            # an outer bound only
    while not (log.exists() and log.read_text().count("\n") >= rounds):
        assert proc.poll() is None, f"the run ended before round {rounds} was logged"
        assert time.time() < deadline, f"round {rounds} was not logged within 600 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and not (run / "results.json").exists(), "the kill did not land mid-run"


def _kill_three_times_then_resume(kill_cfg, kill_dir):
    """SIGKILL the run three times on events, each while it is running: once round 1 is logged
    (its checkpoint being written, or round 2 training), then the resumed runs once rounds 2
    and 3 are logged (round 3 training; the final scoring); then resume it to the end."""
    for i in range(3):
        proc = subprocess.Popen(_cli(kill_cfg, *(["--resume"] if i else [])), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
        try:
            _kill_when_logged(proc, kill_dir / "run", i + 1)
        finally:
            if proc.poll() is None:
                proc.kill()
    done = subprocess.run(_cli(kill_cfg, "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(tmp_path, embedded_dir):
    config = _write_config(tmp_path, embedded_dir)
    reference = train.main(["--config", config])
    run = tmp_path / "run"
    shutil.rmtree(run / "ckpt" / "round_003")
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"round": 3, "stage": 2, "los')              # a kill in the middle of a write
    resumed = train.main(["--config", config, "--resume"])
    assert resumed["rounds"] == reference["rounds"]
    assert [json.loads(line)["round"] for line in open(run / "log.jsonl")] == [1, 2, 3]


def test_corrupted_checkpoint_is_named_and_resume_falls_back(tmp_path, embedded_dir, capsys):
    config = _write_config(tmp_path, embedded_dir)
    reference = train.main(["--config", config])
    run = tmp_path / "run"
    final = _final_states(run)
    victim = run / "ckpt" / "round_003" / "client_colour0.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])          # truncated, as by a crash mid-write
    (run / "ckpt" / ".tmp_round_004").mkdir()                # a half-written round is ignored
    resumed = train.main(["--config", config, "--resume"])
    err = capsys.readouterr().err
    assert f"checkpoint file {victim} is unreadable" in err and "falling back to the previous round" in err
    assert resumed["own"] == reference["own"]
    assert _same(_final_states(run), final)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, embedded_dir):
    config = _write_config(tmp_path, embedded_dir)
    run = tmp_path / "run"
    train.main(["--config", config, "--set", "fed.method=fedavg", "--set", "fed.stage1_rounds=1",
                "--set", "fed.stage2_rounds=0"])
    before = _final_states(run)
    with pytest.raises(train.RunError) as e:
        train.main(["--config", config, "--resume", "--set", "fed.method=fedavg", "--set", "fed.stage1_rounds=1",
                    "--set", "fed.stage2_rounds=1", "--set", "fed.lr_connector=1e30"])
    assert "non-finite loss" in str(e.value) and "round 2 step" in str(e.value) and "client colour0" in str(e.value)
    assert sorted(os.listdir(run / "ckpt")) == ["round_001"]
    assert _same(_final_states(run), before)


def test_stage2_rounds_cannot_be_added_after_stage_1_ended_the_run(tmp_path, embedded_dir):
    config = _write_config(tmp_path, embedded_dir)
    train.main(["--config", config, "--set", "fed.stage1_rounds=1", "--set", "fed.stage2_rounds=0"])
    before = _final_states(tmp_path / "run")
    with pytest.raises(train.RunError, match="fed.stage2_rounds: round 1 ended stage 1"):
        train.main(["--config", config, "--resume", "--set", "fed.stage1_rounds=1", "--set", "fed.stage2_rounds=1"])
    assert _same(_final_states(tmp_path / "run"), before)


def test_a_non_finite_update_is_left_out_of_aggregation(tiny_llava_dir, monkeypatch):
    f = train.build(_cfg(tiny_llava_dir))
    f.coord.cfg.stage1_rounds = 2     # round 1 is then not the broadcast before stage 2
    before = copy.deepcopy(f.engine.states[0])
    real = fed.local_train

    def poisoned(model, enc, samples, *args, **kw):
        out = real(model, enc, samples, *args, **kw)
        if samples is f.engine.clients[0].train:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if n.endswith("lora_B")).fill_(float("inf"))
        return out
    monkeypatch.setattr(fed, "local_train", poisoned)
    rec = f.run_round(1)
    assert rec.excluded == [f.engine.clients[0].name]
    assert rec.comm[f.engine.clients[0].name] == {"up": {}, "down": {"task_adapter": rec.comm[f.engine.clients[0].name]["down"]["task_adapter"]}}
    # it uploaded nothing and got no LoRA back; only its task's global adapter (made from the others)
    assert all(torch.equal(before[k], v) for k, v in f.engine.states[0].items() if not k.startswith(fed.OWN_ADAPTER))
    mate = next(k for k, c in enumerate(f.engine.clients) if k and c.task == f.engine.clients[0].task)
    assert all(torch.equal(f.engine.states[0][k], f.engine.states[mate][k]) for k in f.engine.states[0] if k.startswith(fed.OWN_ADAPTER))
    assert all(torch.isfinite(v).all() for s in f.engine.states for v in s.values())


def test_the_server_sees_only_uploads_and_answers_as_a_function_of_them():
    server = fed.Server("pilot", ["a", "b", "b"], [1, 2, 3], 1)
    # what it holds: its settings, the global task adapters, and where it writes a personalised LoRA (no data)
    assert set(vars(server)) == {"method", "tasks", "n_samples", "ata_top_m", "ata_form", "ata_tau", "task_adapters",
                                 "store"}
    uploads = {k: {"lora": {"lm.x.lora_A": torch.randn(4)},
                   "task_adapter": {"connector.psi_t.w": torch.randn(2)}} for k in range(3)}
    first = fed.Server("pilot", ["a", "b", "b"], [1, 2, 3], 1).aggregate(copy.deepcopy(uploads), True).downloads
    second = server.aggregate(copy.deepcopy(uploads), True).downloads
    for k in range(3):
        assert first[k].keys() == second[k].keys()
        for g in first[k]:
            assert all(torch.equal(first[k][g][n], second[k][g][n]) for n in first[k][g])


def test_skip_bad_records_reports_each_per_client(tmp_path):
    clients = embedded.synthetic_clients("A", data.DataConfig(clients_per_task=1, train_per_client=3, test_per_client=2), 0)
    manifest = embedded.export_llava(clients, str(tmp_path))
    path = tmp_path / "colour0_train.json"
    records = json.load(open(path))
    records[1]["conversations"][1]["value"] = ""
    os.remove(tmp_path / "images" / records[2]["image"])
    json.dump(records, open(path, "w"))
    with pytest.raises(data.DataError, match=r"colour0_train.json: record 1 .*empty"):
        data.load_manifest(manifest)
    loaded = data.load_manifest(manifest, skip_bad_records=True)
    assert len(loaded[0].train) == 1 and len(loaded[0].skipped) == 2
    assert "record 1" in loaded[0].skipped[0] and "image file not found" in loaded[0].skipped[1]
    assert all(not c.skipped for c in loaded[1:])


def test_a_task_without_clients_or_a_client_without_data_fails_before_loading(tmp_path):
    for override, key in (("data.clients_per_task=0", "data.clients_per_task"),
                          ("data.train_per_client=0", "data.train_per_client")):
        with pytest.raises(train.ConfigError, match=key):
            train.load_config(os.path.join(ROOT, "config.yaml"), [override, "model.llava=/nonexistent"])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(data.DataError, match="empty.json: no records"):
        data.load_llava_json(str(empty), str(tmp_path))
