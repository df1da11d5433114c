"""tools/embedded.py -- the embedded default: a tiny LLaVA and synthetic worlds, built here.

The stand-ins that let `python train.py --config config.yaml` run end to end with no download:
  * synthetic multimodal worlds, generated deterministically from a seed, no files needed. Two
    scenarios mirror the paper's two cross-task scenarios (SPEC section 1):
       A: three VQA-style tasks            colour, shape, count
       B: three mixed tasks                caption, grounding (position), vqa (colour)
    Several clients per task; each client has its own visual style (background tint, object
    sizes) and label prior; with `minority_phrasing` every odd-indexed client (clients 1, 3, ...)
    answers in its task's second phrasing, so personalisation matters; small train sets so
    collaboration matters; a held-out test split per client.
       D: real handwritten digits (scikit-learn's bundled 8 x 8 digits, an optional extra): one
    visual skill asked in three formats, digit ("7"), parity ("odd"), greater than four ("yes");
    the clients of a task hold IID, disjoint splits of the digits.
  * the embedded base (`model.llava: embedded`): a tiny CLIP + tiny Llama with a Llama-style
    tokenizer, pretrained here on synthetic captions, saved with save_pretrained and loaded
    through model.py's path (a) like any LLaVA checkpoint. Built once, cached under
    model.cache_dir.

A real run (config.real.yaml, config.paper.yaml) needs none of this: train.py hands off here only
when the config names the embedded base or a synthetic scenario. The core never imports this file.

    python tools/embedded.py --export DIR --scenario A    # a synthetic world as LLaVA JSON + manifest
    python tools/embedded.py --vocabulary                  # the words the embedded base was pretrained on
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # run as a script: the core modules sit in the folder above
    sys.path.insert(0, ROOT)

import data  # noqa: E402
import model  # noqa: E402
from data import IMAGE, ClientData, DataConfig, DataError, Sample  # noqa: E402

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
SCENARIOS = {"A": ("colour", "shape", "count"), "B": ("caption", "grounding", "vqa"),
             "D": ("digit", "parity", "greater")}
# scenario D: one question per task and its answer as a function of the digit
DIGIT_TASKS = {"digit": ("Which digit is this?", str),
               "parity": ("Is the digit odd or even?", lambda d: "odd" if d % 2 else "even"),
               "greater": ("Is the digit greater than four?", lambda d: "yes" if d > 4 else "no")}
# the label each task's clients skew their prior over
PRIOR_ON = {"colour": "colour", "shape": "shape", "count": "count", "caption": "shape",
            "grounding": "cell", "vqa": "colour"}
PRETRAIN_PROMPT = "Describe the image in detail."
REPEAT_PROMPT = "Repeat these words:"


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


def client_style(rng: random.Random, task: str, index: int, minority_phrasing: bool = True) -> ClientStyle:
    labels = {"colour": list(COLOURS), "shape": list(SHAPES), "count": ["1", "2", "3"],
              "cell": list(CELLS)}[PRIOR_ON[task]]
    tint = [rng.randint(0, 90) for _ in range(3)] if index % 2 == 0 else [rng.randint(150, 230)] * 3
    lo = rng.uniform(0.45, 0.7)
    return ClientStyle(tuple(tint), (lo, lo + 0.25), labels[index % len(labels)],
                       index % 2 if minority_phrasing else 0)


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
    return Sample(sid, image, [(f"{IMAGE}\n{question.format(**words)}", answers[style.phrasing].format(**words))],
                  f"synthetic sample {sid}")


def synthetic_clients(scenario: str, cfg: DataConfig, seed: int) -> list[ClientData]:
    """The clients of a synthetic scenario: `clients_per_task` per task, tasks in the order of
    SCENARIOS[scenario]. Deterministic in (scenario, cfg, seed), on any machine: every
    client draws from its own random.Random seeded by a string. Train, then test, then
    validation samples are drawn, so adding a validation split changes neither of the others."""
    if scenario not in SCENARIOS:
        raise DataError(f"data.scenario must be one of {sorted(SCENARIOS)} or 'manifest', got {scenario!r}")
    if scenario == "D":
        return digit_clients(cfg, seed)
    clients = []
    tr, te = cfg.train_per_client, cfg.test_per_client
    for task in SCENARIOS[scenario]:
        for i in range(cfg.clients_per_task):
            rng = random.Random(f"pilot-{seed}-{scenario}-{task}-{i}")
            style = client_style(rng, task, i, cfg.minority_phrasing)
            name = f"{task}{i}"
            n = tr + te + cfg.val_per_client
            s = [synthetic_sample(rng, task, style, cfg.image_size, f"{name}-{j}") for j in range(n)]
            clients.append(ClientData(name, task, s[:tr], s[tr:tr + te], "f1" if task == "caption" else "exact",
                                      val=s[tr + te:]))
    return clients


def digit_clients(cfg: DataConfig, seed: int) -> list[ClientData]:
    """Scenario D: scikit-learn's 1,797 real handwritten 8 x 8 digits (bundled with the package,
    no download), upscaled to image_size. One shuffled pool, cut into disjoint slices, one per
    client and split: no image is in two splits or two clients, and none was in the embedded
    base's pretraining (which draws only synthetic shapes)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data.scenario D needs scikit-learn's bundled digits: "
                        "pip install -r requirements-digits.txt") from None
    pixels, labels = load_digits(return_X_y=True)                           # (1797, 64) in 0..16, (1797,)
    tasks = SCENARIOS["D"]
    tr, te, va = cfg.train_per_client, cfg.test_per_client, cfg.val_per_client
    need = len(tasks) * cfg.clients_per_task * (tr + te + va)
    if need > len(labels):
        raise DataError(f"data: scenario D has {len(labels)} digits, but clients_per_task x 3 tasks x "
                        f"(train_per_client + test_per_client + val_per_client) = {need}")
    pool = random.Random(f"pilot-{seed}-D").sample(range(len(labels)), need)
    clients = []
    for t, task in enumerate(tasks):
        question, answer = DIGIT_TASKS[task]
        for i in range(cfg.clients_per_task):
            name = f"{task}{i}"
            first = (t * cfg.clients_per_task + i) * (tr + te + va)
            s = []
            for j, idx in enumerate(pool[first:first + tr + te + va]):
                grey = Image.frombytes("L", (8, 8), bytes(int(v * 255 / 16) for v in pixels[idx]))
                image = grey.resize((cfg.image_size, cfg.image_size), Image.NEAREST).convert("RGB")
                s.append(Sample(f"{name}-{j}", image, [(f"{IMAGE}\n{question}", answer(int(labels[idx])))],
                                f"digit {idx} of sklearn.datasets.load_digits"))
            clients.append(ClientData(name, task, s[:tr], s[tr:tr + te], val=s[tr + te:]))
    return clients


