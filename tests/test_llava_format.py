"""LLaVA-1.5's own inputs (SPEC 5c): data.Encoder against a reference written from LLaVA's
preprocessing (haotian-liu/LLaVA conv_vicuna_v1, preprocess_multimodal, preprocess_v1,
tokenizer_image_token, expand2square), with a Llama-style tokenizer built here; padded
pictures; text-only records through loading, training and scoring."""

import json

import pytest
import torch
from PIL import Image

import data
import model
import pilot
from data import IGNORE, IMAGE, LLAVA_V1_SYSTEM, Sample
from data import Encoder
from tools import embedded

N_IMG = 4          # image tokens per picture in these tests
IMG_ID = 10_000    # any id the tokenizer does not use


@pytest.fixture(scope="module")
def llama_tok():
    """A stand-in for Vicuna's tokenizer, made the way transformers converts Llama's: a BPE with
    byte fallback (the newline is <0x0A>), Metaspace ("▁", prepended to the first word only),
    <s> in front; trained on a few sentences, so most words split into several pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    sentences = ["USER: ASSISTANT: What is the title of this book? Who wrote this book?",
                 "A chat between a curious user and an artificial intelligence assistant.",
                 "Answer the question using a single word or phrase. The cat sat on the mat."]
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]   # in the model's vocabulary, ids 3-258 as in Llama's
    core.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                                            show_progress=False))
    spec = json.loads(core.to_str())  # ordinary pieces, not special ones: a decoded newline must survive
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in bytes_]
    core = Tokenizer.from_str(json.dumps(spec))
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


# -----------------------------------------------------------------------------
# The reference: LLaVA-1.5's preprocessing, transcribed from SPEC 5c


def llava_ids(tok, prompt: str) -> list[int]:
    """tokenizer_image_token: chunks around <image> each tokenised with BOS, BOS kept once;
    one IMAGE_TOKEN_INDEX (-200) per image, as LLaVA writes it."""
    chunks = [tok(c).input_ids for c in prompt.split(IMAGE)]
    offset = 1 if chunks[0][:1] == [tok.bos_token_id] else 0
    ids = list(chunks[0])
    for c in chunks[1:]:
        ids += [-200] + c[offset:]
    return ids


def llava_reference(tok, system: str, record: dict, generation: bool = False) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, prompt text) as LLaVA-1.5 trains on `record`, the image expanded to
    N_IMG copies of IMG_ID. Labels from SPEC 5c's rule (every answer token and its </s>), found
    by tokenising prefixes of the text: Metaspace splits at spaces and </s> is special, so the
    prefix up to an answer tokenises as the text's first tokens do. generation: the first
    human turn and an empty assistant message, as LLaVA's eval builds its prompt."""
    conv = [dict(t) for t in record["conversations"]]
    if "image" in record:                                     # preprocess_multimodal
        for t in conv:
            if IMAGE in t["value"]:
                t["value"] = (IMAGE + "\n" + t["value"].replace(IMAGE, "").strip()).strip()
    if conv[0]["from"] != "human":                            # preprocess_v1: skip a first gpt turn
        conv = conv[1:]
    if generation:
        conv = conv[:1] + [{"from": "gpt", "value": None}]
    prompt, bounds = system + " ", []                         # conv_vicuna_v1.get_prompt, sep " ", sep2 "</s>"
    for i, t in enumerate(conv):
        if t["value"] is None:
            prompt += "ASSISTANT:"
            break
        prompt += ("USER" if t["from"] == "human" else "ASSISTANT") + ": "
        if t["from"] == "gpt":
            bounds.append(len(prompt) - 1)                    # the answer's span starts at the space
        prompt += t["value"] + (" ", "</s>")[i % 2]
        if t["from"] == "gpt":
            bounds.append(len(prompt))
    ids = llava_ids(tok, prompt)
    labels = [IGNORE] * len(ids)
    for a, b in zip(bounds[::2], bounds[1::2]):
        lo, hi = len(llava_ids(tok, prompt[:a])), len(llava_ids(tok, prompt[:b]))
        labels[lo:hi] = ids[lo:hi]
    return expand(ids, IMG_ID, ids), expand(labels, IGNORE, ids), prompt


