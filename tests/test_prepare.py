"""tools/pilot_data.py: each converter on a few records written here in the dataset's own
released format, missing images listed, disjoint seeded client splits, and the manifest it
writes training and scoring one round with each task's metric; config.paper.yaml's dry run."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

import data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import pilot_data  # noqa: E402


def _images(folder, names, size=(20, 30)):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        Image.new("RGB", size, (120, 40, 200)).save(os.path.join(folder, n))


def _gqa(tmp_path, n=8):
    """GQA's train_balanced_questions.json: {qid: {imageId, question, answer, fullAnswer, ...}}."""
    qs = {f"0{i}": {"imageId": f"n{100 + i}", "question": f"Is the bowl on the left{'?' * (i % 2 + 1)}",
                    "answer": ["yes", "no"][i % 2], "fullAnswer": "Yes, the bowl is on the left.", "isBalanced": True,
                    "types": {"structural": "verify"}} for i in range(n)}
    (tmp_path / "train_balanced_questions.json").write_text(json.dumps(qs))
    _images(tmp_path / "gqa_images", [f"n{100 + i}.jpg" for i in range(n)])
    return str(tmp_path / "train_balanced_questions.json"), str(tmp_path / "gqa_images")


def _ocrvqa(tmp_path, n=4):
    """OCR-VQA's dataset.json: {book id: {imageURL, questions, answers, title, authorName, genre, split}};
    even books in its training split (1), odd ones in its test split (3)."""
    books = {f"{1000 + i}": {"imageURL": f"http://ecx.images-amazon.com/images/I/{i}.jpg",
                             "questions": ["Who wrote this book?", "What is the title of this book?"],
                             "answers": [f"Author {i}", f"Title {i}"], "title": f"Title {i}", "authorName": f"Author {i}",
                             "genre": "Travel", "split": 3 if i % 2 else 1} for i in range(n)}
    (tmp_path / "dataset.json").write_text(json.dumps(books))
    _images(tmp_path / "ocr_images", [f"{1000 + i}.jpg" for i in range(n)], size=(30, 50))
    return str(tmp_path / "dataset.json"), str(tmp_path / "ocr_images")


def _coco(tmp_path, n=8):
    """COCO's captions_train2017.json: images [{id, file_name, height, width}], annotations
    [{image_id, id, caption}], five captions an image."""
    images = [{"id": 10 + i, "file_name": f"{10 + i:012d}.jpg", "height": 30, "width": 40} for i in range(n)]
    anns = [{"image_id": 10 + i, "id": 500 + 5 * i + j, "caption": f"A cat number {j} on a mat. "}
            for i in range(n) for j in range(5)]
    (tmp_path / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    _images(tmp_path / "train2017", [im["file_name"] for im in images], size=(40, 30))
    return str(tmp_path / "captions_train2017.json"), str(tmp_path / "train2017")


def test_each_converter_reads_its_datasets_format(tmp_path):
    gqa = pilot_data.gqa_records([_gqa(tmp_path, 2)[0]])
    assert gqa[1] == {"id": "gqa-01", "image": "n101.jpg", "conversations": [
        {"from": "human", "value": "<image>\nIs the bowl on the left??\nAnswer the question using a single word or phrase."},
        {"from": "gpt", "value": "no"}]}
    ocr = pilot_data.ocrvqa_records(_ocrvqa(tmp_path, 1)[0])
    assert [(r["id"], r["image"], r["conversations"][1]["value"]) for r in ocr] == [
        ("ocrvqa-1000-0", "1000.jpg", "Author 0"), ("ocrvqa-1000-1", "1000.jpg", "Title 0")]
    coco = pilot_data.coco_caption_records([_coco(tmp_path, 1)[0]])
    assert coco == [{"id": "coco-10", "image": "000000000010.jpg", "conversations": [
        {"from": "human", "value": "<image>\nProvide a one-sentence caption for the provided image."},
        {"from": "gpt", "value": "A cat number 0 on a mat."}],
        "references": [f"A cat number {j} on a mat." for j in range(5)]}]
    # VQAv2: questions and annotations files, 10 answers, COCO_train2014_ image names
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"image_id": 42, "question": "How many?", "question_id": 420}]}))
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["2"] * 7 + ["two"] * 3)]
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [{"question_id": 420, "image_id": 42, "answers": answers,
                                                                  "multiple_choice_answer": "2", "answer_type": "number"}]}))
    vqa = pilot_data.vqav2_records(str(tmp_path / "q.json"), str(tmp_path / "a.json"), "COCO_train2014_")
    assert vqa[0]["image"] == "COCO_train2014_000000000042.jpg" and vqa[0]["references"] == ["2"] * 7 + ["two"] * 3
    # LLaVA-1.5's mix, by the first folder of the image path; text-only records as "text"
    mix = [{"id": "a", "image": "coco/train2017/1.jpg", "conversations": []},
           {"id": "b", "image": "ocr_vqa/images/2.jpg", "conversations": []}, {"id": "c", "conversations": []}]
    (tmp_path / "mix.json").write_text(json.dumps(mix))
    assert {k: [r["id"] for r in v] for k, v in pilot_data.mix665k_records(str(tmp_path / "mix.json")).items()} == \
        {"coco": ["a"], "ocr_vqa": ["b"], "text": ["c"]}
    with pytest.raises(pilot_data.PrepareError, match=r"q.json: question 0 has no 'imageId'"):
        (tmp_path / "q.json").write_text(json.dumps({"0": {"question": "x", "answer": "y"}}))
        pilot_data.gqa_records([str(tmp_path / "q.json")])


