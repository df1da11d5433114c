"""Tiny stand-ins for the checkpoints a real run downloads, written file for file as the hub
repos ship them (at small width), so that a test meets the files a user's disk holds, not what
today's save_pretrained writes. No network: every weight is drawn here, every file is written
here from what the repos are documented to hold.

    openai/clip-vit-large-patch14-336     CLIPModel, config.json with the old `text_config_dict` /
                                          `vision_config_dict` beside the full dumps, a 4.x-era
                                          preprocessor_config.json (CLIPFeatureExtractor, `size`
                                          and `crop_size` as ints), one pytorch_model.bin with the
                                          position_ids buffers of that era
    lmsys/vicuna-7b-v1.5                  LlamaForCausalLM in fp16, sharded
                                          pytorch_model-0000k-of-00002.bin + index, the
                                          `rotary_emb.inv_freq` buffers transformers 4.31 saved,
                                          generation_config.json (max_length 4096, temperature,
                                          top_p), special_tokens_map.json, tokenizer_config.json
                                          (LlamaTokenizer, legacy false, no pad token) and a
                                          SentencePiece tokenizer.model, NO tokenizer.json
    liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5
                                          mm_projector.bin with LLaVA's key names, in bf16
    llava-hf/llava-1.5-7b-hf              LlavaForConditionalGeneration as first published
                                          (transformers 4.36): `image_token_index`, vocabulary
                                          padded to a multiple of 64 (32064), pad 32001, the old
                                          weight names (language_model.model.*,
                                          language_model.lm_head.*, vision_tower.*) in fp16
                                          safetensors shards + index, CLIPImageProcessor config,
                                          processor_config.json, tokenizer.json + tokenizer.model,
                                          added_tokens.json, generation_config.json

The tokenizer is trained here with the `sentencepiece` trainer on Llama's settings (BPE, byte
fallback, split digits, dummy prefix, identity normalisation, no extra-whitespace removal, ids
unk 0 / bos 1 / eos 2, no pad), so transformers takes the same conversion path it takes for
Vicuna's 32,000-piece model. Sizes are scaled down (vocabulary 400; llava-hf's 32000 / 32001 /
32064 become 400 / 401 / 448), file names, keys and formats are the repos'.
"""

from __future__ import annotations

import io
import json
import os
import random

import torch

WORDS = ("what colour is the square circle triangle red green blue yellow how many shapes are there one two three "
         "picture of a book who wrote this title answer question using single word phrase provide sentence caption "
         "for provided image chat between curious user and an artificial intelligence assistant gives helpful "
         "detailed polite answers to s questions cat on mat dog left right yes no author genre").split()


def _at(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def sentencepiece_model(vocab_size: int = 400, seed: int = 0) -> bytes:
    """A Llama-2-style SentencePiece model (tokenizer.model's bytes), trained on generated text."""
    import sentencepiece as spm
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "?", "", f" {rng.randint(0, 99)}"])
             for _ in range(3000)]
    lines += ["A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:"] * 20
    lines += [w.capitalize() for w in WORDS] * 5
    buf = io.BytesIO()
    # Llama 2's trainer_spec (as its tokenizer.model records it), scaled down in vocab_size
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_by_unicode_script=True,
        split_by_number=True, split_by_whitespace=True, max_sentencepiece_length=16, character_coverage=0.99995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# openai/clip-vit-large-patch14-336

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# keys every 4.x config dump carried (PretrainedConfig.to_dict), which a 5.x loader must tolerate
OLD_DUMP = {"_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
            "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
            "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
            "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False, "is_encoder_decoder": False,
            "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
            "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
            "output_attentions": False, "output_hidden_states": False, "output_scores": False, "prefix": None,
            "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
            "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None, "task_specific_params": None,
            "temperature": 1.0, "tie_encoder_decoder": False, "tie_word_embeddings": True, "tokenizer_class": None,
            "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False, "transformers_version": "4.21.3",
            "typical_p": 1.0, "use_bfloat16": False}
VISION = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, image_size=32,
              patch_size=8, projection_dim=8)
TEXT = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, projection_dim=8)


