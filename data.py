"""data.py -- the data of a federated multimodal instruction-tuning run.

Two sources, one in-memory form (`Sample`: an image and its human/gpt turns):
  1. A synthetic multimodal world, generated deterministically from a seed, no files needed.
     Two scenarios mirror the paper's two cross-task scenarios (SPEC section 1):
       A: three VQA-style tasks            colour, shape, count
       B: three mixed tasks                caption, grounding (position), vqa (colour)
     Several clients per task; each client has its own visual style (background tint,
     object sizes), its own label prior and its own answer phrasing, so personalisation
     matters; small train sets so collaboration matters; a held-out test split per client.
  2. LLaVA conversation JSON (records with id, image, conversations of human/gpt turns,
     `<image>` in the first human turn) plus an image folder, one file per client, listed in
     a manifest (YAML/JSON: a list of {name, task, train, test, image_folder}).
     `python data.py --export DIR --scenario A` writes the synthetic world in that format.

Then: tokenisation in the LLaVA-1.5 (Vicuna v1) conversation format with the `<image>`
placeholder expanded to N image tokens, labels masked to the answers only, padding collate.
Every bad record is an error naming the file and record, never a silent drop.

Shape legend: B batch, L text length, N image tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image, ImageDraw

IMAGE = "<image>"
IGNORE = -100

# -----------------------------------------------------------------------------
# Config (keys of the `data:` section of config.yaml)


@dataclass
class DataConfig:
    scenario: str = "A"              # "A" | "B" (synthetic) | "manifest" (LLaVA JSON files)
    manifest: str | None = None      # path of the client manifest when scenario == "manifest"
    clients_per_task: int = 3        # synthetic: clients holding each task
    train_per_client: int = 32       # synthetic: training samples per client
    test_per_client: int = 32        # synthetic: held-out test samples per client
    image_size: int = 32             # synthetic: side of the square images, in pixels
    system_prompt: str = ""          # text before the first turn; LLaVA-1.5 uses Vicuna's
    max_length: int = 2048           # longest tokenised sample (error beyond it)
    max_new_tokens: int = 8          # generation length at evaluation
    skip_bad_records: bool = False   # manifest: leave bad records out (reported) instead of failing


# -----------------------------------------------------------------------------
# In-memory samples and clients


@dataclass
class Sample:
    id: str
    image: Image.Image
    turns: list[tuple[str, str]]     # [(human, gpt), ...]; `<image>` in the first human turn


@dataclass
class ClientData:
    name: str
    task: str
    train: list[Sample]
    test: list[Sample]
    metric: str = "exact"            # "exact" (exact match) | "f1" (token F1, captions)
    skipped: list[str] = field(default_factory=list)   # bad records left out (skip_bad_records)


# -----------------------------------------------------------------------------
# The synthetic world

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (230, 210, 40), "purple": (150, 60, 190)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
CELLS = ("top left", "top right", "bottom left", "bottom right")   # 2 x 2 grid of positions

# Per task: the question and two answer phrasings; clients alternate between them.
TASKS = {
    "colour": ("What colour are the shapes?", ("{colour}", "they are {colour}")),
    "shape": ("What kind of shape is shown?", ("{shape}", "a {shape}")),
    "count": ("How many shapes are there?", ("{count}", "{count_word}")),
    "caption": ("Describe the image briefly.", ("{count_word} {colour} {shape_n}",
                                                "there are {count_word} {colour} {shape_n}")),
    "grounding": ("Where is the {colour} {shape}?", ("{cell}", "at the {cell}")),
    "vqa": ("Which colour is the {shape}?", ("{colour}", "it is {colour}")),
}
SCENARIOS = {"A": ("colour", "shape", "count"), "B": ("caption", "grounding", "vqa")}
# the label each task's clients skew their prior over
PRIOR_ON = {"colour": "colour", "shape": "shape", "count": "count", "caption": "shape",
            "grounding": "cell", "vqa": "colour"}
PRETRAIN_PROMPT = "Describe the image in detail."


def draw_scene(rng: random.Random, size: int, colour: str, shape: str, cells: Sequence[int],
               background: tuple[int, int, int], scale: tuple[float, float]) -> Image.Image:
    """An RGB image: one `colour` `shape` in each of `cells` of a 2 x 2 grid, with jitter."""
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    half = size / 2
    for cell in cells:
        r = rng.uniform(*scale) * half / 2                   # object radius in pixels
        cx = (cell % 2) * half + half / 2 + rng.uniform(-1, 1) * (half / 2 - r) * 0.5
        cy = (cell // 2) * half + half / 2 + rng.uniform(-1, 1) * (half / 2 - r) * 0.5
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


@dataclass
class ClientStyle:
    """What makes a synthetic client different from the others of its task."""
    background: tuple[int, int, int]
    scale: tuple[float, float]       # object radius range, as a fraction of a cell's half side
    favourite: str                   # the label this client's prior favours
    phrasing: int                    # which answer template of its task it uses


def client_style(rng: random.Random, task: str, index: int) -> ClientStyle:
    labels = {"colour": list(COLOURS), "shape": list(SHAPES), "count": ["1", "2", "3"],
              "cell": list(CELLS)}[PRIOR_ON[task]]
    tint = [rng.randint(0, 90) for _ in range(3)] if index % 2 == 0 else [rng.randint(150, 230)] * 3
    lo = rng.uniform(0.45, 0.7)
    return ClientStyle(tuple(tint), (lo, lo + 0.25), labels[index % len(labels)], index % 2)


def _pick(rng: random.Random, options: Sequence[str], favourite: str) -> str:
    """Label prior: half the time the client's favourite, else uniform."""
    return favourite if favourite in options and rng.random() < 0.5 else rng.choice(list(options))


