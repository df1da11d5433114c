"""Inputs are checked before any model loads: image paths stay inside their folder, images are
read as the pictures they are, over-long samples and unknown words are named at load time,
names that become files are checked, manifests reject unknown keys; scenario D's real digits."""

import importlib.util
import json
import os
import sys

import pytest
from PIL import Image

import data
import train
from data import DataConfig, DataError
from test_train import ROOT
from tools import embedded


def _folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(images / "a.png")
    return images


def _rec(image="a.png", answer="red", question="What colour?"):
    return {"id": "r1", "image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                          {"from": "gpt", "value": answer}]}


# -----------------------------------------------------------------------------
# Paths stay inside the image folder


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "link.png", "sub/../../outside.png"])
def test_an_image_path_out_of_its_folder_is_refused(tmp_path, name):
    images = _folder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", images / "link.png")          # a symlink that leads out
    path = tmp_path / "c.json"
    path.write_text(json.dumps([_rec(), _rec(image=name)]))
    with pytest.raises(DataError, match=r"c.json: record 1 \(id 'r1'\): image .* lies outside the image folder"):
        data.load_llava_json(str(path), str(images))


def test_a_symlink_inside_the_folder_is_fine(tmp_path):
    images = _folder(tmp_path)
    os.symlink(images / "a.png", images / "b.png")
    path = tmp_path / "c.json"
    path.write_text(json.dumps([_rec(image="b.png")]))
    assert data.picture(data.load_llava_json(str(path), str(images))[0]).getpixel((0, 0)) == (1, 2, 3)


# -----------------------------------------------------------------------------
# Images are read as what they are


def _read(tmp_path, im, name="x.png", max_side=1024):
    im.save(tmp_path / name)
    return data.read_image(str(tmp_path / name), max_side)


def test_image_modes_become_the_right_rgb_picture(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))                  # fully transparent
    assert _read(tmp_path, rgba).getpixel((0, 0)) == (255, 255, 255)  # on white, not black
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert _read(tmp_path, half).getpixel((0, 0)) == (127, 127, 127)
    la = Image.new("LA", (4, 4), (0, 0))
    assert _read(tmp_path, la).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([200, 100, 50] + [0] * 765)
    assert _read(tmp_path, p).getpixel((0, 0)) == (200, 100, 50)
    p.info["transparency"] = 0
    assert _read(tmp_path, p).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (4, 4), 65535)                            # 16-bit white
    assert _read(tmp_path, deep).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (4, 4), 32896)                            # 16-bit mid grey
    assert _read(tmp_path, deep).getpixel((0, 0)) == (128, 128, 128)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))                 # pure red in CMYK
    assert _read(tmp_path, cmyk, "x.jpg").getpixel((0, 0))[0] > 200
    grey = Image.new("L", (4, 4), 77)
    assert _read(tmp_path, grey).getpixel((0, 0)) == (77, 77, 77)


def test_float_images_outside_any_8_bit_reading_are_refused_with_the_reason(tmp_path):
    f = Image.new("F", (4, 4), -3.0)
    f.save(tmp_path / "x.tiff")
    with pytest.raises(ValueError, match="mode F with values in"):
        data.read_image(str(tmp_path / "x.tiff"), 1024)


def test_large_images_are_shrunk_at_load_time(tmp_path):
    big = _read(tmp_path, Image.new("RGB", (3000, 1500), (9, 9, 9)), max_side=512)
    assert big.size == (512, 256)
    assert _read(tmp_path, Image.new("RGB", (300, 150)), max_side=512).size == (300, 150)


# -----------------------------------------------------------------------------
# Manifests: unknown keys, names that become file names


def _manifest(tmp_path, **entry):
    _folder(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps([_rec()]))
    e = {"name": "c0", "task": "colour", "train": "c.json", "test": "c.json", "image_folder": "images", **entry}
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps([e]))
    return str(path)


def test_a_manifest_rejects_unknown_keys_and_bad_names(tmp_path):
    with pytest.raises(DataError, match=r"m.yaml: client 0: unknown keys \['imagefolder'\]"):
        data.load_manifest(_manifest(tmp_path, imagefolder="x"))
    for key, bad in (("name", "a/b"), ("name", "../c"), ("task", "vqa v2"), ("task", "x.y")):
        with pytest.raises(DataError, match=rf"m.yaml: client 0: {'client' if key == 'name' else 'task'} name"):
            data.load_manifest(_manifest(tmp_path, **{key: bad}))


# -----------------------------------------------------------------------------
# Checked before any model loads: lengths, unknown words, config


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load weights fails loudly: errors must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the data were checked")
    loader = train.base_loader
    monkeypatch.setattr(train, "base_loader", lambda m: loader(m)._replace(base=refuse))


