"""tools/pilot_data.py -- the paper's client data from the public datasets, in one command.

Reads each dataset in its own released format and writes what `train.py` reads: one LLaVA JSON
file per client and split (test records carry all their human answers or captions as
"references", data.references) and a manifest naming each client's task and metric.

    python tools/pilot_data.py --out data/pilot \
        --gqa gqa/train_balanced_questions.json --gqa-test gqa/testdev_balanced_questions.json \
        --gqa-images gqa/images --ocrvqa ocr_vqa/dataset.json --ocrvqa-images ocr_vqa/images \
        --coco-captions coco/annotations/captions_train2017.json --coco-images coco/train2017 \
        --coco-test-captions coco/annotations/captions_val2017.json --coco-test-images coco/val2017
    python train.py --config config.paper.yaml

Scenario "pilot" (the paper's cross-task setting as a public reimplementation can build it):
3 tasks (GQA, OCR-VQA, COCO Caption) x `--clients-per-task` clients, each with
`--train-per-client` training and `--test-per-client` test records. The paper does not publish
its per-client sizes or split, so tasks, clients per task and sizes are flags.

Held out (SPEC 5e): a test record is held out only if its picture is, and GQA (~10 questions an
image), VQAv2 (~5) and OCR-VQA (5 a cover) ask several questions of one picture. So records are
grouped by picture (the image file: GQA's imageId, VQAv2's image_id, OCR-VQA's book, COCO's
image) and a picture's records go to one split of one client, never several: no test picture
is a training picture of any client. Where a dataset has its own evaluation split, the test
records come from it: OCR-VQA's `split` 3 (its training records from split 1; split 2, val, is
not used), and, when given, GQA's `--gqa-test` (testdev_balanced_questions.json, or val),
COCO's `--coco-test-captions` (captions_val2017.json) and VQAv2's `--vqav2-test-*` (val2014).
Without one, test pictures are drawn first from the task's one pool, seeded. The manifest's
`test_from` names the file each client's test split came from. `--tasks` picks others: vqav2 (VQAv2,
10 answers each, scored by VQA accuracy), or with `--mix665k` the source datasets of LLaVA-1.5's
own mix (the first folder of each image path: coco, gqa, ocr_vqa, textvqa, vg; "text" for its
text-only records).

Per task: the metric (SPEC 5d) and LLaVA-1.5's instruction suffix:
    gqa           "Answer the question using a single word or phrase."   gqa
    ocrvqa        the same suffix                                         exact
    coco_caption  "Provide a one-sentence caption for the provided image."  cider (5 references)
    vqav2         the same suffix as gqa                                 vqa (10 answers)
    mix:<source>  the records as LLaVA-1.5 trains on them               exact (f1 for coco, vg, text)

Every image a record names is checked on disk: records whose image is missing are left out and
listed in OUT/missing_images.txt (and counted on stderr), never dropped silently. The core never
imports this file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import defaultdict
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import yaml  # noqa: E402

import data  # noqa: E402

SHORT = "Answer the question using a single word or phrase."
CAPTION = "Provide a one-sentence caption for the provided image."
METRIC = {"gqa": "gqa", "ocrvqa": "exact", "coco_caption": "cider", "vqav2": "vqa"}
MIX_METRIC = {"gqa": "gqa", "ocr_vqa": "exact", "textvqa": "vqa", "coco": "f1", "vg": "f1", "text": "f1"}


# A dataset file that is missing or not in its documented format is a data.DataError naming it.
PrepareError = data.DataError
_load = data.read_json


def _field(obj, key: str, path: str, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise PrepareError(f"{path}: {where} has no {key!r} (is this the dataset's released file?)")
    return obj[key]


def _record(rid: str, image: str | None, question: str, answer: str, refs: list[str] | None = None) -> dict:
    """One LLaVA record: the image first, as LLaVA-1.5 puts it."""
    rec = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
        rec["conversations"][0]["value"] = "<image>\n" + question
    if refs:
        rec["references"] = refs
    return rec


# -----------------------------------------------------------------------------
# One converter per dataset: its released files -> records (image names relative to its folder)


def gqa_records(paths: list[str]) -> list[dict]:
    """GQA `*_balanced_questions.json`: {question id: {imageId, question, answer, ...}}; images
    `{imageId}.jpg`. The short answer is the one GQA scores."""
    out = []
    for path in paths:
        questions = _load(path, "GQA questions file")
        if not isinstance(questions, dict):
            raise PrepareError(f"{path}: a GQA questions file maps question ids to questions")
        for qid, q in questions.items():
            where = f"question {qid}"
            image, question, answer = (_field(q, k, path, where) for k in ("imageId", "question", "answer"))
            out.append(_record(f"gqa-{qid}", f"{image}.jpg", f"{question}\n{SHORT}", answer))
    return out


def ocrvqa_records(path: str, split: int | None = None) -> list[dict]:
    """OCR-VQA `dataset.json`: {book id: {imageURL, questions, answers, split, ...}}; its download
    script saves each cover as `{book id}{extension of imageURL}`. One record per question; with
    `split`, only the books of that split (1 train, 2 val, 3 test)."""
    books = _load(path, "OCR-VQA dataset.json")
    if not isinstance(books, dict):
        raise PrepareError(f"{path}: OCR-VQA's dataset.json maps book ids to entries")
    out = []
    for bid, book in books.items():
        where = f"book {bid}"
        if split is not None and _field(book, "split", path, where) != split:
            continue
        url, questions, answers = (_field(book, k, path, where) for k in ("imageURL", "questions", "answers"))
        if len(questions) != len(answers):
            raise PrepareError(f"{path}: {where} has {len(questions)} questions and {len(answers)} answers")
        image = f"{bid}{os.path.splitext(url)[1] or '.jpg'}"
        out += [_record(f"ocrvqa-{bid}-{i}", image, f"{q}\n{SHORT}", a) for i, (q, a) in enumerate(zip(questions, answers))]
    return out


def coco_caption_records(paths: list[str]) -> list[dict]:
    """COCO Captions `captions_{train,val}2017.json`: images [{id, file_name}] and annotations
    [{image_id, id, caption}]. One record per image: its first caption (lowest annotation id)
    is the training answer, all of them (usually 5) the test references."""
    out = []
    for path in paths:
        coco = _load(path, "COCO captions file")
        images = {im["id"]: im["file_name"] for im in _field(coco, "images", path, "the file")}
        captions = defaultdict(list)
        for ann in sorted(_field(coco, "annotations", path, "the file"), key=lambda a: a["id"]):
            captions[ann["image_id"]].append(ann["caption"].strip())
        for image_id, file_name in images.items():
            if captions[image_id]:
                out.append(_record(f"coco-{image_id}", file_name, CAPTION, captions[image_id][0], captions[image_id]))
    return out


def vqav2_records(questions_path: str, annotations_path: str, image_prefix: str) -> list[dict]:
    """VQAv2 `v2_OpenEnded_mscoco_*_questions.json` ({questions: [{question_id, image_id,
    question}]}) with `v2_mscoco_*_annotations.json` ({annotations: [{question_id,
    multiple_choice_answer, answers: [{answer}] x 10}]}); images `{prefix}{image_id:012d}.jpg`
    (COCO_train2014_...). The most common answer trains, the 10 are the references."""
    answers = {a["question_id"]: a for a in _field(_load(annotations_path, "VQAv2 annotations"), "annotations",
                                                   annotations_path, "the file")}
    out = []
    for q in _field(_load(questions_path, "VQAv2 questions"), "questions", questions_path, "the file"):
        ann = answers.get(q["question_id"])
        if ann is None:
            raise PrepareError(f"{annotations_path}: no annotation for question {q['question_id']} of {questions_path}")
        refs = [a["answer"] for a in ann["answers"]]
        out.append(_record(f"vqav2-{q['question_id']}", f"{image_prefix}{q['image_id']:012d}.jpg",
                           f"{q['question']}\n{SHORT}", ann["multiple_choice_answer"], refs))
    return out


def mix665k_records(path: str) -> dict[str, list[dict]]:
    """LLaVA-1.5's `llava_v1_5_mix665k.json`, by source: the first folder of each image path
    (coco, gqa, ocr_vqa, textvqa, vg), "text" for the text-only records. Records as they are."""
    records = _load(path, "LLaVA-1.5 mix")
    if not isinstance(records, list):
        raise PrepareError(f"{path}: LLaVA's mix is a list of records")
    by_source = defaultdict(list)
    for i, rec in enumerate(records):
        image = rec.get("image") if isinstance(rec, dict) else None
        source = image.split("/")[0] if isinstance(image, str) and "/" in image else ("text" if image is None else "other")
        by_source[source].append(dict(rec, id=str(rec.get("id", i))))
    return by_source


# -----------------------------------------------------------------------------
# Clients: disjoint seeded splits of each task, files and a manifest


def keep_present(records: list[dict], image_folder: str | None, missing: list[str]) -> list[dict]:
    """The records whose image file exists (and text-only ones); each missing one is appended to
    `missing` as "task folder/image (record id)"."""
    kept = []
    for rec in records:
        image = rec.get("image")
        if image is not None and not os.path.isfile(os.path.join(image_folder, image)):
            missing.append(f"{os.path.join(image_folder, image)} (record {rec['id']})")
            continue
        kept.append(rec)
    return kept


def by_picture(records: list[dict]) -> list[list[dict]]:
    """The records grouped by their picture (the image file), in first-seen order; a text-only
    record is a group of its own."""
    groups: dict[str, list[dict]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(rec.get("image") or f"\0text-{i}", []).append(rec)
    return list(groups.values())


def _deal(task: str, what: str, groups: list[list[dict]], sizes: list[int], seed: int) -> list[list[dict]]:
    """Splits of exactly `sizes` records, filled in turn from the groups in one seeded order; a
    picture's records go to one split only (those past the split's size are left out)."""
    order = random.Random(f"pilot-data-{seed}-{task}-{what}").sample(range(len(groups)), len(groups))
    splits, it = [[] for _ in sizes], iter(order)
    for split, size in zip(splits, sizes):
        for g in it:
            split += groups[g][:size - len(split)]
            if len(split) == size:
                break
        else:
            n = sum(len(g) for g in groups)
            raise PrepareError(f"task {task}: {n} {what + ' ' if what else ''}records on {len(groups)} pictures with "
                               f"their images, but --clients-per-task x (--train-per-client + --test-per-client) asks "
                               f"{sum(sizes)} of them, each picture's records in one split only")
    return splits


def split_clients(task: str, records: list[dict], clients: int, train: int, test: int, seed: int,
                  test_records: list[dict] | None = None):
    """`clients` (train, test) splits of the task, disjoint by picture: no picture of any test
    split is in any training split. Test records come from `test_records` (the dataset's own
    evaluation split) when given, else from `records`, test pictures drawn first."""
    if test_records is None:
        dealt = _deal(task, "", by_picture(records), [test] * clients + [train] * clients, seed)
        tests, trains = dealt[:clients], dealt[clients:]
    else:
        tests = _deal(task, "test", by_picture(test_records), [test] * clients, seed)
        held = {r.get("image") for r in test_records if r.get("image")}
        trains = _deal(task, "train", by_picture([r for r in records if r.get("image") not in held]),
                       [train] * clients, seed)
    yield from zip(trains, tests)


def _rebase(records: list[dict], folder: str | None, root: str | None) -> list[dict]:
    """Records whose image names are relative to `folder`, made relative to `root` (a folder
    above it), so that training and test pictures in two folders share one image_folder."""
    if folder is None or root is None or os.path.abspath(folder) == os.path.abspath(root):
        return records
    rel = os.path.relpath(folder, root)
    return [dict(r, image=os.path.join(rel, r["image"])) if r.get("image") else r for r in records]


def write_clients(out: str, tasks: dict[str, "Task"], clients: int, train: int, test: int, seed: int) -> str:
    """Write every client's files and manifest.yaml under `out`; returns the manifest's path."""
    os.makedirs(out, exist_ok=True)
    manifest = []
    for name_, t in tasks.items():
        folders = [f for f in (t.folder, t.test_folder) if f]
        root = os.path.commonpath([os.path.abspath(f) for f in folders]) if folders else None
        train_recs, test_recs = _rebase(t.records, t.folder, root), None
        if t.test_records is not None:
            test_recs = _rebase(t.test_records, t.test_folder or t.folder, root)
        for c, (tr, te) in enumerate(split_clients(name_, train_recs, clients, train, test, seed, test_recs)):
            name = f"{name_}{c}"
            for split, recs in (("train", tr), ("test", te)):
                # training never reads "references"; a test record keeps them for scoring
                recs = [{k: v for k, v in r.items() if k != "references"} for r in recs] if split == "train" else recs
                with open(os.path.join(out, f"{name}_{split}.json"), "w") as f:
                    json.dump(recs, f, indent=1)
            manifest.append({"name": name, "task": name_, "train": f"{name}_train.json", "test": f"{name}_test.json",
                             "image_folder": root or out, "metric": t.metric, "test_from": t.test_from})
    path = os.path.join(out, "manifest.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(manifest, f, sort_keys=False)
    return path


@dataclass
class Task:
    """One task's records: its training pool, its test pool (None: drawn from the training pool,
    by picture), their image folders, its metric, and where its test records come from."""
    records: list[dict]
    folder: str | None
    metric: str
    test_from: str
    test_records: list[dict] | None = None
    test_folder: str | None = None


def gather(args) -> tuple[dict[str, Task], list[str]]:
    """The records of every requested task, and the missing images. One function: one branch
    per dataset, each naming its files, its metric and where its test records come from, read
    side by side."""
    missing: list[str] = []
    tasks = {}
    present = lambda recs, folder: keep_present(recs, folder, missing)   # noqa: E731
    mix = mix665k_records(args.mix665k) if args.mix665k else {}
    for task in args.tasks:
        if task.startswith("mix:"):
            source = task[4:]
            if not args.mix665k:
                raise PrepareError(f"--tasks {task}: needs --mix665k FILE and --mix-images DIR")
            if source not in mix:
                raise PrepareError(f"--tasks {task}: {args.mix665k} has no records from {source!r}; it has {sorted(mix)}")
            tasks[source] = Task(present(mix[source], args.mix_images), args.mix_images, MIX_METRIC.get(source, "exact"),
                                 f"{args.mix665k} (its {source} records, by picture)")
        elif task == "gqa":
            _need(task, args.gqa and args.gqa_images, "--gqa FILE ... --gqa-images DIR")
            test = present(gqa_records([args.gqa_test]), args.gqa_images) if args.gqa_test else None
            tasks[task] = Task(present(gqa_records(args.gqa), args.gqa_images), args.gqa_images, METRIC[task],
                               args.gqa_test or " ".join(args.gqa) + " (by picture)", test, args.gqa_images)
        elif task == "ocrvqa":
            _need(task, args.ocrvqa and args.ocrvqa_images, "--ocrvqa FILE --ocrvqa-images DIR")
            tasks[task] = Task(present(ocrvqa_records(args.ocrvqa, 1), args.ocrvqa_images), args.ocrvqa_images,
                               METRIC[task], f"{args.ocrvqa} (split 3)",
                               present(ocrvqa_records(args.ocrvqa, 3), args.ocrvqa_images), args.ocrvqa_images)
        elif task == "coco_caption":
            _need(task, args.coco_captions and args.coco_images, "--coco-captions FILE ... --coco-images DIR")
            test = None
            if args.coco_test_captions:
                _need(task, args.coco_test_images, "--coco-test-images DIR with --coco-test-captions")
                test = present(coco_caption_records([args.coco_test_captions]), args.coco_test_images)
            tasks[task] = Task(present(coco_caption_records(args.coco_captions), args.coco_images), args.coco_images,
                               METRIC[task], args.coco_test_captions or " ".join(args.coco_captions) + " (by picture)",
                               test, args.coco_test_images)
        elif task == "vqav2":
            _need(task, args.vqav2_questions and args.vqav2_annotations and args.vqav2_images,
                  "--vqav2-questions, --vqav2-annotations and --vqav2-images")
            test = None
            if args.vqav2_test_questions:
                _need(task, args.vqav2_test_annotations and args.vqav2_test_images,
                      "--vqav2-test-annotations and --vqav2-test-images with --vqav2-test-questions")
                test = present(vqav2_records(args.vqav2_test_questions, args.vqav2_test_annotations,
                                             args.vqav2_test_prefix), args.vqav2_test_images)
            records = vqav2_records(args.vqav2_questions, args.vqav2_annotations, args.vqav2_prefix)
            tasks[task] = Task(present(records, args.vqav2_images), args.vqav2_images, METRIC[task],
                               args.vqav2_test_questions or args.vqav2_questions + " (by picture)", test,
                               args.vqav2_test_images)
        else:
            raise PrepareError(f"--tasks {task}: one of {sorted(METRIC)} or mix:<source>")
    return tasks, missing


def _need(task: str, given, what: str) -> None:
    if not given:
        raise PrepareError(f"--tasks {task}: give {what}")


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the client files and manifest.yaml")
    ap.add_argument("--tasks", nargs="+", default=["gqa", "ocrvqa", "coco_caption"],
                    help="gqa ocrvqa coco_caption vqav2, or mix:<source> (default: the paper's three)")
    ap.add_argument("--clients-per-task", type=int, default=3)
    ap.add_argument("--train-per-client", type=int, default=1000)
    ap.add_argument("--test-per-client", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gqa", nargs="+", metavar="QUESTIONS.json", help="GQA *_balanced_questions.json")
    ap.add_argument("--gqa-test", metavar="QUESTIONS.json",
                    help="GQA testdev_balanced_questions.json (or val_balanced): the test records come from it")
    ap.add_argument("--gqa-images", metavar="DIR")
    ap.add_argument("--ocrvqa", metavar="dataset.json")
    ap.add_argument("--ocrvqa-images", metavar="DIR")
    ap.add_argument("--coco-captions", nargs="+", metavar="CAPTIONS.json", help="captions_train2017.json ...")
    ap.add_argument("--coco-images", metavar="DIR")
    ap.add_argument("--coco-test-captions", metavar="CAPTIONS.json", help="captions_val2017.json: the test records")
    ap.add_argument("--coco-test-images", metavar="DIR", help="its images (val2017)")
    ap.add_argument("--vqav2-questions", metavar="FILE")
    ap.add_argument("--vqav2-annotations", metavar="FILE")
    ap.add_argument("--vqav2-images", metavar="DIR")
    ap.add_argument("--vqav2-prefix", default="COCO_train2014_", help="image file prefix (COCO_val2014_ for val)")
    ap.add_argument("--vqav2-test-questions", metavar="FILE", help="v2_OpenEnded_mscoco_val2014_questions.json: the test records")
    ap.add_argument("--vqav2-test-annotations", metavar="FILE")
    ap.add_argument("--vqav2-test-images", metavar="DIR")
    ap.add_argument("--vqav2-test-prefix", default="COCO_val2014_")
    ap.add_argument("--mix665k", metavar="FILE", help="llava_v1_5_mix665k.json")
    ap.add_argument("--mix-images", metavar="DIR", help="the folder its image paths start from")
    args = ap.parse_args(argv)
    for key in ("clients_per_task", "train_per_client", "test_per_client"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    tasks, missing = gather(args)
    path = write_clients(args.out, tasks, args.clients_per_task, args.train_per_client, args.test_per_client, args.seed)
    with open(os.path.join(args.out, "missing_images.txt"), "w") as f:
        f.write("".join(m + "\n" for m in missing))
    if missing:
        print(f"left out {len(missing)} records whose image is missing: listed in "
              f"{os.path.join(args.out, 'missing_images.txt')}", file=sys.stderr)
    return path


if __name__ == "__main__":
    try:
        print(main())
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
