"""data.py -- the data of a federated multimodal instruction-tuning run: records, inputs, batches, scores.

  records   LLaVA conversation JSON (id, image, conversations of human/gpt turns, `<image>` in the
            first human turn; text-only records without `image`, as LLaVA-1.5's own data mix holds
            them) plus an image folder, one file per client and split, listed in a manifest
            (YAML/JSON: a list of {name, task, train, test, image_folder[, metric]}). Every bad
            record is an error naming the file and record (or, with skip_bad_records, left out and
            reported), never a silent drop; image paths must stay inside their image folder.
            Loading keeps records, not pixels: each image's header is checked and its file name
            kept; `picture` decodes it when its batch is built.
  inputs    Encoder: a record as LLaVA-1.5's training code tokenises it (conv_vicuna_v1,
            preprocess_multimodal, preprocess_v1, tokenizer_image_token: SPEC 5c) and its picture
            padded to a square (expand2square) before the image processor.
  batches   Batches / load_batches: the planned batches, encoded in the DataLoader's workers and
            delivered as Batch (inputs, kept indices, skipped records).
  scores    METRICS, corpus-level, each record with one or more references: exact, f1, vqa
            (EvalAI's VQA accuracy), gqa, cider (CIDEr-D) (SPEC 5d).

`Sample` is the one form every source takes; the synthetic worlds of the default run
(tools/embedded.py) build Samples in memory. This file imports no other file of the project. Shape legend: B batch, L text length.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from PIL import Image, ImageOps
from tqdm import tqdm

IMAGE = "<image>"
IGNORE = -100
# Vicuna v1's system prompt, which LLaVA-1.5 and the released Pilot scripts (`--version v1`) train
# with (llava/conversation.py conv_vicuna_v1). Vicuna v0's "a curious human ... the human's
# questions" is the older one.
LLAVA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ASPECT_RATIOS = ("pad", "crop")

# -----------------------------------------------------------------------------
# Config (keys of the `data:` section of config.yaml)


@dataclass
class DataConfig:
    scenario: str = "A"              # "A" | "B" | "D" (synthetic) | "manifest" (LLaVA JSON files)
    manifest: str | None = None      # path of the client manifest when scenario == "manifest"
    clients_per_task: int = 3        # synthetic: clients holding each task
    train_per_client: int = 32       # synthetic: training samples per client
    test_per_client: int = 32        # synthetic: held-out test samples per client
    val_per_client: int = 0          # held out of each client's own training data, for model selection
    minority_phrasing: bool = True   # A/B: clients 1, 3, ... of a task answer in its second phrasing
    image_size: int = 32             # synthetic: side of the square images, in pixels
    max_image_side: int = 1024       # manifest: larger images are shrunk as they are decoded
    num_workers: int = 0             # DataLoader processes decoding the next batches (GPU: 4-8; CPU: 0)
    system_prompt: str = ""          # text before the first turn; LLaVA-1.5: LLAVA_V1_SYSTEM
    image_aspect_ratio: str = "pad"  # "pad": to a square in the processor's mean colour (LLaVA-1.5) | "crop"
    max_length: int = 2048           # longest tokenised sample (error beyond it)
    max_new_tokens: int = 8          # generation length at evaluation
    skip_bad_records: bool = False   # manifest: leave bad records out (reported) instead of failing


# -----------------------------------------------------------------------------
# In-memory samples and clients


@dataclass
class Sample:
    """One record. `image` is a picture in memory (the synthetic worlds, small by construction),
    the path of the file it is read from (LLaVA JSON: only the name is kept at load time, so a
    client of 20,000 records costs kilobytes, not gigabytes), or None for a text-only record
    (no `<image>`, no image tokens; the connector is not used for it). `picture` is the one
    place where a record becomes pixels."""
    id: str
    image: Image.Image | str | None
    turns: list[tuple[str, str]]     # [(human, gpt), ...]; `<image>` in the first human turn if image
    source: str = ""                 # where it came from, for error messages ("file: record i")
    refs: list[str] | None = None    # a test record's reference answers ("references"); None: its first answer


def references(s: Sample) -> list[str]:
    """What a prediction for s's first turn is scored against: the record's "references" (all
    the human answers or captions) when it has them, else its first gpt answer."""
    return s.refs if s.refs else [s.turns[0][1]]


@dataclass
class ClientData:
    name: str
    task: str
    train: list[Sample]
    test: list[Sample]
    metric: str = "exact"            # a key of METRICS: exact | f1 | vqa | gqa | cider
    skipped: list[str] = field(default_factory=list)   # bad records left out (skip_bad_records)
    val: list[Sample] = field(default_factory=list)    # validation split, carved from its training data
    files: list[str] = field(default_factory=list)     # the JSON files it was read from (run identity)


# -----------------------------------------------------------------------------
# LLaVA conversation JSON and the client manifest


class DataError(ValueError):
    """A bad data file or record; the message names the file and the record (exit code 2)."""


# The run's other two kinds of failure, defined here, at the bottom of the imports, so that
# every file that meets one (train.py, tools/) raises the same class without importing train.py.

class ConfigError(ValueError):
    """A bad config value, file or command line, naming the key or flag: exit code 2."""


class RunError(RuntimeError):
    """A run that cannot go on (a non-finite loss, an unreadable run directory): exit code 1."""


def _record_error(path: str, index: int, rec, why: str) -> DataError:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return DataError(f"{path}: record {index}{f' (id {rid!r})' if rid is not None else ''}: {why}")


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_name(name, what: str, where: str) -> str:
    """Client and task names become file names and message keys: letters, digits, _ and -."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise DataError(f"{where}: {what} {name!r} must be letters, digits, '_' or '-' (it becomes a file name)")
    return name