def expand(seq: list[int], fill: int, ids: list[int]) -> list[int]:
    """seq with each image position of `ids` (-200) widened to N_IMG copies of `fill`."""
    return [x for i, v in zip(ids, seq) for x in ([fill] * N_IMG if i == -200 else [v])]


def llava_v1_arithmetic_labels(tok, prompt: str, ids: list[int]) -> list[int]:
    """preprocess_v1's own label masking, by lengths (for a single turn, where it holds)."""
    target, cur, sep = list(ids), 1, " ASSISTANT: "
    target[0] = IGNORE
    for rou in prompt.split("</s>"):
        parts = rou.split(sep)
        if rou == "" or len(parts) != 2:
            break
        round_len, instruction_len = len(llava_ids(tok, rou)), len(llava_ids(tok, parts[0] + sep)) - 2
        target[cur:cur + instruction_len] = [IGNORE] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE] * (len(target) - cur)
    assert cur == len(ids), "LLaVA's tokenization mismatch check"
    return target


def _turns(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


RECORDS = {
    "single turn": {"image": "a.png", "conversations": _turns("<image>\nWhat is the title of this book?", "Cat Tales")},
    "several turns": {"image": "a.png", "conversations": _turns("<image>\nWho wrote this book?", "Ann Lee",
                                                                "What is the title?", "The Mat", "Is it new?", "no")},
    "image after the text": {"image": "a.png", "conversations": _turns("Who wrote this book?\n<image>", "Ann Lee")},
    "text only": {"conversations": _turns("What is the title of this book?", "Cat Tales", "Who wrote it?", "Ann")},
    "first turn from gpt": {"conversations": [{"from": "gpt", "value": "Hello."}] + _turns("Who wrote it?", "Ann")},
}


def _sample(tmp_path, name, record):
    Image.new("RGB", (3, 5)).save(tmp_path / "a.png")
    path = tmp_path / f"{name.replace(' ', '_')}.json"
    path.write_text(json.dumps([record]))
    return data.load_llava_json(str(path), str(tmp_path))[0]


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_encoder_gives_llava_15s_input_ids_and_labels(tmp_path, llama_tok, name):
    s = _sample(tmp_path, name, RECORDS[name])
    enc = Encoder(llama_tok, None, IMG_ID, N_IMG, system_prompt=LLAVA_V1_SYSTEM)
    ids, labels, prompt = llava_reference(llama_tok, LLAVA_V1_SYSTEM, RECORDS[name])
    assert enc.encode(s) == (ids, labels)
    assert enc.lengths([s, s], chunk=1) == [len(ids)] * 2
    assert sum(i == IMG_ID for i in ids) == (N_IMG if "image" in RECORDS[name] else 0)
    # the generation prompt is the same text up to the first "ASSISTANT:"
    assert enc.encode_prompt(s) == llava_reference(llama_tok, LLAVA_V1_SYSTEM, RECORDS[name], generation=True)[0]
    # where LLaVA's own length arithmetic holds (one turn), its labels are the same
    if prompt.count("</s>") == 1 and "image" in RECORDS[name]:
        raw = llava_ids(llama_tok, prompt)
        assert expand(llava_v1_arithmetic_labels(llama_tok, prompt, raw), IGNORE, raw) == labels


def test_the_token_picture_around_the_image_and_between_turns(tmp_path, llama_tok):
    s = _sample(tmp_path, "several turns", RECORDS["several turns"])
    pieces = llama_tok.convert_ids_to_tokens(Encoder(llama_tok, None, llama_tok.unk_token_id, 1,
                                                     system_prompt=LLAVA_V1_SYSTEM).encode(s)[0])
    at = pieces.index("<unk>")                                   # the one image token
    assert pieces[0] == "<s>" and pieces.count("<s>") == 1
    assert pieces[at - 1] == "\u2581" and pieces[at + 1:at + 3] == ["\u2581", "<0x0A>"]
    assert "".join(pieces[at - 4:at - 1]).endswith("USER:")
    turn = pieces.index("</s>")
    assert "".join(pieces[turn + 1:turn + 4]).startswith("USER:") and not pieces[turn + 1].startswith("\u2581")


def test_the_embedded_base_speaks_the_same_format():
    tok = embedded.embedded_tokenizer()
    img = tok.convert_tokens_to_ids("<image>")
    record = {"image": "a.png", "conversations": _turns("How many shapes are there?\n<image>", "three",
                                                        "What colour are the shapes?", "red")}
    s = Sample("x", "a.png", [(t["value"], g["value"]) for t, g in zip(record["conversations"][::2],
                                                                        record["conversations"][1::2])])
    for system in (LLAVA_V1_SYSTEM, "Describe the image briefly."):
        ids, labels, _ = llava_reference(tok, system, record)
        assert Encoder(tok, None, IMG_ID, N_IMG, system_prompt=system).encode(s) == (ids, labels)
    # [choice] no system prompt: the text starts at "USER:" (not LLaVA's " USER:")
    enc = Encoder(tok, None, img, 1)
    assert enc.text(s)[0].startswith("USER: <image>\nHow many shapes are there? ASSISTANT: three</s>USER:")
    assert tok.convert_ids_to_tokens(enc.encode(s)[0][:5]) == ["<s>", "\u2581USER:", "\u2581", "<image>", "\u2581"]


# -----------------------------------------------------------------------------
# Records: what loads, what stays an error


def test_records_of_llava_15s_mix_load_as_llava_reads_them(tmp_path):
    s = _sample(tmp_path, "first turn from gpt", RECORDS["first turn from gpt"])
    assert s.image is None and s.turns == [("Who wrote it?", "Ann")]
    s = _sample(tmp_path, "image after the text", RECORDS["image after the text"])
    assert s.image.endswith("a.png")
    assert Encoder(embedded.embedded_tokenizer(), None, 0, 1).text(s)[0].startswith("USER: <image>\nWho wrote this book?")
    bad = {"two placeholders": ({"image": "a.png", "conversations": _turns("<image> <image>", "x")}, "found 2"),
           "in a later turn": ({"image": "a.png", "conversations": _turns("Hi", "x", "<image>", "y")}, "found 1"),
           "no image, a placeholder": ({"conversations": _turns("<image> Hi", "x")}, "has no 'image' but 1"),
           "gpt only": ({"conversations": [{"from": "gpt", "value": "x"}]}, r"0 turns after its first \(gpt\) turn")}
    for name, (record, why) in bad.items():
        with pytest.raises(data.DataError, match=rf"\.json: record 0: .*{why}"):
            _sample(tmp_path, name, record)


# -----------------------------------------------------------------------------
# Pictures: padded to a square in the processor's mean colour, then the processor


def _processor(side):
    from transformers import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


@pytest.mark.parametrize("size", [(6, 10), (10, 4)])          # tall, wide
def test_pictures_are_padded_to_a_square_in_the_mean_colour(size):
    proc = _processor(max(size))                              # no resize: the square is the crop
    w, h = size
    pic = Image.new("RGB", size, (200, 30, 90))
    got = Encoder(None, proc, 0, 1).pixels([pic])[0]          # (3, side, side)
    side = max(size)
    fill = torch.tensor([int(m * 255) for m in proc.image_mean], dtype=torch.float32)
    square = fill[:, None, None].repeat(1, side, side)       # hand computation of expand2square
    x0, y0 = (side - w) // 2, (side - h) // 2
    square[:, y0:y0 + h, x0:x0 + w] = torch.tensor([200.0, 30.0, 90.0])[:, None, None]
    mean, std = torch.tensor(proc.image_mean)[:, None, None], torch.tensor(proc.image_std)[:, None, None]
    torch.testing.assert_close(got, (square / 255 - mean) / std, atol=1e-5, rtol=0)
    cropped = Encoder(None, proc, 0, 1, image_aspect_ratio="crop").pixels([pic])[0]
    assert cropped.shape == got.shape and not torch.allclose(cropped, got)   # "crop" leaves it to the processor


def test_a_processor_that_pads_itself_is_not_padded_before():
    from transformers import LlavaImageProcessorPil
    seen = []

    class Spy(LlavaImageProcessorPil):
        def __call__(self, images, **kw):
            seen.extend(im.size for im in images)
            return super().__call__(images, **kw)

    proc = Spy(do_pad=True, size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    pic = Image.new("RGB", (4, 8), (10, 250, 10))
    got = Encoder(None, proc, 0, 1).pixels([pic])
    assert seen == [(4, 8)]                                    # the processor got the picture as it is
    torch.testing.assert_close(got, Encoder(None, _processor(8), 0, 1).pixels([pic]), atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# Text-only records train (LoRA only) and score, alone or mixed with pictures


def _stage2_model(tiny_llava_dir):
    base = model.load_llava(tiny_llava_dir)
    conn = pilot.Stage2Connector(base.vision_width, base.llm_width, 3, generator=torch.Generator().manual_seed(0))
    return base, model.build_model(base, conn, model.ModelConfig(lora_r=4), torch.Generator().manual_seed(1))


def test_a_mixed_batch_equals_its_samples_one_by_one(tiny_llava_dir):
    base, m = _stage2_model(tiny_llava_dir)
    m.eval()
    with torch.no_grad():
        for p in pilot.lora_state_dict(m.lm).values():
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    enc = Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens)
    pics = embedded.synthetic_clients("A", data.DataConfig(clients_per_task=1, train_per_client=2, test_per_client=1), 0)
    a, b = pics[0].train
    text = Sample("t", None, [("What colour are the shapes?", "red")])
    batch = enc.collate([a, text, b])
    assert batch["pixel_values"].shape[0] == 2               # one picture per sample that has one
    with torch.no_grad():
        out = m(**batch)
        alone = {k: m(**enc.collate([s])) for k, s in (("a", a), ("t", text), ("b", b))}
        images = m(**enc.collate([a, b]))
    for row, k in enumerate("atb"):
        n = int(batch["attention_mask"][row].sum())
        torch.testing.assert_close(out.logits[row, :n], alone[k].logits[0, :n], atol=1e-5, rtol=1e-5)
    assert "pixel_values" not in enc.collate([text]) and all(v == 0 for v in alone["t"].aux.values())
    for key in ("balance", "router_z"):                       # the CT-MoA's losses count image tokens only
        torch.testing.assert_close(out.aux[key], images.aux[key])


def test_a_text_only_batch_trains_lora_alone_and_scores(tiny_llava_dir):
    base, m = _stage2_model(tiny_llava_dir)
    enc = Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens)
    samples = [Sample(f"t{i}", None, [("Who wrote this book?", "Ann Lee")]) for i in range(3)]
    m.train()
    out = m(**enc.collate(samples))
    out.ce.backward()
    assert all(p.grad is None for p in m.connector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.lm.named_parameters() if pilot.is_lora(n))
    score = model.evaluate(m, enc, samples, "exact", batch_size=2, max_new_tokens=3)
    assert 0.0 <= score <= 1.0


# -----------------------------------------------------------------------------
# config.real.yaml: where the released scripts start


def test_config_real_loads_and_its_dry_run_runs_offline(tmp_path):
    import os
    import subprocess
    import sys

    import train
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = train.load_config(os.path.join(root, "config.real.yaml"), [])
    assert (cfg.model.llava, cfg.model.vision, cfg.model.llm) == (None, "openai/clip-vit-large-patch14-336",
                                                                   "lmsys/vicuna-7b-v1.5")
    assert cfg.model.projector.endswith("llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin")
    assert cfg.data.system_prompt == LLAVA_V1_SYSTEM and cfg.data.image_aspect_ratio == "pad"
    assert (cfg.fed.lr_lora_stage1, cfg.fed.lr_lora_stage2, cfg.fed.lr_connector) == (2e-5, 4e-5, 2e-5)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))   # an empty cache: nothing to read
    out = subprocess.run([sys.executable, "train.py", "--config", "config.real.yaml", "--dry-run"], cwd=root,
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "built-in LLaVA-1.5-7B shape" in out.stdout and "pilot stage 2" in out.stdout