def _cfg(manifest, **data_kw):
    cfg = train.Config()
    cfg.data.scenario, cfg.data.manifest = "manifest", manifest
    for k, v in data_kw.items():
        setattr(cfg.data, k, v)
    return cfg


def test_an_over_long_record_is_named_at_load_time_or_skipped(tmp_path, no_model):
    manifest = _manifest(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps([_rec(), _rec(question="What colour? " * 40)]))
    with pytest.raises(DataError, match=r"c.json: record 1 \(id 'r1'\): \d+ tokens > data.max_length 60"):
        train.load_data(_cfg(manifest, max_length=60))
    clients = train.load_data(_cfg(manifest, max_length=60, skip_bad_records=True))
    assert len(clients[0].train) == 1 and "tokens > data.max_length" in clients[0].skipped[0]


def test_any_words_train_on_the_embedded_base_and_round_trip(tmp_path, no_model, capsys):
    manifest = _manifest(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps([_rec(answer="big zebra", question="What hue? Größe"), _rec()]))
    clients = train.load_data(_cfg(manifest))
    assert clients[0].train[0].turns[0][1] == "big zebra" and "prompts use words" not in capsys.readouterr().err
    tok = embedded.embedded_tokenizer()                                 # byte fallback: nothing becomes <unk>
    for text in ("big zebra", "What hue? Größe", "naïve ✓ 42"):
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == text