def pretrain_samples(n: int, size: int, seed: int) -> list[Sample]:
    """Detailed captions of random scenes in random styles, for the embedded base's central
    pretraining (standing in for LLaVA's caption pretraining): every attribute named."""
    rng = random.Random(f"pilot-pretrain-{seed}")
    vocab = vocabulary()
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
        if j % 4 == 3:   # a quarter: copy words, so that every word of the vocabulary is known
            words = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 4)))
            out[-1] = Sample(f"pretrain-{j}", image, [(f"{IMAGE}\n{REPEAT_PROMPT} {words}", words)])
    return out


def vocabulary() -> list[str]:
    """Every word the synthetic world and the conversation format can produce."""
    text = " ".join([" ".join(q for q, _ in TASKS.values()), " ".join(" ".join(a) for _, a in TASKS.values()),
                     " ".join(COLOURS), " ".join(SHAPES), " ".join(s + "s" for s in SHAPES),
                     " ".join(COUNT_WORDS), " ".join(CELLS), "1 2 3 and at", PRETRAIN_PROMPT, "USER: ASSISTANT:",
                     " ".join(q for q, _ in DIGIT_TASKS.values()), "0 1 2 3 4 5 6 7 8 9 odd even yes no",
                     REPEAT_PROMPT])
    text = re.sub(r"\{[a-z_]+\}", " ", text)
    return sorted(set(re.findall(r"\w+|[^\w\s]", text)))