def test_the_pilot_scenario_trains_and_scores_one_round_with_each_tasks_metric(tmp_path, embedded_dir):
    gqa, gqa_images = _gqa(tmp_path)
    ocr, ocr_images = _ocrvqa(tmp_path)
    coco, coco_images = _coco(tmp_path)
    os.remove(os.path.join(gqa_images, "n107.jpg"))                    # a missing image: listed, left out
    out = tmp_path / "pilot"
    manifest = pilot_data.main(["--out", str(out), "--clients-per-task", "2", "--train-per-client", "2",
                                "--test-per-client", "1", "--gqa", gqa, "--gqa-images", gqa_images,
                                "--ocrvqa", ocr, "--ocrvqa-images", ocr_images,
                                "--coco-captions", coco, "--coco-images", coco_images])
    assert (out / "missing_images.txt").read_text() == f"{os.path.join(gqa_images, 'n107.jpg')} (record gqa-07)\n"
    entries = yaml.safe_load(open(manifest))
    assert [(e["name"], e["task"], e["metric"]) for e in entries] == [
        ("gqa0", "gqa", "gqa"), ("gqa1", "gqa", "gqa"), ("ocrvqa0", "ocrvqa", "exact"), ("ocrvqa1", "ocrvqa", "exact"),
        ("coco_caption0", "coco_caption", "cider"), ("coco_caption1", "coco_caption", "cider")]
    clients = data.load_manifest(manifest)
    ids = [s.id for c in clients for s in c.train + c.test]
    assert len(ids) == len(set(ids)) == 18 and "gqa-07" not in ids     # disjoint splits
    coco_test = next(c for c in clients if c.name == "coco_caption0").test[0]
    assert len(coco_test.refs) == 5 and all(s.refs is None for c in clients for s in c.train)
    again = pilot_data.main(["--out", str(tmp_path / "again"), "--clients-per-task", "2", "--train-per-client", "2",
                             "--test-per-client", "1", "--gqa", gqa, "--gqa-images", gqa_images, "--ocrvqa", ocr,
                             "--ocrvqa-images", ocr_images, "--coco-captions", coco, "--coco-images", coco_images])
    assert [s.id for c in data.load_manifest(again) for s in c.train] == [s.id for c in clients for s in c.train]
    # one round on a tiny base whose tokenizer knows any text (byte fallback), each task its metric
    raw = yaml.safe_load(open(os.path.join(ROOT, "config.paper.yaml")))
    raw["run_dir"] = str(tmp_path / "run")
    raw["model"] = dict(llava=embedded_dir, dtype="float32", device="cpu", lora_r=2, lora_alpha=4.0)
    raw["data"].update(manifest=manifest, max_new_tokens=3, num_workers=0)
    raw["fed"].update(stage1_rounds=1, stage2_rounds=0, batch_size=2, grad_accum=1, eval_batch_size=4)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    result = train.main(["--config", str(tmp_path / "c.yaml")])
    scores = json.load(open(tmp_path / "run" / "results.json"))
    assert set(scores["own"]) == set(scores["after_local"]["own"]) == {e["name"] for e in entries}
    assert all(0 <= v <= 10 for v in scores["after_local"]["own"].values()) and result["method"] == "pilot"


