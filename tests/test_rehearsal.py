"""The real run, rehearsed: config.real.yaml and config.paper.yaml on tiny checkpoints laid out
file for file as the hub repos they name (tests/hub_layouts.py: CLIP-336's old config keys,
Vicuna's sharded 4.31-era .bin with a SentencePiece tokenizer.model and no tokenizer.json, the
pretrain projector's mm_projector.bin in bf16, llava-hf's first published layout), offline:
a stage-1 and a stage-2 round, scoring, --resume, --ask and --score, on a few non-square JPEGs
and a text-only record. Also: the converted tokenizer equals SentencePiece's own and gives
LLaVA-1.5's preprocess_v1 tokens; a checkpoint's generation_config changes neither the answers
nor the log; a missing piece of the environment is one line saying what to install."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

import data
import hub_layouts
import model
import train
from data import LLAVA_V1_SYSTEM
from data import Encoder
from test_llava_format import IMG_ID, N_IMG, RECORDS, _sample, llava_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP, VICUNA = "openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5"
PROJECTOR, LLAVA_HF = "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5", "llava-hf/llava-1.5-7b-hf"
# what transformers prints when a checkpoint's files meet it badly: none of it may reach the log
NOISE = ("max_length", "generation flags", "LOAD REPORT", "UNEXPECTED", "tiktoken", "Traceback")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return hub_layouts.write_all(str(tmp_path_factory.mktemp("hub")))


def _jpeg(path, size, colour):
    Image.new("RGB", size, colour).save(path, quality=90)


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """Two tasks, one client each, as LLaVA JSON: tall and wide JPEGs and a text-only record."""
    root = tmp_path_factory.mktemp("records")
    os.makedirs(root / "images")
    sizes = [(40, 24), (24, 40), (33, 50), (50, 31), (36, 20), (20, 36)]
    colours = ["red", "green", "blue", "red", "green", "blue"]
    for i, (size, colour) in enumerate(zip(sizes, colours)):
        _jpeg(root / "images" / f"{i}.jpg", size, colour)

    def rec(i, question, answer):
        return {"id": f"r{i}", "image": f"{i}.jpg",
                "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}
    text_only = {"id": "t0", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]}
    files = {"vqa_train": [rec(i, "What colour is the picture?", colours[i]) for i in range(3)] + [text_only],
             "vqa_test": [rec(3, "What colour is the picture?", "red"), dict(text_only, id="t1")],
             "caption_train": [rec(i, "Provide a one-sentence caption for the provided image.", f"a {colours[i]} picture")
                               for i in range(3, 6)],
             "caption_test": [rec(0, "Provide a one-sentence caption for the provided image.", "a red picture")]}
    for name, records in files.items():
        (root / f"{name}.json").write_text(json.dumps(records))
    manifest = [{"name": "vqa0", "task": "vqa", "train": "vqa_train.json", "test": "vqa_test.json",
                 "image_folder": "images", "metric": "exact"},
                {"name": "caption0", "task": "caption", "train": "caption_train.json", "test": "caption_test.json",
                 "image_folder": "images", "metric": "cider"}]
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return root


def _config(tmp_path, source: str, hub: dict, manifest, layout: str, **fed) -> str:
    """`source` (config.real.yaml or config.paper.yaml) as a user points it at the downloaded
    repos, at test size and on the CPU; everything else as the file has it."""
    raw = yaml.safe_load(open(os.path.join(ROOT, source)))
    if layout == "pair":
        raw["model"].update(llava=None, vision=hub[CLIP], llm=hub[VICUNA],
                            projector=os.path.join(hub[PROJECTOR], "mm_projector.bin"))
    else:
        raw["model"].update(llava=hub[LLAVA_HF], vision=None, llm=None, projector=None)
    raw["model"].update(dtype="float32", device="cpu", lora_r=2, lora_alpha=4.0)
    raw["run_dir"] = str(tmp_path / "run")
    raw["data"].update(manifest=str(manifest), num_workers=0, max_new_tokens=4)
    raw["fed"].update(dict(stage1_rounds=1, stage2_rounds=1, batch_size=2, grad_accum=1, eval_batch_size=4), **fed)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _use(config, clients, name="vqa0"):
    """--resume (nothing left to run: the last round's states scored again), --ask about a picture
    and without one, --score on a LLaVA JSON file: each reads the run's last checkpoint."""
    first = json.load(open(os.path.join(yaml.safe_load(open(config))["run_dir"], "results.json")))
    resumed = train.main(["--config", config, "--resume"])
    assert resumed["after_local"]["own"] == first["after_local"]["own"] and len(resumed["rounds"]) == len(first["rounds"]) == 2
    picture = train.main(["--config", config, "--ask", name, "--image", str(clients / "images" / "1.jpg"),
                          "--prompt", "What colour is the picture?"])
    text = train.main(["--config", config, "--ask", name, "--prompt", "Say yes."])
    assert isinstance(picture["answer"], str) and isinstance(text["answer"], str)
    scored = train.main(["--config", config, "--score", name, "--data", str(clients / "vqa_test.json"),
                         "--images", str(clients / "images")])
    assert (scored["records"], scored["round"], scored["metric"]) == (2, 2, "exact") and 0 <= scored["score"] <= 1


def test_config_real_on_clip_vicuna_and_the_projector_offline(tmp_path, hub, clients):
    """The documented command, as a user runs it: a fresh process, no network, an empty HF cache."""
    config = _config(tmp_path, "config.real.yaml", hub, clients / "manifest.yaml", "pair")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, "train.py", "--config", config], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not [line for line in out.stderr.splitlines() if any(n in line for n in NOISE)], out.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["stage"] for r in log] == [1, 2]
    # what --dry-run said the run would do is what it did: the logged steps; answers by hand
    # (2 points x 3 test records a round; at the end 3 cross-task answers and 3 on the full splits)
    report = train.main(["--config", config, "--dry-run"])["dry_run"]
    steps = [sum(c["steps"] for c in r["losses"].values()) for r in log]
    assert steps[0] == steps[1] > 0 and f"local training per round: {steps[0]:,} optimiser steps" in report
    assert "scoring per round: 6 answers of at most 4 tokens" in report
    assert f"whole run, 2 rounds: {2 * steps[0]:,} optimiser steps, 18 answers (6 of them in the final scoring)" in report
    _use(config, clients)