def synthetic_sample(rng: random.Random, task: str, style: ClientStyle, size: int, sid: str) -> Sample:
    fav = lambda kind: style.favourite if PRIOR_ON[task] == kind else ""  # noqa: E731
    colour = _pick(rng, list(COLOURS), fav("colour"))
    shape = _pick(rng, SHAPES, fav("shape"))
    count = 1 if task == "grounding" else int(_pick(rng, ["1", "2", "3"], fav("count")))
    if task == "grounding":
        cells = [CELLS.index(_pick(rng, CELLS, fav("cell")))]
    else:
        cells = sorted(rng.sample(range(4), count))
    image = draw_scene(rng, size, colour, shape, cells, style.background, style.scale)
    words = dict(colour=colour, shape=shape, count=str(count), count_word=COUNT_WORDS[count - 1],
                 shape_n=shape + ("s" if count > 1 else ""), cell=CELLS[cells[0]])
    question, answers = TASKS[task]
    return Sample(sid, image, [(f"{IMAGE}\n{question.format(**words)}", answers[style.phrasing].format(**words))])


def synthetic_clients(scenario: str, cfg: DataConfig, seed: int) -> list[ClientData]:
    """The clients of a synthetic scenario: `clients_per_task` per task, tasks in the order of
    SCENARIOS[scenario]. Deterministic in (scenario, cfg, seed), on any machine: every
    client draws from its own random.Random seeded by a string."""
    if scenario not in SCENARIOS:
        raise ValueError(f"data.scenario must be one of {sorted(SCENARIOS)} or 'manifest', got {scenario!r}")
    clients = []
    for task in SCENARIOS[scenario]:
        for i in range(cfg.clients_per_task):
            rng = random.Random(f"pilot-{seed}-{scenario}-{task}-{i}")
            style = client_style(rng, task, i)
            name = f"{task}{i}"
            n = cfg.train_per_client + cfg.test_per_client
            samples = [synthetic_sample(rng, task, style, cfg.image_size, f"{name}-{j}") for j in range(n)]
            clients.append(ClientData(name, task, samples[:cfg.train_per_client],
                                      samples[cfg.train_per_client:], "f1" if task == "caption" else "exact"))
    return clients


