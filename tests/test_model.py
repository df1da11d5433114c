"""Tests of model.py: parity with transformers' LlavaForConditionalGeneration, both loading
paths, label masks, generation, client-state swapping."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import data
import model
import pilot
from data import IGNORE, Sample
from data import Encoder
from tools import embedded, sizing


def _plain_model(base):
    return model.build_model(base, model.build_connector("plain", base), model.ModelConfig(lora_r=4)).eval()


def _batch(base, n=3, seed=0):
    enc = Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens)
    clients = embedded.synthetic_clients("B", data.DataConfig(clients_per_task=1, train_per_client=n, test_per_client=1), seed)
    return enc, [s for c in clients for s in c.train][:n]


def test_logits_equal_transformers_llava(tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration
    ref = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    base = model.load_llava(tiny_llava_dir)
    m = _plain_model(base)            # LoRA B = 0: exactly the checkpoint's function
    enc, samples = _batch(base)
    batch = enc.collate(samples)
    with torch.no_grad():
        expected = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
        out = m(**batch)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    # and the CE is transformers' own loss on the same labels
    with torch.no_grad():
        assert out.ce.item() == pytest.approx(ref(**batch).loss.item(), rel=1e-5)


def test_load_llava_shares_weights_and_keeps_the_projector(tiny_llava_dir):
    base = model.load_llava(tiny_llava_dir)
    assert base.n_image_tokens == 16 and base.feature_layer == -2 and base.drop_cls
    conn = model.build_connector("stage1", base)
    torch.testing.assert_close(conn.psi_t.linear_1.weight, base.projector["linear_1.weight"])
    assert not any(p.is_meta for p in base.lm.parameters())


def _save_pair(llava_dir, root, projector_format):
    """Split a LLaVA checkpoint into what path (b) users have: CLIP, a causal LM, a projector file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessorPil, LlavaForConditionalGeneration
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    llava.model.vision_tower.save_pretrained(os.path.join(root, "clip"))
    CLIPImageProcessorPil.from_pretrained(llava_dir).save_pretrained(os.path.join(root, "clip"))
    lm = AutoModelForCausalLM.from_config(llava.config.text_config)
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    lm.save_pretrained(os.path.join(root, "llm"))
    AutoTokenizer.from_pretrained(llava_dir).save_pretrained(os.path.join(root, "llm"))
    proj = llava.model.multi_modal_projector
    state = {"model.mm_projector.0.weight": proj.linear_1.weight, "model.mm_projector.0.bias": proj.linear_1.bias,
             "model.mm_projector.2.weight": proj.linear_2.weight, "model.mm_projector.2.bias": proj.linear_2.bias}
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    path = os.path.join(root, "mm_projector." + projector_format)
    if projector_format == "bin":
        torch.save(state, path)
    else:
        save_file(state, path)
    return path


@pytest.mark.parametrize("projector_format", ["bin", "safetensors"])
def test_clip_plus_llm_plus_projector_file_equals_the_llava_checkpoint(tiny_llava_dir, tmp_path, projector_format):
    proj = _save_pair(tiny_llava_dir, str(tmp_path), projector_format)
    pair = model.load_pair(str(tmp_path / "clip"), str(tmp_path / "llm"), proj)
    full = model.load_llava(tiny_llava_dir)
    enc, samples = _batch(full)
    batch = enc.collate(samples)
    with torch.no_grad():
        torch.testing.assert_close(_plain_model(pair)(**batch).logits, _plain_model(full)(**batch).logits)


