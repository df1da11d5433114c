"""LLaVA JSON at dataset scale: records, not pixels, at load; pictures decoded only when their
batch is built (in DataLoader workers or not, the same batches); a file that stops decoding in
the middle of a run is named, or skipped and listed; the run identity tells records from
images; fed.eval_max_samples scores a fixed subset; --ask and --score use a trained client."""

import gc
import json
import os
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
import yaml

import data
import fed
import train
from test_train import ROOT, _write_config

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from common import write_jpeg_manifest  # noqa: E402
from tools import embedded, runs  # noqa: E402


@pytest.fixture
def manifest(tmp_path):
    return write_jpeg_manifest(str(tmp_path / "data"), records=300, clients=3, side=64)


def _counting_decoder(monkeypatch):
    """Wrap data.read_image: count decodes and the pictures still alive at each decode."""
    stats = {"decodes": 0, "alive": 0, "max_alive": 0}
    real = data.read_image

    def freed():
        stats["alive"] -= 1

    def read(file, max_side):
        image = real(file, max_side)
        stats["decodes"] += 1
        stats["alive"] += 1
        stats["max_alive"] = max(stats["max_alive"], stats["alive"])
        weakref.finalize(image, freed)
        return image
    monkeypatch.setattr(data, "read_image", read)
    return stats


# -----------------------------------------------------------------------------
# Records, not pixels


def test_loading_decodes_no_picture_and_training_holds_a_batch_of_them(manifest, tiny_llava_dir, monkeypatch):
    stats = _counting_decoder(monkeypatch)
    clients = data.load_clients(data.DataConfig(scenario="manifest", manifest=manifest))
    assert sum(len(c.train) + len(c.test) for c in clients) == 300
    assert stats["decodes"] == 0                                       # headers only
    assert all(isinstance(s.image, str) and os.path.isfile(s.image) for c in clients for s in c.train)
    cfg = train.Config()
    cfg.model.llava, cfg.model.lora_r = tiny_llava_dir, 4
    cfg.fed = fed.FedConfig(local_epochs=2, batch_size=8)
    shared = train.build_model(cfg)
    model, enc = shared.model, shared.enc
    gc.disable()   # finalizers run when the last reference goes, not at a collector's whim
    try:
        fed.local_train(model, enc, clients[0].train,
                        fed.LocalSettings(cfg.fed, 1e-3, dict.fromkeys(("difference", "balance", "router_z"), 0.0)),
                        torch.Generator().manual_seed(0))
    finally:
        gc.enable()
    assert stats["decodes"] == 2 * len(clients[0].train)               # each picture once an epoch
    assert stats["max_alive"] <= 2 * cfg.fed.batch_size                # a batch (and the next) at most


def test_loading_a_manifest_keeps_memory_flat(tmp_path):
    # 300 records of 336 x 336 JPEGs: decoded, they would take 0.44 MiB each (~130 MiB)
    path = write_jpeg_manifest(str(tmp_path / "data"), records=300, clients=3, side=336)
    code = ("import resource, sys; sys.path.insert(0, %r); import data; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "c = data.load_clients(data.DataConfig(scenario='manifest', manifest=%r)); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)") % (ROOT, path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 30                                      # MiB of peak RSS added by loading


def test_batched_token_lengths_equal_one_by_one_encoding(tiny_llava_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llava_dir)
    samples = [data.Sample("a", "x.png", [("<image>\nWhat colour are the shapes?", "red")]),
               data.Sample("b", "x.png", [("How many? <image>", "two"), ("And the shape?", "a circle")]),
               data.Sample("c", "x.png", [("What kind of shape is shown? <image> at the top left", "square")])]
    for system in ("", "Describe the image briefly."):
        enc = data.Encoder(tok, None, 4, 16, system_prompt=system)
        assert enc.lengths(samples, chunk=2) == [len(enc.encode(s)[0]) for s in samples]