# -----------------------------------------------------------------------------
# A synthetic world as LLaVA JSON files


def export_llava(clients: Sequence[ClientData], out_dir: str) -> str:
    """Write clients as LLaVA JSON + PNG images + manifest.yaml; returns the manifest path."""
    import yaml
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    manifest = []
    for c in clients:
        for split in ("train", "test"):
            records = []
            for s in getattr(c, split):
                conv = [m for h, g in s.turns for m in ({"from": "human", "value": h}, {"from": "gpt", "value": g})]
                image = {} if s.image is None else {"image": f"{s.id}.png"}   # text-only: no image key
                if image:
                    data.picture(s).save(os.path.join(out_dir, "images", image["image"]))
                refs = {"references": s.refs} if s.refs else {}
                records.append({"id": s.id, **image, "conversations": conv, **refs})
            with open(os.path.join(out_dir, f"{c.name}_{split}.json"), "w") as f:
                json.dump(records, f, indent=1)
        manifest.append({"name": c.name, "task": c.task, "train": f"{c.name}_train.json",
                         "test": f"{c.name}_test.json", "image_folder": "images", "metric": c.metric})
    path = os.path.join(out_dir, "manifest.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(manifest, f, sort_keys=False)
    return path


# -----------------------------------------------------------------------------
# The embedded default base: a tiny LLaVA, pretrained here on synthetic captions

EMBEDDED = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=4,
                llm_width=128, llm_layers=4, llm_heads=4, llm_mlp=256)


def tiny_llava_config(vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int = 1,
                      eos_token_id: int = 2, **sizes):
    """A LlavaConfig of a tiny CLIP + tiny Llama (used by the embedded base and the tests)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    s = {**EMBEDDED, **sizes}
    vc = CLIPVisionConfig(hidden_size=s["vision_width"], intermediate_size=2 * s["vision_width"],
                          num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                          image_size=s["image_size"], patch_size=s["patch_size"], projection_dim=s["vision_width"])
    tc = LlamaConfig(vocab_size=vocab_size, hidden_size=s["llm_width"], intermediate_size=s["llm_mlp"],
                     num_hidden_layers=s["llm_layers"], num_attention_heads=s["llm_heads"],
                     num_key_value_heads=s["llm_heads"], max_position_embeddings=512,
                     pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                     tie_word_embeddings=False)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token_id,
                       image_seq_length=(s["image_size"] // s["patch_size"]) ** 2,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")   # ids 0, 1, 2, as in Llama's and Vicuna's vocabulary


def llama_style_tokenizer(texts: list[str], learned: int = 400):
    """A tokenizer built the way transformers' LlamaConverter builds Llama's (non-legacy):
    a BPE with byte fallback (any text encodes: a character it never saw becomes its UTF-8
    bytes, <0x0A> for a newline), a Metaspace pre-tokenizer ("▁" for each space, one put
    before the text), `<s>` added in front, and the decoder that undoes all that. Ids as
    Llama's: <unk> 0, <s> 1, </s> 2, the 256 bytes <0x00>..<0xFF> 3-258, then the `learned`
    pieces that tokenizers' BpeTrainer (deterministic) learns from `texts`, then <pad> and
    <image> at the end, where llava-hf adds them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = metaspace
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=learned, special_tokens=["<unk>"], show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    pieces = [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t != "<unk>"]
    vocab = [*LLAMA_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<pad>", "<image>"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([*LLAMA_SPECIALS, "<pad>", "<image>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def embedded_tokenizer():
    """The embedded base's tokenizer: llama_style_tokenizer learned from the words of the
    synthetic world (vocabulary), the conversation format and LLaVA-1.5's system prompt.
    Every synthetic word is one piece; any other text still encodes, through the bytes."""
    return llama_style_tokenizer([" ".join(vocabulary()), "USER: ASSISTANT:", data.LLAVA_V1_SYSTEM])


def embedded_checkpoint(cfg: model.ModelConfig) -> str:
    """Path of the embedded base, built on first use (README: how long it takes)."""
    recipe = dict(EMBEDDED, steps=cfg.embedded_pretrain_steps, vocab=vocabulary(), tokenizer="llama-bpe-400",
                  version=3)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cfg.cache_dir, f"embedded-llava-{digest}")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_embedded(path, cfg.embedded_pretrain_steps)
    return path


