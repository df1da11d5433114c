"""Tests of data.py: synthetic determinism and splits, the LLaVA JSON format, every bad record
case, metrics."""

import json

import pytest
from PIL import Image

import data
from data import DataConfig, DataError
from tools import embedded


def _bytes(clients):
    return [(c.name, c.task, s.id, s.turns, data.picture(s).tobytes()) for c in clients for s in c.train + c.test]


def test_synthetic_world_is_deterministic_and_seeded():
    cfg = DataConfig(train_per_client=6, test_per_client=3)
    assert _bytes(embedded.synthetic_clients("A", cfg, 0)) == _bytes(embedded.synthetic_clients("A", cfg, 0))
    assert _bytes(embedded.synthetic_clients("A", cfg, 0)) != _bytes(embedded.synthetic_clients("A", cfg, 1))


@pytest.mark.parametrize("scenario,tasks", [("A", ["colour", "shape", "count"]), ("B", ["caption", "grounding", "vqa"])])
def test_scenarios_have_their_tasks_clients_and_disjoint_splits(scenario, tasks):
    clients = embedded.synthetic_clients(scenario, DataConfig(train_per_client=20, test_per_client=10), 0)
    assert [c.task for c in clients] == [t for t in tasks for _ in range(3)]
    for c in clients:
        assert len(c.train) == 20 and len(c.test) == 10
        assert not {s.id for s in c.train} & {s.id for s in c.test}
        assert not {s.image.tobytes() for s in c.train} & {s.image.tobytes() for s in c.test}
    assert {c.metric for c in clients} == ({"f1", "exact"} if scenario == "B" else {"exact"})


def test_clients_of_one_task_differ_in_style_and_phrasing():
    clients = embedded.synthetic_clients("A", DataConfig(train_per_client=30, test_per_client=1), 0)
    count = [c for c in clients if c.task == "count"]
    answers = [{s.turns[0][1] for s in c.train} for c in count]
    assert answers[0] <= {"1", "2", "3"} and answers[1] <= {"one", "two", "three"}
    backgrounds = [c.train[0].image.getpixel((0, 0)) for c in count]
    assert len(set(backgrounds)) == 3


def test_llava_json_export_and_manifest_round_trip(tmp_path):
    clients = embedded.synthetic_clients("B", DataConfig(train_per_client=3, test_per_client=2), 0)
    manifest = embedded.export_llava(clients, str(tmp_path))
    loaded = data.load_clients(DataConfig(scenario="manifest", manifest=manifest))
    assert _bytes(loaded) == _bytes(clients)
    assert [c.metric for c in loaded] == [c.metric for c in clients]
    record = json.load(open(tmp_path / "caption0_train.json"))[0]
    assert set(record) == {"id", "image", "conversations"}
    assert record["conversations"][0]["from"] == "human" and "<image>" in record["conversations"][0]["value"]


def _write(tmp_path, records, image=True):
    if image:
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    path = tmp_path / "client.json"
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return str(path)


def _rec(**kw):
    r = {"id": "r7", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "red"}]}
    r.update(kw)
    return r


BAD = {
    "missing image file": (_rec(image="nope.png"), "image file not found"),
    "no placeholder": (_rec(conversations=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "red"}]),
                       "exactly one <image>"),
    "two placeholders": (_rec(conversations=[{"from": "human", "value": "<image> <image> What?"},
                                             {"from": "gpt", "value": "red"}]), "exactly one <image>"),
    "empty conversation": (_rec(conversations=[]), "non-empty list"),
    "wrong role order": (_rec(conversations=[{"from": "human", "value": "<image> red"}, {"from": "human", "value": "x"}]),
                         "must come from 'gpt'"),
    "placeholder in an answer": (_rec(conversations=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "<image>"}]),
                                 "exactly one <image> placeholder, in the first human turn"),
    "placeholder without an image": (_rec(image=None), "has no 'image' but 1 <image> placeholder"),
    "empty answer": (_rec(conversations=[{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": " "}]),
                     "empty or non-string"),
    "non-string value": (_rec(conversations=[{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": 3}]),
                         "empty or non-string"),
    "odd number of turns": (_rec(conversations=[{"from": "human", "value": "<image>\nWhat?"}]), "human/gpt pairs"),
    "not an object": ("just a string", "expected an object"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_names_file_and_record(tmp_path, case):
    bad, why = BAD[case]
    path = _write(tmp_path, [_rec(id="ok"), bad])
    with pytest.raises(DataError) as e:
        data.load_llava_json(path, str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: record 1") and why in msg


def test_unreadable_image_and_invalid_json(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    path = _write(tmp_path, [_rec()], image=False)
    with pytest.raises(DataError, match=r"record 0 \(id 'r7'\): cannot read image"):
        data.load_llava_json(path, str(tmp_path))
    path = _write(tmp_path, '[{"id": 1,', image=False)
    with pytest.raises(DataError, match="invalid JSON"):
        data.load_llava_json(path, str(tmp_path))


def test_good_record_loads(tmp_path):
    samples = data.load_llava_json(_write(tmp_path, [_rec()]), str(tmp_path))
    assert samples[0].id == "r7" and samples[0].turns == [("<image>\nWhat?", "red")]
    assert samples[0].image == str(tmp_path / "a.png")          # the file name, not the picture
    assert data.picture(samples[0]).size == (8, 8)


def test_metrics_by_hand():
    assert data.exact_match("They are Red.", "they are red") == 1.0
    assert data.exact_match("red", "they are red") == 0.0
    # 1 of 3 predicted and 1 of 4 reference tokens shared: P = 1/3, R = 1/4, F1 = 2/7
    assert data.token_f1("two red circle", "there are two circles") == pytest.approx(2 / 7)
    # 2 shared: P = 2/3, R = 1/2, F1 = 4/7
    assert data.token_f1("two red circles", "there are two circles") == pytest.approx(4 / 7)
    assert data.token_f1("blue", "red") == 0.0


def test_every_synthetic_word_is_in_the_vocabulary():
    vocab = set(embedded.vocabulary())
    for scenario in ("A", "B"):
        for c in embedded.synthetic_clients(scenario, DataConfig(train_per_client=40, test_per_client=1), 0):
            for s in c.train:
                for h, g in s.turns:
                    assert set(data.normalise(h.replace("<image>", ""))) <= {w.lower() for w in vocab}
                    assert set(data.normalise(g)) <= vocab