def test_a_closed_vocabulary_tokenizer_names_the_words_it_lacks():
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<unk>", "<s>", "</s>", "USER", ":", "ASSISTANT", "What", "colour", "?", "red"]
    core = Tokenizer(tk_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    enc = data.Encoder(tok, None, 0, 1)
    c = data.ClientData("c0", "colour", [data.Sample("a", None, [("What colour?", "big")])],
                        [data.Sample("b", None, [("What hue?", "red"), ("What colour?", "big")])])
    with pytest.raises(DataError, match=r"cannot represent \('big' x2\)"):
        train.check_encodable([c], enc)
    c.train[0].turns[0] = c.test[0].turns[1] = ("What hue?", "red")
    assert train.check_encodable([c], enc) == ["prompts use words the tokenizer maps to <unk>: 'hue' x3"]


def test_data_py_lists_the_vocabulary():
    import subprocess
    out = subprocess.run([sys.executable, "tools/embedded.py", "--vocabulary"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and set(out.stdout.split()) == set(embedded.vocabulary())


BAD_VALUES = [
    ("fed.eval_batch_size=0", "fed.eval_batch_size = 0: must be >= 1"),
    ("data.max_new_tokens=0", "data.max_new_tokens = 0: must be >= 1"),
    ("data.max_new_tokens=-2", "data.max_new_tokens = -2: must be >= 1"),
    ("fed.lr_connector=-1e-3", "fed.lr_connector = -0.001: must be a finite number >= 0"),
    ("fed.lr_lora_stage2=.nan", "fed.lr_lora_stage2 = nan: must be a finite number"),
    ("fed.lr_lora_stage1=.inf", "fed.lr_lora_stage1 = inf: must be a finite number"),
    ("fed.grad_clip=-1", "fed.grad_clip = -1.0: must be a finite number > 0"),
    ("fed.lambda_b=.nan", "fed.lambda_b = nan: must be a finite number"),
    ("fed.lambda_d=-0.1", "fed.lambda_d = -0.1: must be a finite number >= 0"),
    ("fed.warmup_ratio=-0.5", "fed.warmup_ratio = -0.5: must be in [0, 1]"),
    ("fed.prox_mu=-1", "fed.prox_mu = -1.0: must be a finite number >= 0"),
    ("model.lora_dropout=1.0", "model.lora_dropout = 1.0: must be in [0, 1)"),
    ("model.lora_dropout=-0.1", "model.lora_dropout = -0.1: must be in [0, 1)"),
    ("model.lora_targets=[]", "model.lora_targets = []: must be a non-empty list"),
    ("model.lora_targets=[q_proj,lm_head]", "must be a non-empty list of decoder linear names, never lm_head"),
    ("model.embedded_pretrain_steps=0", "model.embedded_pretrain_steps = 0: must be >= 1"),
    ("data.manifest=m.yaml", "data.manifest = 'm.yaml': must be null unless data.scenario is 'manifest'"),
    ("fed.ata_form=nearest", "fed.ata_form = 'nearest': must be one of"),
    ("data.val_per_client=-1", "data.val_per_client = -1: must be >= 0"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_every_value_that_could_only_fail_later_fails_in_validate(override, message):
    with pytest.raises(train.ConfigError) as e:
        train.load_config(os.path.join(ROOT, "config.yaml"), [override])
    assert message in str(e.value)


def test_lora_targets_that_match_no_layer_fail_before_the_model_loads(no_model):
    cfg = train.load_config(os.path.join(ROOT, "config.yaml"), ["model.lora_targets=[q_proj,qkv_proj]"])
    with pytest.raises(train.ConfigError, match=r"model.lora_targets: \['qkv_proj'\] match no linear layer"):
        train.load_data(cfg)


def test_a_failed_embedded_build_leaves_nothing_in_the_cache(tmp_path):
    with pytest.raises(ValueError, match="embedded_pretrain_steps must be >= 1"):
        embedded.build_embedded(str(tmp_path / "base"), steps=0)
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# Scenario D: real handwritten digits, one skill, three formats (an optional extra)

needs_digits = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                  reason="scenario D needs scikit-learn: pip install -r requirements-digits.txt")


@needs_digits
def test_scenario_d_is_real_digits_in_three_formats_with_disjoint_iid_splits():
    cfg = DataConfig(scenario="D", train_per_client=16, test_per_client=8, val_per_client=4)
    clients = embedded.synthetic_clients("D", cfg, 0)
    assert [c.task for c in clients] == ["digit"] * 3 + ["parity"] * 3 + ["greater"] * 3
    answers = {t: {s.turns[0][1] for c in clients if c.task == t for s in c.train + c.test} for t in embedded.SCENARIOS["D"]}
    assert answers["digit"] <= set("0123456789") and len(answers["digit"]) >= 8
    assert answers["parity"] == {"odd", "even"} and answers["greater"] == {"yes", "no"}
    sources = [s.source for c in clients for s in c.train + c.val + c.test]
    assert len(sources) == len(set(sources)) == 9 * 28                 # no digit in two places
    for c in clients:
        assert (len(c.train), len(c.val), len(c.test)) == (16, 4, 8)
        assert c.train[0].image.size == (32, 32) and c.train[0].image.mode == "RGB"
    assert len({c.train[0].turns[0][0] for c in clients if c.task == "parity"}) == 1   # one format per task
    vocab = set(embedded.vocabulary())                                     # the embedded base knows every word
    for s in (s for c in clients for s in c.train):
        assert set(data.normalise(s.turns[0][1])) <= vocab
        assert set(w for w in data.normalise(s.turns[0][0].replace("<image>", ""))) <= {w.lower() for w in vocab}
    # the same seed gives the same world, another seed another one
    again = embedded.synthetic_clients("D", cfg, 0)
    assert [s.source for c in again for s in c.train] == [s.source for c in clients for s in c.train]
    assert [s.source for c in embedded.synthetic_clients("D", cfg, 1) for s in c.train] != [s.source for c in clients for s in c.train]


def test_scenario_d_without_scikit_learn_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)          # import fails as if not installed
    with pytest.raises(DataError, match="pip install -r requirements-digits.txt"):
        embedded.synthetic_clients("D", DataConfig(scenario="D"), 0)


@needs_digits
def test_scenario_d_too_large_for_the_digits_is_named():
    with pytest.raises(DataError, match="scenario D has 1797 digits"):
        embedded.synthetic_clients("D", DataConfig(scenario="D", train_per_client=200), 0)


def test_minority_phrasing_switch_and_validation_split_change_nothing_else():
    base = DataConfig(train_per_client=6, test_per_client=3)
    a = embedded.synthetic_clients("A", base, 0)
    v = embedded.synthetic_clients("A", DataConfig(train_per_client=6, test_per_client=3, val_per_client=2), 0)
    assert [s.image.tobytes() for c in a for s in c.train + c.test] == [s.image.tobytes() for c in v for s in c.train + c.test]
    assert all(len(c.val) == 2 for c in v) and all(not c.val for c in a)
    shared = embedded.synthetic_clients("A", DataConfig(train_per_client=30, test_per_client=1, minority_phrasing=False), 0)
    count = [{s.turns[0][1] for s in c.train} for c in shared if c.task == "count"]
    assert all(ans <= {"1", "2", "3"} for ans in count)                 # every count client answers "3", none "three"
    mixed = [{s.turns[0][1] for s in c.train} for c in a if c.task == "count"]
    assert mixed[1] <= {"one", "two", "three"}


def test_a_manifest_validation_split_is_carved_from_the_training_file(tmp_path):
    clients = embedded.synthetic_clients("A", DataConfig(clients_per_task=1, train_per_client=5, test_per_client=2), 0)
    manifest = embedded.export_llava(clients, str(tmp_path))
    loaded = data.load_clients(DataConfig(scenario="manifest", manifest=manifest, val_per_client=2))
    assert [s.id for s in loaded[0].train + loaded[0].val] == [s.id for s in clients[0].train]
    assert len(loaded[0].val) == 2 and len(loaded[0].train) == 3