# Image modes and how each becomes RGB: high-bit greyscale is rescaled (range-checked when
# decoded), transparency is composited on white, the rest converts directly. Anything else has
# no faithful RGB reading and is refused at load time, from the header alone.
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA")
PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")


def check_image_header(file: str) -> tuple[int, int]:
    """Read an image file's header only (PIL's lazy `Image.open`, no pixel decode): a missing
    file, an unknown format, a corrupt header or a mode with no RGB reading fails here, at load
    time, for the price of a few hundred bytes read. Returns (width, height)."""
    with Image.open(file) as im:
        if im.mode not in HIGH_BIT_MODES + ALPHA_MODES + PLAIN_MODES:
            raise ValueError(f"mode {im.mode} is not a picture this loader can turn into RGB faithfully")
        return im.size


def read_image(file: str, max_side: int) -> Image.Image:
    """An image file as the RGB picture it shows: EXIF rotation applied, the first frame of an
    animation, transparency composited on white (not the black that convert("RGB") leaves),
    16-bit and float greyscale rescaled to 0..255, and the longest side shrunk to max_side so
    a large photo is never decoded at full size. Raises ValueError saying why for a mode that
    has no faithful RGB reading."""
    with Image.open(file) as im:
        im.draft("RGB", (max_side, max_side))                  # JPEG: decode at reduced size
        im = ImageOps.exif_transpose(im)
        if im.mode in HIGH_BIT_MODES:
            lo, hi = im.getextrema()
            scale = 255 / 65535 if im.mode.startswith("I;16") else (255.0 if im.mode == "F" and hi <= 1 else 1.0)
            if im.mode == "I" and hi > 255:
                scale = 255 / 65535 if hi <= 65535 else 0
            if lo < 0 or scale == 0 or hi * scale > 255.5:
                raise ValueError(f"mode {im.mode} with values in [{lo}, {hi}] has no known 8-bit reading")
            im = im.point(lambda v: v * scale, "F").convert("L")
        elif im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        elif im.mode not in PLAIN_MODES:
            raise ValueError(f"mode {im.mode} is not a picture this loader can turn into RGB faithfully")
        image = im.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.LANCZOS)
    return image


def picture(s: Sample, max_side: int = 1024) -> Image.Image | None:
    """THE place where a record becomes pixels: a synthetic sample's picture as it is, a LLaVA
    record's file decoded now (read_image), when its batch is built; None for a text-only
    record. A file that fails to decode here, in the middle of a run, is a DataError naming the
    file and the record."""
    if s.image is None or isinstance(s.image, Image.Image):
        return s.image
    try:
        return read_image(s.image, max_side)
    except FileNotFoundError:
        raise DataError(f"{s.source or s.id}: image file not found: {s.image}") from None
    except Exception as e:  # PIL raises several types for unreadable files
        raise DataError(f"{s.source or s.id}: cannot read image {s.image}: {e}") from None


