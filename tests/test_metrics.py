"""The field's metrics (SPEC 5d), corpus-level with several references per record, against
values computed by hand here (and coco-caption's own CIDEr when pycocoevalcap is installed);
references from LLaVA JSON reaching the metric in one call."""

import importlib.util
import json
import math
import random

import pytest
from PIL import Image

import data
import model
from data import METRICS


def test_cider_d_of_two_records_by_hand():
    # df: a, b, (a b), d occur in one record's references each; ref_len = log 2 = L
    # record 1, "a b" vs "a b": n = 1 and 2 score 1 (equal vectors), n = 3, 4 have no n-grams: 0;
    #   equal lengths, no penalty -> (1 + 1 + 0 + 0) / 4 x 10 = 5
    # record 2, "c" vs "d": nothing shared -> 0.          CIDEr = (5 + 0) / 2
    assert METRICS["cider"](["a b", "c"], [["a b"], ["d"]]) == pytest.approx(2.5, abs=1e-12)
    # record 1, "x a b" vs "a b" (each n-gram's weight is L: df <= 1, counts 1):
    #   n = 1: (L^2 + L^2) / (sqrt(3) L * sqrt(2) L) = 2 / sqrt(6); n = 2: L^2 / (sqrt(2) L * L) = 1 / sqrt(2)
    #   n = 3: the reference has no trigram: 0. Lengths (bigram counts, as cider_scorer) 2 and 1:
    #   penalty exp(-1 / (2 * 6^2)).
    one = (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert METRICS["cider"](["x a b", "c"], [["a b"], ["d"]]) == pytest.approx(one / 2, abs=1e-12)
    # several references: a record's score is the mean over them; case and punctuation are not tokens
    assert METRICS["cider"](["A b!", "c"], [["a b", "a b"], ["d"]]) == pytest.approx(2.5, abs=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None,
                    reason="pycocoevalcap not installed: pip install -r requirements-metrics.txt")
def test_cider_d_equals_coco_captions_own_scorer():
    from pycocoevalcap.cider.cider import Cider
    rng = random.Random(0)
    words = "a man dog cat red blue sits on the sofa street runs with ball two of".split()
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(2, 11)))   # noqa: E731
    preds = [sentence() for _ in range(40)]
    refs = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(40)]
    theirs, _ = Cider().compute_score(dict(enumerate(refs)), {i: [p] for i, p in enumerate(preds)})
    assert METRICS["cider"](preds, refs) == pytest.approx(float(theirs), abs=1e-6)


def test_vqa_accuracy_leave_one_out_on_ten_answers():
    refs = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]     # "two" normalises to "2": 3 matches
    # removing one of the three "2"s leaves 2 matches (2/3), removing any other leaves 3 (1)
    assert METRICS["vqa"](["Two."], [refs]) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert METRICS["vqa"](["3"], [refs]) == 1.0 and METRICS["vqa"](["four"], [refs]) == 0.0
    assert METRICS["vqa"](["Two.", "3", "four"], [refs] * 3) == pytest.approx((0.9 + 1 + 0) / 3)
    one_match = ["yes"] + ["no"] * 9          # one match: 1/3 in the 9 subsets that keep it, 0 in the one that drops it
    assert METRICS["vqa"](["yes"], [one_match]) == pytest.approx(9 * (1 / 3) / 10)
    # fewer than 10 answers: the bar is min(3, n - 1) of the others; one answer: exact match
    assert METRICS["vqa"](["red"], [["red", "blue"]]) == pytest.approx(0.5)
    assert METRICS["vqa"](["red"], [["red", "red", "blue"]]) == pytest.approx((0.5 + 0.5 + 1) / 3)      # bar 2
    assert METRICS["vqa"](["red"], [["red", "red", "blue", "blue"]]) == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 / 3) / 4)
    assert METRICS["vqa"](["the red"], [["Red"]]) == 1.0 and METRICS["vqa"](["red"], [["blue"]]) == 0.0


@pytest.mark.parametrize("answer,normalised", [
    ("Two dogs!", "2 dogs"), ("the cat", "cat"), ("An apple", "apple"), ("dont", "don't"), ("isnt it", "isn't it"),
    ("1,000", "1000"), ("yes.", "yes"), ("3.5", "3.5"), ("black-and-white", "black and white"),
    ("left - right", "left right"), ("none", "0"), ("It's red\n", "it 's red"), ("  Ten  ", "10"),
])
def test_the_evalai_answer_processing(answer, normalised):
    assert data.vqa_normalise(answer) == normalised


def test_gqa_exact_f1_take_their_normalisers_and_the_best_reference():
    assert [data.gqa_normalise(a) for a in ("Yes.", " Left ", "3.5", "no .")] == ["yes", "left", "3.5", "no"]
    assert METRICS["gqa"](["Yes.", "left side", "table"], [["yes"], ["left"], ["chair", "Table"]]) == pytest.approx(2 / 3)
    assert METRICS["exact"](["They are RED"], [["blue", "they are red."]]) == 1.0
    assert METRICS["f1"](["a red bus"], [["a blue bus", "red bus"]]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="one non-empty list of references per prediction"):
        METRICS["exact"](["a"], [])


def test_evaluate_scores_a_split_in_one_call_against_its_references(tmp_path, tiny_llava_dir, monkeypatch):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    records = [{"id": "q1", "image": "a.png", "references": ["red", "dark red"],
                "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
               {"id": "q2", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]}]
    (tmp_path / "t.json").write_text(json.dumps(records))
    samples = data.load_llava_json(str(tmp_path / "t.json"), str(tmp_path))
    calls = []
    monkeypatch.setitem(data.METRICS, "spy", lambda p, r: calls.append((p, r)) or 0.25)
    base = model.load_llava(tiny_llava_dir)
    m = model.build_model(base, model.build_connector("plain", base), model.ModelConfig(lora_r=2))
    enc = data.Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens)
    assert model.evaluate(m, enc, samples, "spy", batch_size=1, max_new_tokens=2) == 0.25
    assert len(calls) == 1 and calls[0][1] == [["red", "dark red"], ["yes"]] and len(calls[0][0]) == 2
    bad = dict(records[0], references=[])
    (tmp_path / "t.json").write_text(json.dumps([bad]))
    with pytest.raises(data.DataError, match=r"t.json: record 0 \(id 'q1'\): 'references' must be a non-empty list"):
        data.load_llava_json(str(tmp_path / "t.json"), str(tmp_path))
