"""Tests of train.py: config checking, and a whole run end to end on the embedded base recipe
(a few pretraining steps): loss falls, checkpoints and the results table are written, and a
resumed run ends exactly where an uninterrupted one does."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_config(tmp_path, embedded_dir, **fed):
    raw = yaml.safe_load(open(os.path.join(ROOT, "config.yaml")))
    raw["run_dir"] = str(tmp_path / "run")
    raw["model"].update(cache_dir=os.path.dirname(embedded_dir), embedded_pretrain_steps=5, lora_r=4)
    raw["data"].update(clients_per_task=1, train_per_client=16, test_per_client=4, max_new_tokens=4)
    raw["fed"].update(dict(stage1_rounds=2, stage2_rounds=1, local_epochs=1, batch_size=4,
                           lr_connector=3e-3, lr_lora_stage1=3e-3, lr_lora_stage2=3e-3), **fed)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_default_config_loads_and_every_key_is_a_field():
    cfg = train.load_config(os.path.join(ROOT, "config.yaml"), [])
    assert cfg.fed.method == "pilot" and cfg.model.llava == "embedded" and cfg.data.scenario == "A"
    cfg = train.load_config(os.path.join(ROOT, "config.yaml"), ["fed.method=fedavg", "seed=3", "fed.lr_connector=3e-3"])
    assert (cfg.fed.method, cfg.seed, cfg.fed.lr_connector) == ("fedavg", 3, 0.003)


@pytest.mark.parametrize("override,message", [
    ("fed.metod=fedavg", "unknown config key 'fed.metod'; did you mean fed.method?"),
    ("fed.stage1_rounds=two", "fed.stage1_rounds: expected int, got 'two'"),
    ("fed.stage2_rounds=-1", "fed.stage2_rounds = -1: must be >= 0"),
    ("model.lora_r=0", "model.lora_r = 0: must be > 0"),
    ("fed.method=fedsgd", "fed.method = 'fedsgd': must be one of"),
    ("fed.client_fraction=0", "fed.client_fraction = 0.0: must be in (0, 1]"),
    ("data.scenario=C", "data.scenario = 'C': must be one of"),
    ("fed=", "fed: is a section of keys and cannot be empty; set single keys, e.g. --set fed.method=..."),
    ("fed.eval_max_samples=0", "fed.eval_max_samples = 0: must be >= 1 or null"),
    ("data.num_workers=-1", "data.num_workers = -1: must be >= 0"),
])
def test_bad_config_is_an_error_naming_the_key(override, message):
    with pytest.raises(train.ConfigError) as e:
        train.load_config(os.path.join(ROOT, "config.yaml"), [override])
    assert message in str(e.value)


def test_top_k_above_the_number_of_tasks_fails_before_loading_a_model(tmp_path):
    cfg = train.load_config(os.path.join(ROOT, "config.yaml"), ["fed.top_k=4", "model.llava=/nonexistent"])
    with pytest.raises(train.ConfigError, match=r"fed.top_k = 4: must be <= the number of tasks \(3\)"):
        train.build(cfg)


def test_end_to_end_run_checkpoints_results_and_exact_resume(tmp_path, embedded_dir):
    config = _write_config(tmp_path, embedded_dir)
    run = tmp_path / "run"
    # the CLI, as a user runs it
    proc = subprocess.run([sys.executable, "train.py", "--config", config], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["round"] for r in log] == [1, 2, 3] and [r["stage"] for r in log] == [1, 1, 2]
    for name, losses in log[0]["losses"].items():   # loss falls from round 1 to round 2 on every client
        assert log[1]["losses"][name]["ce"] < losses["ce"]
    assert set(log[2]["losses"]["colour0"]) >= {"ce", "difference", "balance", "router_z"}
    assert log[2]["losses"]["colour0"]["balance"] > 0 and log[0]["losses"]["colour0"]["balance"] == 0
    assert log[0]["comm"]["colour0"]["up"]["lora"] > 0 and "rss_mb" in log[0]["memory"]
    table = open(run / "results.md").read()
    assert "| colour0 | colour |" in table and "**mean**" in table and "Communication" in table
    assert "| colour0 | colour |" in proc.stdout
    assert sorted(os.listdir(run / "ckpt")) == ["round_002", "round_003"]
    meta = json.load(open(run / "ckpt" / "round_003" / "meta.json"))
    assert meta["round"] == 3 and meta["stage"] == 2 and meta["config"]["fed"]["method"] == "pilot"
    full = {f: load_file(run / "ckpt" / "round_003" / f) for f in os.listdir(run / "ckpt" / "round_003")
            if f.endswith(".safetensors")}
    results = json.load(open(run / "results.json"))

    # lose the last round, resume: the run must end exactly where it ended before
    shutil.rmtree(run / "ckpt" / "round_003")
    resumed = train.main(["--config", config, "--resume"])
    for f, state in full.items():
        again = load_file(run / "ckpt" / "round_003" / f)
        assert set(again) == set(state) and all((again[k] == state[k]).all() for k in state), f
    assert resumed["own"] == results["own"] and resumed["rounds"] == results["rounds"]
    assert [json.loads(line)["round"] for line in open(run / "log.jsonl")] == [1, 2, 3]

    # resuming from the end of stage 1 rebuilds the CT-MoA from the stage-1 states
    shutil.rmtree(run / "ckpt" / "round_003")
    assert train.main(["--config", config, "--resume"])["own"] == results["own"]


def test_every_method_runs_end_to_end(tmp_path, embedded_dir):
    for method in ("local", "fedavg", "fedprox", "pilot_no_moa"):
        config = _write_config(tmp_path, embedded_dir, method=method)
        res = train.main(["--config", config, "--set", "fed.stage1_rounds=1", "--overwrite"])
        assert res["method"] == method and len(res["rounds"]) == 2
        if method == "local":
            assert res["comm_bytes"] == {}


def test_dry_run_loads_no_weights_and_prints_the_groups(capsys):
    out = train.main(["--config", os.path.join(ROOT, "config.yaml"), "--dry-run", "--set", "model.llava=/no/such/llava"])
    text = capsys.readouterr().out
    assert "built-in LLaVA-1.5-7B shape" in text and "7,063,427,072" in text
    assert "pilot stage 2" in text and "router" in text and "sends" in text
    assert "dry_run" in out