def test_workers_load_the_same_batches_in_the_same_order(manifest, tiny_llava_dir):
    clients = data.load_clients(data.DataConfig(scenario="manifest", manifest=manifest))
    cfg = train.Config()
    cfg.model.llava = tiny_llava_dir
    enc = train.build_model(cfg).enc
    plan = [[5, 1, 9], [0, 2], [7, 3, 4, 8]]
    got = {}
    for workers in (0, 2):
        loader = data.batch_loader(enc, clients[0].train, plan, num_workers=workers)
        got[workers] = list(loader)
    for a, b in zip(got[0], got[2], strict=True):
        assert a.kept == b.kept and all(torch.equal(a.inputs[k], b.inputs[k]) for k in ("input_ids", "labels", "pixel_values"))


# -----------------------------------------------------------------------------
# A file that fails to decode in the middle of a run


def _break(sample):
    """Keep the header, lose the pixels: the file still opens, it no longer decodes."""
    raw = open(sample.image, "rb").read()
    open(sample.image, "wb").write(raw[:len(raw) // 3])


def test_a_picture_that_fails_mid_run_is_named_or_skipped_and_listed(manifest, tiny_llava_dir):
    cfg = train.Config()
    cfg.model.llava, cfg.model.lora_r = tiny_llava_dir, 4
    cfg.fed = fed.FedConfig(local_epochs=2, batch_size=4)
    clients = data.load_clients(data.DataConfig(scenario="manifest", manifest=manifest))
    bad = clients[0].train[5]
    _break(bad)
    settings = fed.LocalSettings(cfg.fed, 1e-3, dict.fromkeys(("difference", "balance", "router_z"), 0.0))
    shared = train.build_model(cfg)
    model, enc = shared.model, shared.enc
    for workers in (0, 2):   # one line naming the file and record, whichever process decoded it
        enc.num_workers = workers
        with pytest.raises(data.DataError) as e:
            fed.local_train(model, enc, clients[0].train, settings, torch.Generator().manual_seed(0))
        assert str(e.value).startswith(f"{bad.source}: cannot read image {bad.image}") and "\n" not in str(e.value)
    enc.num_workers = 0
    enc.skip_bad_records = True
    skipped = []
    losses = fed.local_train(model, enc, clients[0].train, settings, torch.Generator().manual_seed(0), skipped=skipped)
    assert losses["steps"] == 2 * -(-len(clients[0].train) // 4) and len(skipped) == 1   # listed once, both epochs ran
    assert bad.source in skipped[0] and bad.image in skipped[0]


# -----------------------------------------------------------------------------
# Run identity without reading every picture


def test_identity_tells_records_from_images_and_verify_data_reads_the_bytes(manifest):
    def digest(full=False):
        return runs.data_digest(data.load_clients(data.DataConfig(scenario="manifest", manifest=manifest)), full)
    before = digest(full=True)
    root = os.path.dirname(manifest)
    json_file = os.path.join(root, "colour0_train.json")
    records = json.load(open(json_file))
    records[0]["conversations"][1]["value"] = "blue" if records[0]["conversations"][1]["value"] != "blue" else "red"
    json.dump(records, open(json_file, "w"))
    changed_json = digest()
    assert changed_json["records_sha256"] != before["records_sha256"]
    assert changed_json["images_sha256"] == before["images_sha256"]
    # a picture replaced by another of the same size and mtime: only --verify-data sees it
    image = os.path.join(root, "images", records[1]["image"])
    st = os.stat(image)
    raw = bytearray(open(image, "rb").read())
    raw[-10] ^= 0xFF
    open(image, "wb").write(raw)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    same_stat = digest(full=True)
    assert same_stat["images_sha256"] == changed_json["images_sha256"]
    assert same_stat["images_content_sha256"] != before["images_content_sha256"]
    # a renamed picture (the JSON follows it): the images digest changes
    os.rename(image, image + ".jpg")
    records[1]["image"] += ".jpg"
    json.dump(records, open(json_file, "w"))
    renamed = digest()
    assert renamed["images_sha256"] != same_stat["images_sha256"]


# -----------------------------------------------------------------------------
# Scoring at scale


def test_eval_subset_is_fixed_by_seed_client_and_split_alone():
    samples = [data.Sample(str(i), "x", [("<image>", "a")]) for i in range(50)]
    a = fed.eval_subset(samples, 8, 0, "colour0", "test")
    assert [s.id for s in a] == [s.id for s in fed.eval_subset(samples, 8, 0, "colour0", "test")]
    assert len(a) == 8 and [int(s.id) for s in a] == sorted(int(s.id) for s in a)
    assert [s.id for s in a] != [s.id for s in fed.eval_subset(samples, 8, 0, "colour1", "test")]
    assert fed.eval_subset(samples, None, 0, "colour0", "test") == samples
    assert fed.eval_subset(samples, 80, 0, "colour0", "test") == samples


def test_a_run_scores_its_subset_each_round_and_every_sample_at_the_end(tmp_path, embedded_dir):
    config = _write_config(tmp_path, embedded_dir, stage1_rounds=1, stage2_rounds=1, eval_max_samples=2)
    res = train.main(["--config", config, "--set", "data.test_per_client=6"])
    assert res["full_test"] is not None and set(res["full_test"]["own"]) == set(res["own"])
    # a score over 2 samples is a multiple of 1/2 (exact match); the full one over 6 of 1/6
    for rec in map(json.loads, open(tmp_path / "run" / "log.jsonl")):
        assert all((2 * v) % 1 == 0 for v in rec["after_local"].values())
    assert all(abs(6 * v - round(6 * v)) < 1e-9 for v in res["full_test"]["own"].values())


# -----------------------------------------------------------------------------
# Using what the run trained


def test_ask_and_score_load_a_trained_client_and_agree_with_the_run(tmp_path, embedded_dir):
    exported = embedded.export_llava(embedded.synthetic_clients("A", data.DataConfig(clients_per_task=1, train_per_client=8,
                                                                             test_per_client=4), 0), str(tmp_path / "A"))
    config = _write_config(tmp_path, embedded_dir, stage1_rounds=1, stage2_rounds=1)
    raw = yaml.safe_load(open(config))
    raw["data"].update(scenario="manifest", manifest=exported)
    open(config, "w").write(yaml.safe_dump(raw))
    with pytest.raises(train.ConfigError, match=r"holds no run \(no run.json\)"):
        train.main(["--config", config, "--score", "colour0", "--data", str(tmp_path / "A" / "colour0_test.json"),
                    "--images", str(tmp_path / "A" / "images")])
    res = train.main(["--config", config])
    # the last checkpoint is the state after the last download: --score on the client's own test
    # file gives the run's own after_download score of it
    scored = train.main(["--config", config, "--score", "shape0", "--data", str(tmp_path / "A" / "shape0_test.json"),
                         "--images", str(tmp_path / "A" / "images")])
    assert scored["round"] == 2 and scored["records"] == 4
    assert scored["score"] == res["after_download"]["own"]["shape0"]
    record = json.load(open(tmp_path / "A" / "shape0_test.json"))[0]
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    answer = train.main(["--config", config, "--ask", "shape0", "--image", str(tmp_path / "A" / "images" / record["image"]),
                         "--prompt", question])["answer"]
    one = tmp_path / "one.json"
    one.write_text(json.dumps([record]))
    alone = train.main(["--config", config, "--score", "shape0", "--data", str(one), "--images", str(tmp_path / "A" / "images")])
    assert alone["score"] == data.exact_match(answer, record["conversations"][1]["value"])
    with pytest.raises(train.ConfigError, match="client 'nobody' is not in the run"):
        train.main(["--config", config, "--score", "nobody", "--data", str(one), "--images", str(tmp_path / "A" / "images")])
    shutil.rmtree(tmp_path / "run" / "ckpt")
    with pytest.raises(train.ConfigError, match="holds no complete checkpoint"):
        train.main(["--config", config, "--score", "shape0", "--data", str(one), "--images", str(tmp_path / "A" / "images")])