def build_embedded(path: str, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 2e-3) -> None:
    """Build the tiny LLaVA, pretrain it centrally on synthetic captions (every weight trains:
    this stands in for CLIP's, Vicuna's and LLaVA's pretraining together), save it as a normal
    transformers LLaVA checkpoint. Written to a temp dir and renamed, so a crash leaves none.
    Deterministic: one thread during the build (a CPU matmul's sum order depends on the
    thread count), every draw from the CPU generator seeded here inside fork_rng (CUDA's RNG
    is never touched)."""
    if steps < 1:
        raise ValueError(f"model.embedded_pretrain_steps must be >= 1, got {steps}")
    import shutil
    import tempfile

    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration

    tok = embedded_tokenizer()
    size = EMBEDDED["image_size"]
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    config = tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id,
                               tok.bos_token_id, tok.eos_token_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)   # CPU only: transformers' init draws from it
            llava = LlavaForConditionalGeneration(config)
        loss = _pretrain(llava, tok, proc, config, steps, seed, batch_size, lr)
    finally:
        torch.set_num_threads(threads)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".building-")
    try:
        llava.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        proc.save_pretrained(tmp)
        with open(os.path.join(tmp, "pretraining.json"), "w") as f:
            json.dump(dict(steps=steps, seed=seed, batch_size=batch_size, lr=lr, final_loss=loss), f)
        if os.path.exists(path):
            shutil.rmtree(tmp)   # another process built it meanwhile
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pretrain(llava, tok, proc, config, steps: int, seed: int, batch_size: int, lr: float) -> float:
    """Central caption pretraining of the embedded base; returns the last step's loss."""
    size = EMBEDDED["image_size"]
    llava.train()
    enc = data.Encoder(tok, proc, config.image_token_id, config.image_seq_length)
    samples = pretrain_samples(4096, size, seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(llava.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    for step in range(steps):
        idx = torch.randint(len(samples), (batch_size,), generator=g).tolist()
        batch = enc.collate([samples[i] for i in idx])
        loss = llava(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llava.parameters(), 1.0)
        opt.step()
        sched.step()
    llava.eval()
    return loss.item()


# -----------------------------------------------------------------------------
# The embedded base as a model.Loader (train.base_loader hands `model.llava: embedded` here)


def _text_side(cfg: model.ModelConfig):
    tok = embedded_tokenizer()
    return tok, tok.convert_tokens_to_ids("<image>"), (EMBEDDED["image_size"] // EMBEDDED["patch_size"]) ** 2


def _config(cfg: model.ModelConfig):
    tok = embedded_tokenizer()
    return tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id), "embedded recipe"


LOADER = model.Loader(lambda c: model.load_llava(embedded_checkpoint(c), model.DTYPES[c.dtype], c.device),
                      _text_side, _config)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Export a synthetic scenario as LLaVA JSON, or list the words the embedded base was pretrained on.")
    ap.add_argument("--export", metavar="DIR", help="write the scenario as LLaVA JSON + images + manifest.yaml")
    ap.add_argument("--scenario", default="A", choices=sorted(SCENARIOS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocabulary", action="store_true", help="print the words the embedded base was pretrained on (it encodes any text)")
    args = ap.parse_args()
    if args.vocabulary:
        print(" ".join(vocabulary()))
    elif args.export:
        print(export_llava(synthetic_clients(args.scenario, DataConfig(scenario=args.scenario), args.seed), args.export))
    else:
        sys.exit("nothing to do: give --export DIR or --vocabulary")