def parse_record(rec, path: str, index: int, image_folder: str) -> Sample:
    """One LLaVA record -> Sample, or a DataError naming file and record. As LLaVA-1.5's
    training code reads its data mix (SPEC 5c): a first turn from gpt is dropped
    (preprocess_v1), then turns alternate human/gpt; a record with `image` holds exactly one
    `<image>`, in its first human turn (anywhere in it: the Encoder moves it to the front, as
    preprocess_multimodal does); a record without `image` is text-only and holds none. The image
    must be a file inside image_folder (no absolute paths, no '..', no symlink that leads out)
    whose header reads (check_image_header); its pixels are decoded only when its batch is built.
    An optional "references" list (all the human answers or captions of a test record) is what
    scoring compares with (data.references); training never reads it."""
    if not isinstance(rec, dict):
        raise _record_error(path, index, rec, f"expected an object, got {type(rec).__name__}")
    turns = _record_turns(rec, path, index)
    n_img = sum(h.count(IMAGE) + g.count(IMAGE) for h, g in turns)
    rid = rec.get("id", index)
    source = f"{path}: record {index} (id {rid!r})"
    refs = rec.get("references")
    if refs is not None and (not isinstance(refs, list) or not refs
                             or not all(isinstance(r, str) and r.strip() for r in refs)):
        raise _record_error(path, index, rec, "'references' must be a non-empty list of non-empty strings")
    if "image" not in rec or rec["image"] is None:
        if n_img:
            raise _record_error(path, index, rec, f"has no 'image' but {n_img} {IMAGE} placeholder(s)")
        return Sample(str(rid), None, turns, source, refs)
    if n_img != 1 or IMAGE not in turns[0][0]:
        raise _record_error(path, index, rec, f"expected exactly one {IMAGE} placeholder, in the first human turn (found {n_img})")
    return Sample(str(rid), _record_image(rec, path, index, image_folder), turns, source, refs)


def _record_turns(rec: dict, path: str, index: int) -> list[tuple[str, str]]:
    """A record's (human, gpt) pairs, its first turn dropped when it comes from gpt (LLaVA's
    preprocess_v1); every turn a non-empty string from the right role."""
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise _record_error(path, index, rec, "'conversations' must be a non-empty list")
    first = 1 if isinstance(conv[0], dict) and conv[0].get("from") == "gpt" else 0   # LLaVA drops it
    if not conv[first:] or len(conv[first:]) % 2:
        raise _record_error(path, index, rec, f"'conversations' has {len(conv) - first} turns"
                            f"{' after its first (gpt) turn' if first else ''}; expected human/gpt pairs")
    turns = []
    for t in range(first, len(conv), 2):
        pair = conv[t:t + 2]
        for j, (turn, role) in enumerate(zip(pair, ("human", "gpt"))):
            if not isinstance(turn, dict) or turn.get("from") != role:
                got = turn.get("from") if isinstance(turn, dict) else turn
                raise _record_error(path, index, rec, f"turn {t + j} must come from {role!r}, got {got!r}")
            if not isinstance(turn.get("value"), str) or not turn["value"].strip():
                raise _record_error(path, index, rec, f"turn {t + j} has an empty or non-string 'value'")
        turns.append((pair[0]["value"], pair[1]["value"]))
    return turns


def _record_image(rec: dict, path: str, index: int, image_folder: str) -> str:
    """The record's image file: a name inside image_folder whose header reads."""
    name = rec["image"]
    if not isinstance(name, str) or not name:
        raise _record_error(path, index, rec, "'image' must be a file name")
    folder = os.path.realpath(image_folder)
    file = os.path.join(image_folder, name)
    if os.path.isabs(name) or os.path.commonpath([folder, os.path.realpath(file)]) != folder:
        raise _record_error(path, index, rec, f"image {name!r} lies outside the image folder {image_folder}")
    try:
        check_image_header(file)
    except FileNotFoundError:
        raise _record_error(path, index, rec, f"image file not found: {file}") from None
    except Exception as e:  # PIL raises several types for unreadable files
        raise _record_error(path, index, rec, f"cannot read image {file}: {e}") from None
    return file


