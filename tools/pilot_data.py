"""tools/pilot_data.py -- the paper's client data from the public datasets, in one command.

Reads each dataset in its own released format and writes what `train.py` reads: one LLaVA JSON
file per client and split (test records carry all their human answers or captions as
"references", data.references) and a manifest naming each client's task and metric.

    python tools/pilot_data.py --out data/pilot \
        --gqa gqa/train_balanced_questions.json --gqa-images gqa/images \
        --ocrvqa ocr_vqa/dataset.json --ocrvqa-images ocr_vqa/images \
        --coco-captions coco/annotations/captions_train2017.json --coco-images coco/train2017
    python train.py --config config.paper.yaml

Scenario "pilot" (the paper's cross-task setting as a public reimplementation can build it):
3 tasks (GQA, OCR-VQA, COCO Caption) x `--clients-per-task` clients, each task's records
shuffled with `--seed` and cut into disjoint client splits of `--train-per-client` training and
`--test-per-client` held-out test records. The paper does not publish its per-client sizes or
split, so tasks, clients per task and sizes are flags. `--tasks` picks others: vqav2 (VQAv2,
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


def ocrvqa_records(path: str) -> list[dict]:
    """OCR-VQA `dataset.json`: {book id: {imageURL, questions, answers, ...}}; its download
    script saves each cover as `{book id}{extension of imageURL}`. One record per question."""
    books = _load(path, "OCR-VQA dataset.json")
    if not isinstance(books, dict):
        raise PrepareError(f"{path}: OCR-VQA's dataset.json maps book ids to entries")
    out = []
    for bid, book in books.items():
        where = f"book {bid}"
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


def split_clients(task: str, records: list[dict], clients: int, train: int, test: int, seed: int):
    """`clients` disjoint (train, test) splits of the task's records, drawn from one seeded shuffle."""
    need = clients * (train + test)
    if len(records) < need:
        raise PrepareError(f"task {task}: {len(records)} records with their images, but --clients-per-task x "
                           f"(--train-per-client + --test-per-client) = {need}")
    order = random.Random(f"pilot-data-{seed}-{task}").sample(range(len(records)), need)
    for c in range(clients):
        part = [records[i] for i in order[c * (train + test):(c + 1) * (train + test)]]
        yield part[:train], part[train:]


def write_clients(out: str, tasks: dict[str, tuple[list[dict], str | None, str]], clients: int, train: int,
                  test: int, seed: int) -> str:
    """Write every client's files and manifest.yaml under `out`; returns the manifest's path.
    `tasks` maps a task name to (records, image folder, metric)."""
    os.makedirs(out, exist_ok=True)
    manifest = []
    for task, (records, folder, metric) in tasks.items():
        for c, (tr, te) in enumerate(split_clients(task, records, clients, train, test, seed)):
            name = f"{task}{c}"
            for split, recs in (("train", tr), ("test", te)):
                # training never reads "references"; a test record keeps them for scoring
                recs = [{k: v for k, v in r.items() if k != "references"} for r in recs] if split == "train" else recs
                with open(os.path.join(out, f"{name}_{split}.json"), "w") as f:
                    json.dump(recs, f, indent=1)
            manifest.append({"name": name, "task": task, "train": f"{name}_train.json", "test": f"{name}_test.json",
                             "image_folder": os.path.abspath(folder) if folder else out, "metric": metric})
    path = os.path.join(out, "manifest.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(manifest, f, sort_keys=False)
    return path


def gather(args) -> tuple[dict, list[str]]:
    """The records of every requested task with their image folder and metric, and the missing images."""
    missing: list[str] = []
    tasks = {}
    sources = {"gqa": (args.gqa, args.gqa_images, lambda: gqa_records(args.gqa)),
               "ocrvqa": (args.ocrvqa, args.ocrvqa_images, lambda: ocrvqa_records(args.ocrvqa)),
               "coco_caption": (args.coco_captions, args.coco_images, lambda: coco_caption_records(args.coco_captions)),
               "vqav2": (args.vqav2_questions and args.vqav2_annotations, args.vqav2_images,
                         lambda: vqav2_records(args.vqav2_questions, args.vqav2_annotations, args.vqav2_prefix))}
    mix = mix665k_records(args.mix665k) if args.mix665k else {}
    for task in args.tasks:
        if task.startswith("mix:"):
            source = task[4:]
            if not args.mix665k:
                raise PrepareError(f"--tasks {task}: needs --mix665k FILE and --mix-images DIR")
            if source not in mix:
                raise PrepareError(f"--tasks {task}: {args.mix665k} has no records from {source!r}; it has {sorted(mix)}")
            folder = args.mix_images
            tasks[source] = (keep_present(mix[source], folder, missing), folder, MIX_METRIC.get(source, "exact"))
            continue
        if task not in sources:
            raise PrepareError(f"--tasks {task}: one of {sorted(sources)} or mix:<source>")
        given, folder, read = sources[task]
        if not given or not folder:
            raise PrepareError(f"--tasks {task}: give its file(s) and image folder (--{task.replace('_', '-')}...)")
        tasks[task] = (keep_present(read(), folder, missing), folder, METRIC[task])
    return tasks, missing


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
    ap.add_argument("--gqa-images", metavar="DIR")
    ap.add_argument("--ocrvqa", metavar="dataset.json")
    ap.add_argument("--ocrvqa-images", metavar="DIR")
    ap.add_argument("--coco-captions", nargs="+", metavar="CAPTIONS.json", help="captions_train2017.json ...")
    ap.add_argument("--coco-images", metavar="DIR")
    ap.add_argument("--vqav2-questions", metavar="FILE")
    ap.add_argument("--vqav2-annotations", metavar="FILE")
    ap.add_argument("--vqav2-images", metavar="DIR")
    ap.add_argument("--vqav2-prefix", default="COCO_train2014_", help="image file prefix (COCO_val2014_ for val)")
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