def test_a_missing_dataset_file_or_a_short_task_is_one_line(tmp_path):
    gqa, gqa_images = _gqa(tmp_path, 3)
    out = subprocess.run([sys.executable, "tools/pilot_data.py", "--out", str(tmp_path / "o"), "--tasks", "gqa",
                          "--gqa", gqa, "--gqa-images", gqa_images, "--clients-per-task", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: task gqa: 3 records on 3 pictures with their images, but --clients-per-task x (--train-per-client + "
        "--test-per-client) asks 2400 of them, each picture's records in one split only"]
    with pytest.raises(pilot_data.PrepareError, match=r"nope.json: OCR-VQA dataset.json not found"):
        pilot_data.ocrvqa_records(str(tmp_path / "nope.json"))


def test_config_paper_dry_run_runs_offline_before_any_data_exists(tmp_path):
    cfg = train.load_config(os.path.join(ROOT, "config.paper.yaml"), [])
    assert cfg.data.manifest.endswith("manifest.yaml") and not os.path.exists(os.path.join(ROOT, cfg.data.manifest))
    assert (cfg.model.vision, cfg.model.llm) == ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "train.py", "--config", "config.paper.yaml", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "pilot stage 2" in out.stdout


# -----------------------------------------------------------------------------
# Held-out test splits (SPEC 5e): cut by picture, from the dataset's own evaluation split


def _gqa_many(tmp_path, name, images, per_image, prefix="n"):
    """A GQA questions file asking `per_image` questions of each of `images` pictures."""
    qs = {f"{prefix}{i}-{j}": {"imageId": f"{prefix}{i}", "question": f"Question {j} about {i}?", "answer": f"a{j}"}
          for i in range(images) for j in range(per_image)}
    (tmp_path / name).write_text(json.dumps(qs))
    _images(tmp_path / "gqa_images", [f"{prefix}{i}.jpg" for i in range(images)])
    return str(tmp_path / name), str(tmp_path / "gqa_images")


def _pictures(out, client, split):
    return {r["image"] for r in json.load(open(out / f"{client}_{split}.json"))}


def test_no_test_picture_is_a_training_picture_of_any_client(tmp_path):
    gqa, images = _gqa_many(tmp_path, "train_balanced_questions.json", images=40, per_image=3)
    out = tmp_path / "o"
    args = ["--tasks", "gqa", "--gqa", gqa, "--gqa-images", images, "--clients-per-task", "3",
            "--train-per-client", "5", "--test-per-client", "4"]
    manifest = yaml.safe_load(open(pilot_data.main(["--out", str(out), *args])))
    names = [e["name"] for e in manifest]
    train = set().union(*(_pictures(out, c, "train") for c in names))
    test = set().union(*(_pictures(out, c, "test") for c in names))
    assert not train & test                                  # held out across all clients, not only within one
    for a in names:                                          # and no picture in two clients' test splits
        for b in names:
            assert a == b or not _pictures(out, a, "test") & _pictures(out, b, "test")
    assert all(len(json.load(open(out / f"{c}_{s}.json"))) == n for c in names for s, n in (("train", 5), ("test", 4)))
    # several questions of one picture stay together: 4 test records come from 2 pictures
    assert all(len(_pictures(out, c, "test")) == 2 for c in names)
    assert manifest[0]["test_from"] == f"{gqa} (by picture)"
    again = tmp_path / "again"
    pilot_data.main(["--out", str(again), *args])
    assert all(_pictures(again, c, s) == _pictures(out, c, s) for c in names for s in ("train", "test"))


def test_ocrvqas_own_split_and_gqas_testdev_give_the_test_records(tmp_path):
    ocr, ocr_images = _ocrvqa(tmp_path, 8)                   # even books split 1, odd books split 3
    gqa, gqa_images = _gqa_many(tmp_path, "train_balanced_questions.json", images=6, per_image=2)
    testdev, _ = _gqa_many(tmp_path, "testdev_balanced_questions.json", images=4, per_image=3, prefix="t")
    out = tmp_path / "o"
    manifest = yaml.safe_load(open(pilot_data.main([
        "--out", str(out), "--tasks", "ocrvqa", "gqa", "--ocrvqa", ocr, "--ocrvqa-images", ocr_images, "--gqa", gqa,
        "--gqa-test", testdev, "--gqa-images", gqa_images, "--clients-per-task", "2", "--train-per-client", "2",
        "--test-per-client", "1"])))
    books = json.load(open(ocr))
    for c in ("ocrvqa0", "ocrvqa1"):
        assert {books[p.split(".")[0]]["split"] for p in _pictures(out, c, "test")} == {3}
        assert {books[p.split(".")[0]]["split"] for p in _pictures(out, c, "train")} == {1}
    for c in ("gqa0", "gqa1"):
        assert all(p.startswith("t") for p in _pictures(out, c, "test"))
        assert not any(p.startswith("t") for p in _pictures(out, c, "train"))
    assert {e["name"]: e["test_from"] for e in manifest} == {
        "ocrvqa0": f"{ocr} (split 3)", "ocrvqa1": f"{ocr} (split 3)", "gqa0": testdev, "gqa1": testdev}


def test_cocos_val_pictures_in_their_own_folder_are_the_test_split(tmp_path):
    coco, train_images = _coco(tmp_path, 4)
    images = [{"id": 90 + i, "file_name": f"{90 + i:012d}.jpg"} for i in range(2)]
    anns = [{"image_id": 90 + i, "id": 900 + 5 * i + j, "caption": f"A dog {j}."} for i in range(2) for j in range(5)]
    (tmp_path / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    _images(tmp_path / "val2017", [im["file_name"] for im in images])
    manifest = pilot_data.main(["--out", str(tmp_path / "o"), "--tasks", "coco_caption", "--coco-captions", coco,
                                "--coco-images", train_images, "--coco-test-captions", str(tmp_path / "captions_val2017.json"),
                                "--coco-test-images", str(tmp_path / "val2017"), "--clients-per-task", "2",
                                "--train-per-client", "1", "--test-per-client", "1"])
    clients = data.load_manifest(manifest)                   # one image_folder above both folders
    assert {os.path.dirname(s.image) for c in clients for s in c.test} == {str(tmp_path / "val2017")}
    assert {os.path.dirname(s.image) for c in clients for s in c.train} == {str(tmp_path / "train2017")}
    assert all(os.path.isfile(s.image) and len(s.refs) == 5 for c in clients for s in c.test)