def test_config_real_on_the_llava_hf_layout(tmp_path, hub, clients, capfd):
    config = _config(tmp_path, "config.real.yaml", hub, clients / "manifest.yaml", "llava_hf")
    result = train.main(["--config", config])
    assert len(result["rounds"]) == 2 and set(result["after_local"]["own"]) == {"vqa0", "caption0"}
    _use(config, clients)
    err = capfd.readouterr().err
    assert not [line for line in err.splitlines() if any(n in line for n in NOISE)], err[-3000:]


def test_both_layouts_hold_the_same_model(hub):
    """llava-hf's files are the three others' weights under its names: both loading paths give
    the same logits on the same input (the padded vocabulary rows aside)."""
    import torch
    pair = model.load_pair(hub[CLIP], hub[VICUNA], os.path.join(hub[PROJECTOR], "mm_projector.bin"))
    full = model.load_llava(hub[LLAVA_HF], torch.float32)
    assert (pair.image_token_id, full.image_token_id, full.tokenizer.pad_token_id) == (400, 400, 401)
    out = []
    for base in (pair, full):
        m = model.build_model(base, model.build_connector("plain", base), model.ModelConfig(lora_r=2)).eval()
        enc = Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens, LLAVA_V1_SYSTEM)
        s = data.Sample("a", Image.new("RGB", (40, 24), "red"), [("<image>\nWhat colour is it?", "red")])
        batch = enc.collate([s])
        with torch.no_grad():
            out.append(m(**batch).logits[..., :400])
    # llava-hf ships fp16 weights, Vicuna's shards too: the same numbers once cast
    torch.testing.assert_close(out[0], out[1], rtol=2e-3, atol=2e-3)