def pretrain_samples(n: int, size: int, seed: int) -> list[Sample]:
    """Detailed captions of random scenes in random styles, for the embedded base's central
    pretraining (standing in for LLaVA's caption pretraining): every attribute named."""
    rng = random.Random(f"pilot-pretrain-{seed}")
    out = []
    for j in range(n):
        colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3)
        cells = sorted(rng.sample(range(4), count))
        bg = tuple(rng.randint(0, 230) for _ in range(3))
        lo = rng.uniform(0.45, 0.7)
        image = draw_scene(rng, size, colour, shape, cells, bg, (lo, lo + 0.25))
        where = " and ".join(CELLS[c] for c in cells)
        text = f"{COUNT_WORDS[count - 1]} {colour} {shape}{'s' if count > 1 else ''} at {where}"
        out.append(Sample(f"pretrain-{j}", image, [(f"{IMAGE}\n{PRETRAIN_PROMPT}", text)]))
    return out


def vocabulary() -> list[str]:
    """Every word the synthetic world and the conversation format can produce."""
    text = " ".join([" ".join(q for q, _ in TASKS.values()), " ".join(" ".join(a) for _, a in TASKS.values()),
                     " ".join(COLOURS), " ".join(SHAPES), " ".join(s + "s" for s in SHAPES),
                     " ".join(COUNT_WORDS), " ".join(CELLS), "1 2 3 and at", PRETRAIN_PROMPT, "USER: ASSISTANT:"])
    text = re.sub(r"\{[a-z_]+\}", " ", text)
    return sorted(set(re.findall(r"\w+|[^\w\s]", text)))


# -----------------------------------------------------------------------------
# LLaVA conversation JSON and the client manifest


class DataError(ValueError):
    """A bad data file or record; the message names the file and the record."""


def _record_error(path: str, index: int, rec, why: str) -> DataError:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return DataError(f"{path}: record {index}{f' (id {rid!r})' if rid is not None else ''}: {why}")