def write_clip(path: str, seed: int = 0):
    """openai/clip-vit-large-patch14-336's files; returns the CLIPModel whose weights they hold."""
    from transformers import CLIPConfig, CLIPModel
    os.makedirs(path, exist_ok=True)
    text_dump = {**OLD_DUMP, **TEXT, "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
                 "hidden_act": "quick_gelu", "initializer_factor": 1.0, "initializer_range": 0.02,
                 "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
                 "pad_token_id": 1, "vocab_size": 49408}
    vision_dump = {**OLD_DUMP, **VISION, "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu",
                   "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
                   "model_type": "clip_vision_model", "num_channels": 3}
    config = {"_name_or_path": "openai/clip-vit-large-patch14-336", "architectures": ["CLIPModel"],
              "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 8,
              "text_config": text_dump, "text_config_dict": dict(TEXT), "torch_dtype": "float32",
              "transformers_version": None, "vision_config": vision_dump, "vision_config_dict": dict(VISION)}
    _write_json(os.path.join(path, "config.json"), config)
    _write_json(os.path.join(path, "preprocessor_config.json"), {
        "crop_size": VISION["image_size"], "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": VISION["image_size"]})
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config={**TEXT, "vocab_size": 49408}, vision_config=VISION, projection_dim=8))
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    # the 4.x checkpoints saved these buffers; 5.x builds them itself
    n_pos = (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1
    state["vision_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    return clip


# -----------------------------------------------------------------------------
# lmsys/vicuna-7b-v1.5

LLAMA = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=2)
VICUNA_GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
                     "temperature": 0.9, "top_p": 0.6, "transformers_version": "4.31.0"}


def _llama_state(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **LLAMA))
    return {k: v.contiguous() for k, v in lm.state_dict().items()}


def _rotary_buffers(prefix: str) -> dict[str, torch.Tensor]:
    """transformers 4.31 kept LlamaRotaryEmbedding.inv_freq as a persistent buffer: Vicuna's .bin
    shards hold one per layer."""
    head = LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head, 2).float() / head))
    return {f"{prefix}layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone()
            for i in range(LLAMA["num_hidden_layers"])}


def _shard(state: dict[str, torch.Tensor], path: str, fmt: str) -> None:
    """Two shards and their index, as the hub's sharded checkpoints: layer 0 and what precedes it
    in the first, the rest in the second."""
    from safetensors.torch import save_file
    first = [k for k in state if "layers.1." not in k and "lm_head" not in k and "norm.weight" != k.split("model.")[-1]]
    parts = [{k: state[k] for k in first}, {k: v for k, v in state.items() if k not in first}]
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    weight_map, total = {}, 0
    for i, part in enumerate(parts, 1):
        name = f"{stem}-{i:05d}-of-{len(parts):05d}.{ext}"
        if fmt == "bin":
            torch.save(part, os.path.join(path, name))
        else:
            save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    index = f"{stem}.{ext}.index.json"
    _write_json(os.path.join(path, index), {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def write_vicuna(path: str, sp_model: bytes, seed: int = 1) -> dict[str, torch.Tensor]:
    """lmsys/vicuna-7b-v1.5's files; returns the fp16 state they hold (keys as saved)."""
    os.makedirs(path, exist_ok=True)
    config = {"_name_or_path": "vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
              "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 4096,
              "model_type": "llama", "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
              "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
              "transformers_version": "4.31.0", "use_cache": True, "vocab_size": 400, **LLAMA}
    _write_json(os.path.join(path, "config.json"), config)
    _write_json(os.path.join(path, "generation_config.json"), VICUNA_GENERATION)
    state = {k: v.half() for k, v in _llama_state(400, seed).items()}
    state.update(_rotary_buffers("model."))
    _shard(state, path, "bin")
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(sp_model)
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": _at("<s>"), "clean_up_tokenization_spaces": False,
        "eos_token": _at("</s>"), "legacy": False, "model_max_length": 4096, "pad_token": None, "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": _at("<unk>")})
    plain = {k: v for k, v in _at("x").items() if k != "__type"}
    _write_json(os.path.join(path, "special_tokens_map.json"), {
        "bos_token": {**plain, "content": "<s>"}, "eos_token": {**plain, "content": "</s>"}, "pad_token": "<unk>",
        "unk_token": {**plain, "content": "<unk>"}})
    return state


# -----------------------------------------------------------------------------
# liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5


def projector_state(seed: int = 2) -> dict[str, torch.Tensor]:
    """LLaVA's mlp2x_gelu projector (Linear(C_v, C), GELU, Linear(C, C)) under its own names, bf16."""
    g = torch.Generator().manual_seed(seed)
    c_v, c = VISION["hidden_size"], LLAMA["hidden_size"]
    shapes = {"0.weight": (c, c_v), "0.bias": (c,), "2.weight": (c, c), "2.bias": (c,)}
    return {f"model.mm_projector.{k}": (torch.randn(s, generator=g) * 0.2).to(torch.bfloat16) for k, s in shapes.items()}