def test_config_paper_on_tools_pilot_data_output(tmp_path, hub):
    """config.paper.yaml on what tools/pilot_data.py writes from GQA, OCR-VQA and COCO files in
    their released formats (tests/test_prepare.py's stand-ins), each task its metric."""
    import test_prepare
    import pilot_data
    gqa, gqa_images = test_prepare._gqa(tmp_path, 12)
    ocr, ocr_images = test_prepare._ocrvqa(tmp_path, 6)
    coco, coco_images = test_prepare._coco(tmp_path, 6)
    manifest = pilot_data.main(["--out", str(tmp_path / "pilot"), "--clients-per-task", "1", "--train-per-client", "2",
                                "--test-per-client", "1", "--gqa", gqa, "--gqa-images", gqa_images, "--ocrvqa", ocr,
                                "--ocrvqa-images", ocr_images, "--coco-captions", coco, "--coco-images", coco_images])
    config = _config(tmp_path, "config.paper.yaml", hub, manifest, "pair")
    result = train.main(["--config", config])
    assert len(result["rounds"]) == 2
    assert [json.loads(line)["stage"] for line in open(tmp_path / "run" / "log.jsonl")] == [1, 2]
    assert json.load(open(tmp_path / "run" / "run.json"))["identity"]["clients"][2][-1] == "cider"


# -----------------------------------------------------------------------------
# The tokenizer transformers converts from Vicuna's tokenizer.model


TEXTS = ["USER: <image>\nWhat is the title of this book? ASSISTANT: Cat Tales</s>", "Who wrote it?  Two  spaces",
         "\u00e9t\u00e9 \u2603 1234567 a.b,c", "line one\nline two\n\ntrailing "]
# (A text that starts with a space is the one place they part: SentencePiece keeps both "▁",
# transformers' converted tokenizer one. LLaVA's prompts never start with a space.)


def test_the_converted_tokenizer_is_sentencepieces_own(hub):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(hub[VICUNA], "tokenizer.model"))
    tok = model.load_tokenizer(hub[VICUNA])
    assert not os.path.exists(os.path.join(hub[VICUNA], "tokenizer.json"))   # the conversion path was taken
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (1, 2, 0, 400)
    for text in TEXTS:
        plain = text.replace("<image>", "").replace("</s>", "")
        assert tok(plain, add_special_tokens=False).input_ids == sp.encode(plain), plain
        assert tok(plain).input_ids[0] == 1
        assert tok.decode(tok(plain).input_ids, skip_special_tokens=True) == sp.decode(sp.encode(plain))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("name", sorted(RECORDS))
def test_encoder_gives_preprocess_v1_tokens_with_the_sentencepiece_tokenizer(tmp_path, hub, legacy, name):
    folder = tmp_path / "vicuna"
    os.makedirs(folder)
    for f in ("tokenizer.model", "special_tokens_map.json"):
        (folder / f).write_bytes(open(os.path.join(hub[VICUNA], f), "rb").read())
    cfg = json.load(open(os.path.join(hub[VICUNA], "tokenizer_config.json")))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(cfg, legacy=legacy)))
    tok = model.pair_tokenizer(str(folder))
    s = _sample(tmp_path, name, RECORDS[name])
    enc = Encoder(tok, None, IMG_ID, N_IMG, system_prompt=LLAVA_V1_SYSTEM)
    assert enc.encode(s) == llava_reference(tok, LLAVA_V1_SYSTEM, RECORDS[name])[:2]
    assert enc.encode_prompt(s) == llava_reference(tok, LLAVA_V1_SYSTEM, RECORDS[name], generation=True)[0]


def test_without_sentencepiece_the_error_says_what_to_install(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)             # import sentencepiece -> ImportError
    with pytest.raises(model.CheckpointError) as e:
        model.load_tokenizer(hub[VICUNA])
    assert str(e.value) == (f"{hub[VICUNA]}: its tokenizer is a SentencePiece tokenizer.model, which transformers "
                            "converts on load, and the sentencepiece package is not installed; run: "
                            "pip install 'sentencepiece>=0.2.0,<0.2.3' 'protobuf>=3.20'")