def parse_record(rec, path: str, index: int, image_folder: str) -> Sample:
    """One LLaVA record -> Sample, or a DataError naming file and record."""
    if not isinstance(rec, dict):
        raise _record_error(path, index, rec, f"expected an object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise _record_error(path, index, rec, "'conversations' must be a non-empty list")
    if len(conv) % 2:
        raise _record_error(path, index, rec, f"'conversations' has {len(conv)} turns; expected human/gpt pairs")
    turns = []
    for t in range(0, len(conv), 2):
        pair = conv[t:t + 2]
        for j, (turn, role) in enumerate(zip(pair, ("human", "gpt"))):
            if not isinstance(turn, dict) or turn.get("from") != role:
                got = turn.get("from") if isinstance(turn, dict) else turn
                raise _record_error(path, index, rec, f"turn {t + j} must come from {role!r}, got {got!r}")
            if not isinstance(turn.get("value"), str) or not turn["value"].strip():
                raise _record_error(path, index, rec, f"turn {t + j} has an empty or non-string 'value'")
        turns.append((pair[0]["value"], pair[1]["value"]))
    n_img = sum(h.count(IMAGE) + g.count(IMAGE) for h, g in turns)
    if n_img != 1 or IMAGE not in turns[0][0]:
        raise _record_error(path, index, rec, f"expected exactly one {IMAGE} placeholder, in the first human turn (found {n_img})")
    name = rec.get("image")
    if not isinstance(name, str) or not name:
        raise _record_error(path, index, rec, "'image' must be a file name")
    file = os.path.join(image_folder, name)
    try:
        with Image.open(file) as im:
            image = im.convert("RGB")
    except FileNotFoundError:
        raise _record_error(path, index, rec, f"image file not found: {file}") from None
    except Exception as e:  # PIL raises several types for unreadable files
        raise _record_error(path, index, rec, f"cannot read image {file}: {e}") from None
    return Sample(str(rec.get("id", index)), image, turns)


def load_llava_json(path: str, image_folder: str, skipped: list[str] | None = None) -> list[Sample]:
    """Read a LLaVA conversation JSON file (a list of records). A bad record is a DataError
    naming the file and record, unless `skipped` is a list: then the record is left out and
    its error message appended there (data.skip_bad_records), so nothing is dropped silently."""
    try:
        with open(path) as f:
            records = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no records")
    samples = []
    for i, rec in enumerate(records):
        try:
            samples.append(parse_record(rec, path, i, image_folder))
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    return samples


def load_manifest(path: str, skip_bad_records: bool = False) -> list[ClientData]:
    """A client manifest: YAML or JSON list of {name, task, train, test, image_folder[, metric]};
    relative paths are relative to the manifest. With skip_bad_records, each client's
    `skipped` lists the records left out and why."""
    import yaml
    with open(path) as f:
        entries = yaml.safe_load(f)
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: a manifest is a non-empty list of clients")
    root = os.path.dirname(os.path.abspath(path))
    clients = []
    for i, e in enumerate(entries):
        need = {"name", "task", "train", "test", "image_folder"}
        if not isinstance(e, dict) or need - set(e):
            raise DataError(f"{path}: client {i} needs keys {sorted(need)}, has {sorted(e) if isinstance(e, dict) else e!r}")
        if e.get("metric", "exact") not in METRICS:
            raise DataError(f"{path}: client {i} metric {e['metric']!r} is not one of {sorted(METRICS)}")
        images = os.path.join(root, e["image_folder"])
        skipped = [] if skip_bad_records else None
        train = load_llava_json(os.path.join(root, e["train"]), images, skipped)
        test = load_llava_json(os.path.join(root, e["test"]), images, skipped)
        clients.append(ClientData(str(e["name"]), str(e["task"]), train, test, e.get("metric", "exact"),
                                  skipped or []))
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: client names must be unique, got {names}")
    return clients


def export_llava(clients: Sequence[ClientData], out_dir: str) -> str:
    """Write clients as LLaVA JSON + PNG images + manifest.yaml; returns the manifest path."""
    import yaml
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    manifest = []
    for c in clients:
        for split in ("train", "test"):
            records = []
            for s in getattr(c, split):
                s.image.save(os.path.join(out_dir, "images", f"{s.id}.png"))
                conv = [m for h, g in s.turns for m in ({"from": "human", "value": h}, {"from": "gpt", "value": g})]
                records.append({"id": s.id, "image": f"{s.id}.png", "conversations": conv})
            with open(os.path.join(out_dir, f"{c.name}_{split}.json"), "w") as f:
                json.dump(records, f, indent=1)
        manifest.append({"name": c.name, "task": c.task, "train": f"{c.name}_train.json",
                         "test": f"{c.name}_test.json", "image_folder": "images", "metric": c.metric})
    path = os.path.join(out_dir, "manifest.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(manifest, f, sort_keys=False)
    return path


def load_clients(cfg: DataConfig, seed: int) -> list[ClientData]:
    if cfg.scenario == "manifest":
        if not cfg.manifest:
            raise ValueError("data.manifest: a path is required when data.scenario is 'manifest'")
        clients = load_manifest(cfg.manifest, cfg.skip_bad_records)
    else:
        clients = synthetic_clients(cfg.scenario, cfg, seed)
    for c in clients:
        if not c.train or not c.test:
            raise DataError(f"client {c.name!r} has an empty {'train' if not c.train else 'test'} split")
    return clients


# -----------------------------------------------------------------------------
# Tokenisation (LLaVA-1.5 / Vicuna v1 conversation format) and collate


@dataclass
class Encoder:
    """Turns Samples into model inputs, in LLaVA-1.5's conversation format:
        {system} USER: {human} ASSISTANT: {gpt}</s> USER: ... ASSISTANT:
    `<image>` is expanded to `n_image_tokens` copies of `image_token_id` (the image tokens of
    the connector replace them in model.py); labels are IGNORE everywhere but the answers and
    their EOS. Segments are tokenised separately and concatenated, as LLaVA's own code does."""
    tokenizer: object
    image_processor: object
    image_token_id: int
    n_image_tokens: int
    system_prompt: str = ""
    max_length: int = 2048

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _prompt_ids(self, human: str, first: bool) -> list[int]:
        ids = []
        if first:
            if self.tokenizer.bos_token_id is not None:
                ids.append(self.tokenizer.bos_token_id)
            if self.system_prompt:
                ids += self._ids(self.system_prompt)
        before, _, after = human.partition(IMAGE) if IMAGE in human else ("", "", human)
        ids += self._ids("USER: " + before.strip()) if before.strip() else self._ids("USER:")
        if IMAGE in human:
            ids += [self.image_token_id] * self.n_image_tokens
        return ids + self._ids(after.strip() + " ASSISTANT:")

    def encode(self, s: Sample) -> tuple[list[int], list[int]]:
        """Full conversation -> (input_ids, labels)."""
        ids, labels = [], []
        for t, (human, gpt) in enumerate(s.turns):
            p = self._prompt_ids(human, t == 0)
            a = self._ids(" " + gpt.strip()) + [self.tokenizer.eos_token_id]
            ids += p + a
            labels += [IGNORE] * len(p) + a
        if len(ids) > self.max_length:
            raise DataError(f"sample {s.id!r}: {len(ids)} tokens > data.max_length {self.max_length}")
        return ids, labels

    def encode_prompt(self, s: Sample) -> list[int]:
        """The first turn's prompt, up to `ASSISTANT:`, for generation."""
        return self._prompt_ids(s.turns[0][0], True)

    def pixels(self, samples: Sequence[Sample]) -> torch.Tensor:
        return self.image_processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]  # (B, 3, H, W)

    def _pad(self, seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
        L = max(len(s) for s in seqs)
        return torch.tensor([[value] * (L - len(s)) + s if left else s + [value] * (L - len(s)) for s in seqs])

    def collate(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Training batch, right-padded: input_ids, attention_mask, labels (B, L); pixel_values."""
        enc = [self.encode(s) for s in samples]
        ids = self._pad([e[0] for e in enc], self.tokenizer.pad_token_id, left=False)    # (B, L)
        mask = self._pad([[1] * len(e[0]) for e in enc], 0, left=False)                 # (B, L)
        labels = self._pad([e[1] for e in enc], IGNORE, left=False)                      # (B, L)
        return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=self.pixels(samples))

    def collate_prompts(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Generation batch, left-padded prompts: input_ids, attention_mask (B, L); pixel_values."""
        prompts = [self.encode_prompt(s) for s in samples]
        ids = self._pad(prompts, self.tokenizer.pad_token_id, left=True)                 # (B, L)
        mask = self._pad([[1] * len(p) for p in prompts], 0, left=True)                  # (B, L)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=self.pixels(samples))


# -----------------------------------------------------------------------------
# Metrics


def normalise(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def exact_match(pred: str, ref: str) -> float:
    return float(normalise(pred) == normalise(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalise(pred), normalise(ref)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact": exact_match, "f1": token_f1}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Write a synthetic scenario as LLaVA JSON + images + manifest.")
    ap.add_argument("--export", required=True, help="output folder")
    ap.add_argument("--scenario", default="A", choices=sorted(SCENARIOS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(export_llava(synthetic_clients(args.scenario, DataConfig(scenario=args.scenario), args.seed), args.export))