def read_json(path: str, what: str):
    """A JSON file, or a DataError naming it: missing, not UTF-8, not JSON, unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON: {e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None


def load_llava_json(path: str, image_folder: str, skipped: list[str] | None = None,
                    progress: bool = False) -> list[Sample]:
    """Read a LLaVA conversation JSON file (a list of records). A bad record is a DataError
    naming the file and record, unless `skipped` is a list: then the record is left out and
    its error message appended there (data.skip_bad_records), so nothing is dropped silently."""
    records = read_json(path, "file")
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no records")
    samples = []
    for i, rec in enumerate(tqdm(records, desc=f"checking {os.path.basename(path)}", unit="record",
                                 disable=None if progress else True, leave=False)):
        try:
            samples.append(parse_record(rec, path, i, image_folder))
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    return samples


MANIFEST_KEYS = {"name", "task", "train", "test", "image_folder", "metric", "test_from"}
OPTIONAL_KEYS = {"metric", "test_from"}   # test_from: where the test records came from (a note, not read)


def read_yaml(path: str, what: str):
    """A YAML (or JSON) file, or a DataError naming it: missing, not UTF-8, not YAML."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise DataError(f"{path}: {what} is not valid YAML: {' '.join(str(e).split())}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read {what}: {e}") from None


def load_manifest(path: str, skip_bad_records: bool = False, progress: bool = False) -> list[ClientData]:
    """A client manifest: YAML or JSON list of {name, task, train, test, image_folder[, metric,
    test_from]} (test_from: where the test records came from, written by tools/pilot_data.py);
    relative paths are relative to the manifest; unknown keys are errors. With
    skip_bad_records, each client's `skipped` lists the records left out and why."""
    entries = read_yaml(path, "manifest")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: a manifest is a non-empty list of clients")
    root = os.path.dirname(os.path.abspath(path))
    clients = []
    for i, e in enumerate(entries):
        need = MANIFEST_KEYS - OPTIONAL_KEYS
        if not isinstance(e, dict) or need - set(e):
            raise DataError(f"{path}: client {i} needs keys {sorted(need)}, has {sorted(e) if isinstance(e, dict) else e!r}")
        if set(e) - MANIFEST_KEYS:
            raise DataError(f"{path}: client {i}: unknown keys {sorted(set(e) - MANIFEST_KEYS)}; allowed: {sorted(MANIFEST_KEYS)}")
        check_name(e["name"], "client name", f"{path}: client {i}")
        check_name(e["task"], "task name", f"{path}: client {i}")
        if e.get("metric", "exact") not in METRICS:
            raise DataError(f"{path}: client {i} metric {e['metric']!r} is not one of {sorted(METRICS)}")
        for key in ("train", "test", "image_folder"):
            if not isinstance(e[key], str):
                raise DataError(f"{path}: client {i}: {key} must be a path, got {e[key]!r}")
        images = os.path.join(root, e["image_folder"])
        skipped = [] if skip_bad_records else None
        files = [os.path.join(root, e[split]) for split in ("train", "test")]
        train, test = (load_llava_json(f, images, skipped, progress) for f in files)
        clients.append(ClientData(e["name"], e["task"], train, test, e.get("metric", "exact"), skipped or [],
                                  files=files))
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: client names must be unique, got {names}")
    return clients


def load_clients(cfg: DataConfig, progress: bool = False) -> list[ClientData]:
    """Every client of data.manifest, checked: non-empty splits; with val_per_client, each
    client's validation split is carved from the end of its training file. (The synthetic
    scenarios are tools/embedded.py's; train.load_data picks between the two.)"""
    if cfg.scenario != "manifest" or not cfg.manifest:
        raise DataError("data.manifest: a path is required when data.scenario is 'manifest'")
    clients = load_manifest(cfg.manifest, cfg.skip_bad_records, progress)
    for c in clients:
        if cfg.val_per_client and len(c.train) <= cfg.val_per_client:
            raise DataError(f"client {c.name!r}: {len(c.train)} training records leave none after "
                            f"data.val_per_client = {cfg.val_per_client}")
        if cfg.val_per_client:
            c.train, c.val = c.train[:-cfg.val_per_client], c.train[-cfg.val_per_client:]
    for c in clients:
        if not c.train or not c.test:
            raise DataError(f"client {c.name!r} has an empty {'train' if not c.train else 'test'} split")
    return clients


# -----------------------------------------------------------------------------
# The model's inputs: tokens and pictures exactly as LLaVA-1.5 trains on them (SPEC 5c)


def image_first(human: str) -> str:
    """LLaVA's preprocess_multimodal: the turn's `<image>` taken out and put at its front,
    followed by a newline ("Who wrote this book?\n<image>" -> "<image>\nWho wrote this book?")."""
    return (IMAGE + "\n" + human.replace(IMAGE, "").strip()).strip()


def expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA's expand2square (llava/mm_utils.py): the picture centred on a square of its longer
    side, the rest in `fill` (the processor's mean colour x 255, truncated to int, as LLaVA does).
    A square picture is returned as it is."""
    w, h = image.size
    if w == h:
        return image
    out = Image.new(image.mode, (max(w, h),) * 2, fill)
    out.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


@dataclass
class Encoder:
    """Turns Samples into model inputs as LLaVA-1.5's training code does (SPEC 5c; haotian-liu/
    LLaVA conv_vicuna_v1, preprocess_multimodal, preprocess_v1, tokenizer_image_token):

        {system} USER: <image>\n{h1} ASSISTANT: {g1}</s>USER: {h2} ASSISTANT: {g2}</s>

    The text is split at `<image>`; each chunk is tokenised with the tokenizer's special tokens
    (its BOS), the BOS is kept on the first chunk only, and `n_image_tokens` copies of
    `image_token_id` go between the chunks (the connector's tokens replace them in model.py).
    With a Llama tokenizer this leaves "▁" before the image and "▁" "<0x0A>" after it, as in
    LLaVA-1.5's own inputs. Labels: every token of each answer and its `</s>` (the tokens whose
    characters lie in " {g}</s>"), IGNORE elsewhere; computed from the fast tokenizer's offsets
    rather than LLaVA's length arithmetic, which gives the same labels (tests/test_llava_format.py)
    without its "tokenization mismatch" cases. A text-only Sample (image None) is one chunk.
    [choice] With an empty system prompt the text starts at "USER:" (LLaVA would start it with
    the separator, " USER:").
    Pictures are padded to a square in the processor's mean colour first (image_aspect_ratio
    "pad", LLaVA-1.5's `--image_aspect_ratio pad`) unless the processor pads itself (llava-hf's
    LlavaImageProcessor with do_pad); "crop" leaves them to the processor's centre crop. They
    are decoded in collate (data.picture), so in a DataLoader worker."""
    tokenizer: object
    image_processor: object
    image_token_id: int
    n_image_tokens: int
    system_prompt: str = ""
    max_length: int = 2048
    max_image_side: int = 1024
    num_workers: int = 0             # how batches are loaded (data.num_workers, data.skip_bad_records):
    skip_bad_records: bool = False   # the loaders of fed.py read them here, beside the encoding
    image_aspect_ratio: str = "pad"

    def text(self, s: Sample, prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """conv_vicuna_v1's get_prompt of the Sample, and the character span of every answer
        (" {g}</s>", the space after "ASSISTANT:" included). prompt=True: the first turn up to
        "ASSISTANT:", for generation (LLaVA's eval appends an empty assistant message)."""
        text, spans = (self.system_prompt + " " if self.system_prompt else ""), []
        for human, gpt in s.turns:
            text += f"USER: {image_first(human) if IMAGE in human else human} ASSISTANT:"
            if prompt:
                break
            answer = f" {gpt}{self.tokenizer.eos_token}"
            spans.append((len(text), len(text) + len(answer)))
            text += answer
        if (s.image is None) != (IMAGE not in text) or text.count(IMAGE) > 1:
            raise DataError(f"{s.source or s.id}: a sample with{'out' if s.image is None else ''} an image holds "
                            f"{text.count(IMAGE)} {IMAGE} placeholders")
        return text, spans

    def _splice(self, chunks: list[list[int]], image: int, drop: int) -> list[int]:
        """tokenizer_image_token: the chunks joined by n_image_tokens copies of `image`, the
        first `drop` ids of every later chunk dropped (LLaVA drops one, the BOS, when the first
        chunk starts with the BOS)."""
        ids = list(chunks[0])
        for c in chunks[1:]:
            ids += [image] * self.n_image_tokens + c[drop:]
        return ids

    def encode(self, s: Sample, check: bool = True, prompt: bool = False) -> tuple[list[int], list[int]]:
        """Sample -> (input_ids, labels); prompt=True: the generation prompt, labels all IGNORE."""
        text, spans = self.text(s, prompt)
        chunks = text.split(IMAGE)
        enc = self.tokenizer(chunks, return_offsets_mapping=True)
        labels, start = [], 0   # start: where the chunk begins in `text`
        for chunk, ids, offsets in zip(chunks, enc.input_ids, enc.offset_mapping):
            labels.append([i if b > a and any(lo <= start + a and start + b <= hi for lo, hi in spans) else IGNORE
                           for i, (a, b) in zip(ids, offsets)])
            start += len(chunk) + len(IMAGE)
        drop = int(enc.input_ids[0][:1] == [self.tokenizer.bos_token_id])
        ids = self._splice(enc.input_ids, self.image_token_id, drop)
        if check and len(ids) > self.max_length:
            raise DataError(f"{s.source or s.id}: {len(ids)} tokens > data.max_length {self.max_length}")
        return ids, self._splice(labels, IGNORE, drop)

    def lengths(self, samples: Sequence[Sample], chunk: int = 4096, progress: bool = False) -> list[int]:
        """len(encode(s)[0]) of every sample, with the chunks tokenised `chunk` at a time (a fast
        tokenizer batches them in Rust: tens of thousands of records a second)."""
        texts, owner = [], []
        for i, s in enumerate(samples):
            parts = self.text(s)[0].split(IMAGE)
            texts += parts
            owner += [i] * len(parts)
        sizes, bos = [], []    # per chunk: its token count, whether it starts with the BOS
        bar = tqdm(total=len(texts), desc="tokenising", unit="text", disable=None if progress else True, leave=False)
        for lo in range(0, len(texts), chunk):
            for t in self.tokenizer(texts[lo:lo + chunk]).input_ids:
                sizes.append(len(t))
                bos.append(t[:1] == [self.tokenizer.bos_token_id])
            bar.update(min(chunk, len(texts) - lo))
        bar.close()
        n, drop = [0] * len(samples), [0] * len(samples)
        for j, i in enumerate(owner):
            if j and owner[j - 1] == i:   # a later chunk of sample i: the image tokens, its BOS dropped
                n[i] += self.n_image_tokens + sizes[j] - drop[i]
            else:
                n[i], drop[i] = sizes[j], int(bos[j])
        return n

    def encode_prompt(self, s: Sample) -> list[int]:
        """The first turn's prompt, up to `ASSISTANT:`, for generation."""
        return self.encode(s, check=False, prompt=True)[0]

    def pixels(self, pictures: Sequence[Image.Image | None]) -> torch.Tensor | None:
        """pixel_values (n, 3, H, W) of the pictures that are not None (text-only samples have
        none), padded to squares first (image_aspect_ratio pad); None when there are none."""
        images = [p for p in pictures if p is not None]
        if not images:
            return None
        if self.image_aspect_ratio == "pad" and not getattr(self.image_processor, "do_pad", False):
            fill = tuple(int(x * 255) for x in self.image_processor.image_mean)
            images = [expand2square(p, fill) for p in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]   # (n, 3, H, W)

    def _pad(self, seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
        L = max(len(s) for s in seqs)
        return torch.tensor([[value] * (L - len(s)) + s if left else s + [value] * (L - len(s)) for s in seqs])

    def _with_pixels(self, batch: dict, samples: Sequence[Sample], pictures) -> dict:
        if pictures is None:
            pictures = [picture(s, self.max_image_side) for s in samples]
        pixel_values = self.pixels(pictures)
        return batch if pixel_values is None else batch | {"pixel_values": pixel_values}

    def collate(self, samples: Sequence[Sample], pictures=None) -> dict[str, torch.Tensor]:
        """Training batch, right-padded: input_ids, attention_mask, labels (B, L); pixel_values
        (n, 3, H, W) of the n samples that have a picture, in batch order (absent when n = 0)."""
        enc = [self.encode(s) for s in samples]
        ids = self._pad([e[0] for e in enc], self.tokenizer.pad_token_id, left=False)    # (B, L)
        mask = self._pad([[1] * len(e[0]) for e in enc], 0, left=False)                 # (B, L)
        labels = self._pad([e[1] for e in enc], IGNORE, left=False)                      # (B, L)
        return self._with_pixels(dict(input_ids=ids, attention_mask=mask, labels=labels), samples, pictures)

    def collate_prompts(self, samples: Sequence[Sample], pictures=None) -> dict[str, torch.Tensor]:
        """Generation batch, left-padded prompts: input_ids, attention_mask (B, L); pixel_values."""
        prompts = [self.encode_prompt(s) for s in samples]
        ids = self._pad(prompts, self.tokenizer.pad_token_id, left=True)                 # (B, L)
        mask = self._pad([[1] * len(p) for p in prompts], 0, left=True)                  # (B, L)
        return self._with_pixels(dict(input_ids=ids, attention_mask=mask), samples, pictures)


# -----------------------------------------------------------------------------
# Batches: samples become model inputs (Encoder) in the loader's workers


class Batch(NamedTuple):
    """One planned batch as the loader delivers it: the model's inputs (Encoder.collate or
    collate_prompts; None when no sample of it is left), the plan's indices it holds, and what
    was skipped. A picture that does not decode is `error` without data.skip_bad_records (it
    travels as data: a worker's raise would arrive wrapped in its traceback), or named in
    `skipped` with it."""
    inputs: dict[str, torch.Tensor] | None
    kept: list[int]
    skipped: list[str]
    error: str | None = None


class Batches(torch.utils.data.Dataset):
    """Planned batches of samples as a map-style dataset for torch's DataLoader: item i is
    batch i (a Batch), built in a worker process when num_workers > 0, so pictures decode while
    the model works on the previous batch."""

    def __init__(self, enc: Encoder, samples: Sequence[Sample], plan: Sequence[Sequence[int]],
                 prompts: bool = False, skip_bad: bool = False):
        self.enc, self.samples, self.plan, self.prompts, self.skip_bad = enc, samples, list(plan), prompts, skip_bad

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Batch:
        kept, pictures, skipped = [], [], []
        for j in self.plan[i]:
            try:
                pictures.append(picture(self.samples[j], self.enc.max_image_side))
                kept.append(j)
            except DataError as e:
                if not self.skip_bad:
                    return Batch(None, [], [], str(e))
                skipped.append(str(e))
        collate = self.enc.collate_prompts if self.prompts else self.enc.collate
        return Batch(collate([self.samples[j] for j in kept], pictures) if kept else None, kept, skipped)


def batch_loader(enc: Encoder, samples: Sequence[Sample], plan: Sequence[Sequence[int]], prompts: bool = False,
                 num_workers: int = 0, pin_memory: bool = False, skip_bad: bool = False):
    """A DataLoader yielding the planned batches in plan order (batch_size=None: Batches
    already batches). Its workers fork from this process and exit with it."""
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # a forked worker must not use Rust threads
    return torch.utils.data.DataLoader(Batches(enc, samples, plan, prompts, skip_bad), batch_size=None,
                                       shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                                       prefetch_factor=2 if num_workers else None)


def load_batches(enc: Encoder, samples: Sequence[Sample], plan, dev: torch.device, prompts: bool = False,
                 skipped: list[str] | None = None):
    """The planned batches, decoded ahead by data.num_workers workers, on `dev`. A picture
    that does not decode is a DataError naming it; with data.skip_bad_records its sample is
    left out and its message added to `skipped` once. Yields (inputs or None, kept indices)."""
    for batch in batch_loader(enc, samples, plan, prompts, enc.num_workers, dev.type == "cuda", enc.skip_bad_records):
        if batch.error is not None:
            raise DataError(batch.error)
        if skipped is not None:
            skipped.extend(m for m in batch.skipped if m not in skipped)
        inputs = batch.inputs
        yield (None if inputs is None else {k: v.to(dev, non_blocking=True) for k, v in inputs.items()}), batch.kept


# -----------------------------------------------------------------------------
# Metrics (SPEC 5d): corpus-level, each record with one or more references
#   METRICS[name](predictions, references) -> float; predictions a list of strings, references
#   a list of lists of strings (one list per record, in the same order).


def normalise(text: str) -> list[str]:
    """Lowercase alphanumeric words: the tokens of `exact`, `f1` and `cider`."""
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


def _best_of(score):
    """A per-pair score -> a corpus metric: each record's best over its references, averaged."""
    def metric(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        _check_lengths(predictions, references)
        return sum(max(score(p, r) for r in refs) for p, refs in zip(predictions, references)) / len(predictions)
    return metric


def _check_lengths(predictions, references) -> None:
    if len(predictions) != len(references) or not predictions or not all(references):
        raise ValueError(f"a metric needs one non-empty list of references per prediction, got {len(predictions)} "
                         f"predictions and {len(references)} reference lists")


# VQA accuracy (VQAv2, TextVQA): the EvalAI answer processing of the VQA challenge (as LLaVA's
# m4c_evaluator and MMF apply it to predictions and human answers alike), then the soft score.
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"}
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")     # as EvalAI writes it: a "." not followed by a digit
VQA_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")        # a thousands comma, 1,000


def vqa_normalise(answer: str) -> str:
    """EvalAI's answer processing, step by step: lowercase, drop "," and "?" and split "'s" off;
    newlines and tabs to spaces; each punctuation mark dropped where it touches a space (or the
    text has a thousands comma), else replaced by a space; periods not before a digit dropped;
    number words to digits (none, zero..ten), articles (a, an, the) dropped, contractions
    written with their apostrophe (dont -> don't)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in VQA_PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or VQA_COMMA.search(text)) else " ")
    out = VQA_PERIOD.sub("", out)
    words = [VQA_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """VQA accuracy (Antol et al. 2015, as EvalAI scores VQAv2 and TextVQA): the prediction and
    the n human answers normalised by vqa_normalise; for each of the n leave-one-out subsets of
    n - 1 answers the prediction scores min(1, matches / 3); the record's score is their mean.
    [choice] With fewer than 10 answers the bar is min(3, n - 1) matches among the others (n = 2:
    the other answer; n = 3: both others; n >= 4: three, as with 10), and with one answer it is
    exact match of the normalised strings. With 10 it is the standard."""
    _check_lengths(predictions, references)
    total = 0.0
    for pred, refs in zip(predictions, references):
        p, gts = vqa_normalise(pred), [vqa_normalise(r) for r in refs]
        if len(gts) == 1:
            total += float(p == gts[0])
            continue
        bar = min(3, len(gts) - 1)
        total += sum(min(1.0, sum(g == p for j, g in enumerate(gts) if j != i) / bar) for i in range(len(gts))) / len(gts)
    return total / len(predictions)


def gqa_normalise(answer: str) -> str:
    """GQA's evaluation (eval.py of the GQA release, as LLaVA's eval_gqa runs it): lowercase,
    a trailing "." stripped, surrounding spaces removed."""
    text = answer.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def gqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """GQA accuracy: exact match of gqa_normalise'd strings (best over a record's references)."""
    return _best_of(lambda p, r: float(gqa_normalise(p) == gqa_normalise(r)))(predictions, references)


def _ngrams(words: list[str], n: int = 4) -> Counter:
    """coco-caption's precook: counts of every 1..n-gram."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015) as coco-caption's cider_scorer computes it (pycocoevalcap
    `Cider`), over the whole evaluated set:
      - document frequency df(g) = the number of records whose references contain n-gram g, and
        ref_len = log(number of records): the IDF comes from this set, so only a full test set's
        CIDEr compares across papers (a subset's is another number);
      - per n, a TF-IDF vector of counts x (ref_len - log(max(1, df))); for the prediction and
        each reference: sum over g of min(v_pred, v_ref) * v_ref (the clipping), divided by both
        norms, times exp(-delta^2 / (2 sigma^2)) with delta the difference of their lengths;
      - a record's score is the mean over n = 1..4 and over its references, x 10; the corpus score
        the mean over records.
    As in cider_scorer, the "length" of a text is its number of bigrams (its code counts the
    n-grams whose index n-1 is 1), not of words.
    [choice] Tokens: lowercase words of letters and digits (normalise), every other character a
    separator. coco-caption tokenises with Stanford's PTBTokenizer (Java), which lowercases,
    keeps hyphenated words whole, splits clitics ("do n't", "dog 's") and then drops punctuation
    tokens: the two differ on hyphens and apostrophes only."""
    _check_lengths(predictions, references)
    cooked = [(_ngrams(normalise(p), n), [_ngrams(normalise(r), n) for r in refs])
              for p, refs in zip(predictions, references)]
    df = Counter(g for _, refs in cooked for g in {g for r in refs for g in r})
    ref_len = math.log(float(len(cooked)))

    def vector(counts: Counter):
        vec = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (ref_len - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(v * v for v in vec[k].values())) for k in range(n)]
        return vec, norms, sum(tf for g, tf in counts.items() if len(g) == 2)

    total = 0.0
    for test, refs in cooked:
        vec, norm, length = vector(test)
        score = [0.0] * n
        for ref in refs:
            vec_r, norm_r, length_r = vector(ref)
            for k in range(n):
                val = sum(min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, v in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                score[k] += val * math.exp(-((length - length_r) ** 2) / (2 * sigma ** 2))
        total += sum(score) / n / len(refs) * 10.0
    return total / len(cooked)


METRICS = {"exact": _best_of(exact_match), "f1": _best_of(token_f1), "vqa": vqa_accuracy, "gqa": gqa_accuracy,
           "cider": cider_d}