def write_projector(path: str, seed: int = 2) -> str:
    """The pretrain repo: mm_projector.bin (what --pretrain_mm_mlp_adapter reads) beside its config."""
    os.makedirs(path, exist_ok=True)
    _write_json(os.path.join(path, "config.json"), {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
        "hidden_size": LLAMA["hidden_size"], "mm_hidden_size": VISION["hidden_size"], "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "model_type": "llava", "tune_mm_mlp_adapter": True, "transformers_version": "4.31.0", "vocab_size": 400})
    torch.save(projector_state(seed), os.path.join(path, "mm_projector.bin"))
    return os.path.join(path, "mm_projector.bin")


# -----------------------------------------------------------------------------
# llava-hf/llava-1.5-7b-hf


def write_llava_hf(path: str, sp_model: bytes, clip, vicuna_state: dict, projector: dict) -> None:
    """llava-hf/llava-1.5-7b-hf's files as first published, its weights those of the other three
    stand-ins (the vocabulary padded with two added tokens, <image> and <pad>, to 448 rows)."""
    from transformers import AutoTokenizer
    os.makedirs(path, exist_ok=True)
    vocab, image_id, pad_id = 448, 400, 401
    config = {"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": image_id,
              "model_type": "llava", "pad_token_id": pad_id, "projector_hidden_act": "gelu",
              "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                              "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                              "torch_dtype": "float16", "vocab_size": vocab, **LLAMA},
              "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
              "vision_config": {"model_type": "clip_vision_model", "vocab_size": 32000, **VISION},
              "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": vocab}
    _write_json(os.path.join(path, "config.json"), config)
    _write_json(os.path.join(path, "generation_config.json"), {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad_id,
        "transformers_version": "4.36.0.dev0"})
    state = {}
    for k, v in clip.vision_model.state_dict().items():
        state[f"vision_tower.vision_model.{k}"] = v.half()
    for k, v in projector.items():   # model.mm_projector.0.weight -> multi_modal_projector.linear_1.weight
        layer, what = k.split(".")[-2:]
        state[f"multi_modal_projector.linear_{1 if layer == '0' else 2}.{what}"] = v.half()
    for k, v in vicuna_state.items():
        if "rotary_emb" in k:
            continue
        if k in ("model.embed_tokens.weight", "lm_head.weight"):   # rows for <image>, <pad> and the padding
            v = torch.cat([v, torch.zeros(vocab - v.shape[0], v.shape[1], dtype=v.dtype)])
        state[f"language_model.{k}"] = v
    _shard(state, path, "safetensors")
    _write_json(os.path.join(path, "preprocessor_config.json"), {
        "crop_size": {"height": VISION["image_size"], "width": VISION["image_size"]}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": VISION["image_size"]}})
    _write_json(os.path.join(path, "processor_config.json"), {
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": VISION["patch_size"],
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"})
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(sp_model)
    # tokenizer.json as the repo has it: Llama's converted tokenizer with <image> and <pad> added
    scratch = os.path.join(path, ".sp")
    os.makedirs(scratch, exist_ok=True)
    with open(os.path.join(scratch, "tokenizer.model"), "wb") as f:
        f.write(sp_model)
    _write_json(os.path.join(scratch, "tokenizer_config.json"), {"tokenizer_class": "LlamaTokenizer", "legacy": False})
    tok = AutoTokenizer.from_pretrained(scratch)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})   # 32000 in the repo
    tok.add_special_tokens({"pad_token": "<pad>"})                          # 32001
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [image_id, pad_id]
    spec = json.loads(tok.backend_tokenizer.to_str())
    # the pipeline transformers 4.36's LlamaConverter wrote (legacy): "▁" prepended and spaces
    # replaced by the normaliser, no pre-tokeniser, "<s> $A" added by the post-processor
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    spec["pre_tokenizer"] = None
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(spec, f, ensure_ascii=False, indent=2)
    for name in os.listdir(scratch):
        os.remove(os.path.join(scratch, name))
    os.rmdir(scratch)
    _write_json(os.path.join(path, "added_tokens.json"), {"<image>": image_id, "<pad>": pad_id})
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {**{k: v for k, v in _at(t).items() if k != "__type"}, "special": True}
                                 for i, t in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (image_id, "<image>"), (pad_id, "<pad>")]},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
        "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>", "padding_side": "left",
        "processor_class": "LlavaProcessor", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False, "unk_token": "<unk>", "use_default_system_prompt": False})
    _write_json(os.path.join(path, "special_tokens_map.json"), {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})


def write_all(root: str) -> dict[str, str]:
    """Every stand-in under `root`, named as the hub repos are; -> {repo id: its folder}."""
    sp_model = sentencepiece_model()
    dirs = {repo: os.path.join(root, *repo.split("/")) for repo in (
        "openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5",
        "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5", "llava-hf/llava-1.5-7b-hf")}
    clip = write_clip(dirs["openai/clip-vit-large-patch14-336"])
    vicuna = write_vicuna(dirs["lmsys/vicuna-7b-v1.5"], sp_model)
    write_projector(dirs["liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"])
    write_llava_hf(dirs["llava-hf/llava-1.5-7b-hf"], sp_model, clip, vicuna, projector_state())
    return dirs