def test_projector_file_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "mm_projector.bin"
    with open(path, "wb") as f:
        pickle.dump({"model.mm_projector.0.weight": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        model.load_projector_file(str(path))


def test_projector_file_with_foreign_keys_is_an_error(tmp_path):
    path = str(tmp_path / "p.safetensors")
    save_file({"model.mm_projector.0.weight": torch.zeros(2, 2), "vision.x": torch.zeros(1)}, path)
    with pytest.raises(KeyError, match="p.safetensors"):
        model.load_projector_file(path)


def test_labels_mask_everything_but_the_answers(tiny_llava_dir):
    base = model.load_llava(tiny_llava_dir)
    enc = Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens)
    s = Sample("x", "x.png", [("<image>\nHow many shapes are there?", "two"), ("What colour are the shapes?", "red")])
    ids, labels = enc.encode(s)
    tok = base.tokenizer
    eos, two, red = tok.eos_token_id, tok.convert_tokens_to_ids("\u2581two"), tok.convert_tokens_to_ids("\u2581red")
    assert ids.count(base.image_token_id) == base.n_image_tokens
    supervised = [(i, lab) for i, lab in zip(ids, labels) if lab != IGNORE]
    assert supervised == [(two, two), (eos, eos), (red, red), (eos, eos)]
    assert tok.convert_ids_to_tokens(ids[:ids.index(base.image_token_id)]) == ["<s>", "\u2581USER:", "\u2581"]
    prompt = enc.encode_prompt(s)
    assert ids[:len(prompt)] == prompt and tok.convert_ids_to_tokens(prompt[-1:]) == ["\u2581ASSISTANT:"]


def test_batched_generation_equals_a_slow_greedy_loop(tiny_llava_dir):
    base = model.load_llava(tiny_llava_dir)
    m = _plain_model(base)
    g = torch.Generator().manual_seed(0)   # its own generator: the result must not depend on test order
    with torch.no_grad():
        for p in pilot.lora_state_dict(m.lm).values():
            p.normal_(std=0.3, generator=g)   # make the model opinionated, so the tokens vary
    enc, samples = _batch(base, n=3)
    tok = base.tokenizer
    b = enc.collate_prompts(samples)
    got = m.generate(**b, max_new_tokens=5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for s, seq in zip(samples, got):   # reference: one sample, no cache, full forward each step
        ids = torch.tensor([enc.encode_prompt(s)])
        pix = enc.pixels([data.picture(s)])
        ref = []
        for _ in range(5):
            with torch.no_grad():
                nxt = int(m(ids, torch.ones_like(ids), pix).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ref.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert seq == ref


def test_client_state_swaps_in_and_out_of_one_model(tiny_llava_dir):
    base = model.load_llava(tiny_llava_dir)
    m = model.build_model(base, model.build_connector("stage1", base), model.ModelConfig(lora_r=4))
    first = model.client_state(m)
    assert any(k.startswith("connector.psi_s.") for k in first)
    assert all(k.startswith("connector.") or k.endswith(("lora_A", "lora_B")) for k in first)
    second = {k: v + 1.0 for k, v in first.items()}
    model.load_client_state(m, second)
    assert all(torch.equal(v, second[k]) for k, v in model.client_state(m).items())
    model.load_client_state(m, first)
    assert all(torch.equal(v, first[k]) for k, v in model.client_state(m).items())
    with pytest.raises(KeyError, match="missing"):
        model.load_client_state(m, {k: v for k, v in first.items() if "lora" not in k})


def test_only_connector_and_lora_are_trainable(tiny_llava_dir):
    base = model.load_llava(tiny_llava_dir)
    m = model.build_model(base, model.build_connector("stage1", base), model.ModelConfig(lora_r=4))
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("connector.") or n.endswith(("lora_A", "lora_B")) for n in names)


def test_embedded_base_is_built_once_and_loads_through_path_a(embedded_dir):
    assert os.path.exists(os.path.join(embedded_dir, "pretraining.json"))
    base = model.load_llava(embedded_dir)
    assert base.n_image_tokens == (embedded.EMBEDDED["image_size"] // embedded.EMBEDDED["patch_size"]) ** 2
    before = os.path.getmtime(os.path.join(embedded_dir, "config.json"))
    cfg = model.ModelConfig(cache_dir=os.path.dirname(embedded_dir), embedded_pretrain_steps=5)
    assert embedded.embedded_checkpoint(cfg) == embedded_dir     # cached: not rebuilt
    assert os.path.getmtime(os.path.join(embedded_dir, "config.json")) == before


def test_bf16_base_with_fp32_trainables_and_gradient_checkpointing(tiny_llava_dir):
    """A bf16 base (the GPU setting) runs with fp32 connector/LoRA; checkpointing is on and
    changes no gradient."""
    grads = {}
    for ckpt in (False, True):
        base = model.load_llava(tiny_llava_dir, dtype=torch.bfloat16)
        cfg = model.ModelConfig(lora_r=4, gradient_checkpointing=ckpt)
        torch.manual_seed(0)
        m = model.build_model(base, model.build_connector("stage1", base), cfg).train()
        assert m.lm.is_gradient_checkpointing == ckpt
        assert m.connector.psi_t.linear_1.weight.dtype == torch.float32
        assert next(m.lm.parameters()).dtype == torch.bfloat16
        enc, samples = _batch(base)
        out = m(**enc.collate(samples))
        out.ce.backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        assert all(torch.isfinite(g).all() for g in grads[ckpt].values())
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n])


def test_checkpointing_under_both_transformers_names():
    """transformers 5.17 (a GPU image's) has only gradient_checkpointing_enable; later 5.x
    adds activation_checkpointing_enable: enable_checkpointing calls the one there is,
    non-reentrant either way."""
    class Old(torch.nn.Module):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.called = ("old", gradient_checkpointing_kwargs)

    class New(Old):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            self.called = ("new", activation_checkpointing_kwargs)

    for cls, name in ((Old, "old"), (New, "new")):
        lm = cls()
        model.enable_checkpointing(lm)
        assert lm.called == (name, {"use_reentrant": False})


def test_size_report_of_llava_15_7b_offline():
    cfg = model.ModelConfig(llava="llava-hf/llava-1.5-7b-hf", dtype="bfloat16", lora_r=64, lora_alpha=128,
                            gradient_checkpointing=True)
    rep = sizing.size_report(cfg, model.loader(cfg), "pilot", num_tasks=3, batch_size=1, seq_len=1024)
    assert rep["base_parameters"] == 7_063_427_072          # llava-hf/llava-1.5-7b-hf
    s1, s2 = rep["stages"]["pilot stage 1"], rep["stages"]["pilot stage 2"]
    assert s1["parameters"]["lora"] == 159_907_840          # r=64 on q,k,v,o,gate,up,down x 32 layers
    adapter = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert rep["projector_parameters"] == adapter
    assert s1["parameters"]["trainable"] == 159_907_840 + 2 * adapter
    assert s2["parameters"]["trainable"] == 159_907_840 + 3 * adapter + 1024 * 3
    assert s1["bytes_up_per_round"] == 4 * (159_907_840 + adapter)
    assert s2["bytes_down_per_round"] == 4 * (159_907_840 + 3 * adapter)
    assert s1["memory_bytes"]["adamw_state_fp32"] == 8 * s1["parameters"]["trainable"]
    plain = sizing.size_report(cfg, model.loader(cfg), "fedavg", 3, 1, 1024)["stages"]["fedavg (plain LLaVA)"]
    assert plain["parameters"]["trainable"] == 159_907_840 + adapter