def test_a_protobuf_module_that_does_not_load_is_named(hub, monkeypatch):
    """sentencepiece 0.2.3 beside Flower's protobuf < 7: its generated module raises on import."""
    import sentencepiece
    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)
    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)   # its import raises
    problem = model.sentencepiece_problem()
    assert problem.startswith("sentencepiece ") and "protobuf module does not load with protobuf" in problem
    with pytest.raises(model.CheckpointError, match=r"run: pip install 'sentencepiece>=0.2.0,<0.2.3'"):
        model.load_tokenizer(hub[VICUNA])


def test_the_cli_prints_that_error_as_one_line(tmp_path, hub, clients, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    config = _config(tmp_path, "config.real.yaml", hub, clients / "manifest.yaml", "pair")
    with pytest.raises(SystemExit) as e:
        train.cli(["--config", config])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {hub[VICUNA]}: its tokenizer is")


def test_a_checkpoint_missing_weights_is_an_error_naming_them(tmp_path, hub):
    import torch
    folder = tmp_path / "clip"
    os.makedirs(folder)
    for f in ("config.json", "preprocessor_config.json"):
        (folder / f).write_bytes(open(os.path.join(hub[CLIP], f), "rb").read())
    state = torch.load(os.path.join(hub[CLIP], "pytorch_model.bin"), weights_only=True)
    del state["vision_model.post_layernorm.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    from transformers import CLIPVisionModel
    with pytest.raises(model.CheckpointError, match=r"1 weights of CLIPVisionModel are not in the checkpoint "
                                                    r"\(post_layernorm.weight\)"):
        model.from_pretrained(CLIPVisionModel, str(folder), torch.float32, "cpu")


# -----------------------------------------------------------------------------
# Decoding is the project's: a checkpoint's generation_config changes nothing


def test_vicunas_generation_config_changes_no_answer_and_prints_nothing(hub, capfd):
    import torch
    from transformers import GenerationConfig
    base = model.load_pair(hub[CLIP], hub[VICUNA], os.path.join(hub[PROJECTOR], "mm_projector.bin"))
    m = model.build_model(base, model.build_connector("stage1", base), model.ModelConfig(lora_r=2)).eval()
    enc = Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens, LLAVA_V1_SYSTEM)
    samples = [data.Sample(f"s{i}", Image.new("RGB", (30 + 7 * i, 20), c), [("<image>\nWhat colour is it?", c)])
               for i, c in enumerate(["red", "green", "blue"])] + [data.Sample("t", None, [("Say yes.", "yes")])]
    batch = enc.collate_prompts(samples)
    kw = dict(max_new_tokens=6, eos_token_id=2, pad_token_id=base.tokenizer.pad_token_id)
    capfd.readouterr()
    # what the checkpoint says (a sampling config with max_length 4096), put back on the LM ...
    m.lm.generation_config = GenerationConfig.from_pretrained(hub[VICUNA])
    assert (m.lm.generation_config.max_length, m.lm.generation_config.top_p) == (4096, 0.6)
    with_file = m.generate(**batch, **kw)
    m.lm.generation_config.repetition_penalty = 5.0        # ... even one that would change greedy decoding
    with_penalty = m.generate(**batch, **kw)
    m.lm.generation_config = GenerationConfig()
    without = m.generate(**batch, **kw)
    # the slow reference: greedy by hand, one token at a time, no generate() at all
    emb, _ = m.embed(batch["input_ids"], batch.get("pixel_values"))
    mask = batch["attention_mask"]
    by_hand = [[] for _ in samples]
    done = [False] * len(samples)
    with torch.no_grad():
        for _ in range(6):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            nxt = m.lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                done[i] = done[i] or t == 2
                if not done[i]:
                    by_hand[i].append(t)
            emb = torch.cat([emb, m.lm.get_input_embeddings()(nxt)[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(len(samples), 1)], 1)
    assert with_file == with_penalty == without == by_hand
    err = capfd.readouterr().err
    assert "max_length" not in err and "generation flags" not in err, err
