"""model.py -- the multimodal model around the Pilot connector (SPEC section 2).

    image -> frozen CLIP vision tower (penultimate layer, CLS dropped)   H_v (B, N, C_v)
          -> connector (pilot.py: PlainConnector | TaskClientConnector | Stage2Connector) (B, N, C)
          -> replaces the N `<image>` token positions of the prompt
          -> frozen causal LM with LoRA (pilot.add_lora) -> logits, CE on answer tokens

Where the weights come from:
  (a) a transformers LLaVA checkpoint (directory or hub id, e.g. llava-hf/llava-1.5-7b-hf):
      vision tower, LLM, tokenizer, image processor; its projector initialises psi_t.
  (b) a CLIP vision checkpoint + a causal-LM checkpoint + an optional LLaVA projector file
      (mm_projector.bin of the original LLaVA repo, or .safetensors).
  model.llava "embedded", the default run's stand-in, is a tiny LLaVA that tools/embedded.py
  builds and pretrains once and then loads through exactly path (a).

What it is fed: data.Encoder's inputs, the input_ids LLaVA-1.5's own preprocessing gives a
record (SPEC 5c), with `<image>` expanded to N image tokens, labels on the answers only.

Running it (autocast, evaluate): a client's batches (data.load_batches) decoded ahead by the
loader's workers, and its greedy answers scored by the record's metric (data.METRICS).

One model instance serves every client: a client's state (its connector and its LoRA) is a
{name: tensor} dict swapped in and out with client_state / load_client_state.

Shape legend: B batch, L text length (image tokens included), N image tokens, C_v vision
width, C LLM width, V vocabulary.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import pilot

# -----------------------------------------------------------------------------
# Config (keys of the `model:` section of config.yaml)


@dataclass
class ModelConfig:
    llava: str | None = "embedded"   # "embedded", or a transformers LLaVA checkpoint dir / hub id
    vision: str | None = None        # path (b): CLIP vision checkpoint (used when llava is null)
    llm: str | None = None           # path (b): causal-LM checkpoint
    projector: str | None = None     # path (b), optional: mm_projector.bin or .safetensors
    dtype: str = "float32"           # float32 | bfloat16 | float16 (paper: bf16)
    device: str = "cpu"              # cpu | cuda
    lora_r: int = 8                  # paper: 64
    lora_alpha: float = 16.0         # paper: 128
    lora_dropout: float = 0.0        # paper: 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(pilot.DEFAULT_LORA_TARGETS))
    gradient_checkpointing: bool = False   # recompute LLM layers in backward (on for 7B)
    cache_dir: str = ".cache"        # where the embedded base is built and kept
    embedded_pretrain_steps: int = 600   # central caption pretraining of the embedded base


# -----------------------------------------------------------------------------
# The model


class Output(NamedTuple):
    ce: torch.Tensor                 # () cross-entropy on answer tokens
    aux: dict[str, torch.Tensor]     # the connector's raw auxiliary losses (pilot.AUX_KEYS)
    logits: torch.Tensor             # (B, L, V)


class PilotLlava(nn.Module):
    """Frozen vision tower + connector + frozen causal LM with LoRA.

    `connector` is any pilot.py connector (it returns a ConnectorOutput); swap it with
    set_connector when a run moves from stage 1 to stage 2."""

    def __init__(self, vision: nn.Module, lm: nn.Module, connector: nn.Module, image_token_id: int,
                 feature_layer: int = -2, drop_cls: bool = True):
        super().__init__()
        self.vision, self.lm, self.connector = vision, lm, connector
        self.image_token_id, self.feature_layer, self.drop_cls = image_token_id, feature_layer, drop_cls
        for p in self.vision.parameters():
            p.requires_grad_(False)

    def set_connector(self, connector: nn.Module) -> None:
        self.connector = connector

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """H_v: patch features of the penultimate CLIP layer, CLS dropped (LLaVA-1.5)."""
        dtype = next(self.vision.parameters()).dtype
        hs = self.vision(pixel_values.to(dtype), output_hidden_states=True).hidden_states
        h = hs[self.feature_layer]                                        # (B, 1 + N, C_v)
        return h[:, 1:] if self.drop_cls else h                           # (B, N, C_v)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None):
        """Text embeddings with the image tokens scattered into the `<image>` positions.
        pixel_values holds one picture per sample that has an image, in batch order (text-only
        samples have none; a batch of text alone has pixel_values None and never runs the
        vision tower or the connector, whose auxiliary losses are then 0)."""
        is_img = input_ids == self.image_token_id                         # (B, L)
        # the id may lie outside the LM's vocabulary (path b), so look up a harmless 0 there
        emb = self.lm.get_input_embeddings()(input_ids.masked_fill(is_img, 0))   # (B, L, C)
        if pixel_values is None:
            if is_img.any():
                raise ValueError(f"{int(is_img.sum())} image-token positions in input_ids and no pixel_values")
            return emb, pilot.aux_losses(emb)
        h = self.image_features(pixel_values)                              # (n, N, C_v), frozen dtype
        # trainable connector weights stay fp32 on a bf16 base (under autocast on GPU)
        conn = self.connector(h.to(next(self.connector.parameters()).dtype))   # tokens (n, N, C)
        n_img, n_tok = int(is_img.sum()), conn.tokens.shape[0] * conn.tokens.shape[1]
        if n_img != n_tok:
            raise ValueError(f"{n_img} image-token positions in input_ids for {n_tok} image tokens")
        # row-major order: sample i's N positions take the i-th picture's N tokens
        emb = emb.masked_scatter(is_img[..., None], conn.tokens.to(emb.dtype))    # (B, L, C)
        return emb, conn.aux

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Output:
        emb, aux = self.embed(input_ids, pixel_values)                    # (B, L, C)
        logits = self.lm(inputs_embeds=emb, attention_mask=attention_mask).logits   # (B, L, V)
        ce = logits.new_zeros((), dtype=torch.float32)
        if labels is not None:  # next-token CE on answer tokens only (labels IGNORE elsewhere)
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=data.IGNORE)
        return Output(ce, aux, logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 *, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> list[list[int]]:
        """Batched greedy decoding with KV cache from LEFT-padded prompts; each sequence stops
        at EOS (not returned) or after max_new_tokens."""
        from transformers import GenerationConfig
        emb, _ = self.embed(input_ids, pixel_values)                      # (B, L, C)
        # The project's decoding, whole. transformers fills every value a passed GenerationConfig
        # leaves unset from the model's own, which a checkpoint's generation_config.json sets
        # (Vicuna's: max_length 4096, which warns on every call, temperature 0.9, top_p 0.6; one
        # could set a repetition_penalty, which would change greedy answers), so for this call
        # the model's own is this one.
        decoding = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True)
        checkpoints, self.lm.generation_config = self.lm.generation_config, decoding
        try:
            out = self.lm.generate(inputs_embeds=emb, attention_mask=attention_mask)   # (B, <= max_new)
        finally:
            self.lm.generation_config = checkpoints
        seqs = []
        for row in out.tolist():
            seqs.append(row[:row.index(eos_token_id)] if eos_token_id in row else row)
        return seqs


# -----------------------------------------------------------------------------
# Client state: what a client owns, as {name: tensor}


def _owned(model: PilotLlava) -> dict[str, torch.Tensor]:
    """The live tensors a client owns: its whole connector (trainable or frozen: psi_s in
    stage 2 is frozen but personal) and its LoRA factors, under their client-state names."""
    owned = {f"connector.{k}": v for k, v in model.connector.state_dict().items()}
    owned.update({f"lm.{k}": v for k, v in pilot.lora_state_dict(model.lm).items()})
    return owned


def client_state(model: PilotLlava) -> dict[str, torch.Tensor]:
    """A client's state as detached CPU copies of what it owns (see _owned)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in _owned(model).items()}


@torch.no_grad()
def load_client_state(model: PilotLlava, state: dict[str, torch.Tensor]) -> None:
    """Copy a client's state into the shared model; the key sets must match exactly."""
    params = _owned(model)
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise KeyError(f"client state does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in state.items():
        params[k].copy_(v)


# -----------------------------------------------------------------------------
# Loading checkpoints


@dataclass
class Base:
    """What a checkpoint provides, before a connector and LoRA are added."""
    vision: nn.Module
    lm: nn.Module
    tokenizer: object
    image_processor: object
    image_token_id: int
    n_image_tokens: int
    projector: dict[str, torch.Tensor] | None   # Adapter state (linear_1/linear_2) or None
    feature_layer: int = -2
    drop_cls: bool = True

    @property
    def vision_width(self) -> int:
        return self.vision.config.hidden_size

    @property
    def llm_width(self) -> int:
        return self.lm.get_input_embeddings().weight.shape[1]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _patches(vision_config) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as it is, or a package its files need: one line naming
    the checkpoint and what to do."""


# Vicuna (and every Llama-2 repo of its time) ships a SentencePiece tokenizer.model and no
# tokenizer.json; transformers 5 converts it on load, reading its settings through
# sentencepiece's generated protobuf module. sentencepiece 0.2.3's module needs protobuf >= 7,
# which Flower (protobuf < 7) forbids, and transformers then reports a missing `tiktoken`.
SENTENCEPIECE_PIP = "pip install 'sentencepiece>=0.2.0,<0.2.3' 'protobuf>=3.20'"


def sentencepiece_problem() -> str | None:
    """Why transformers could not convert a SentencePiece tokenizer.model here, or None."""
    try:
        import sentencepiece
    except ImportError:
        return "the sentencepiece package is not installed"
    try:
        import google.protobuf
    except ImportError:
        return "the protobuf package is not installed"
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401  (what the conversion reads)
    except Exception as e:   # protobuf's VersionError: generated for a newer protobuf than this one
        return (f"sentencepiece {sentencepiece.__version__}'s protobuf module does not load with protobuf "
                f"{google.protobuf.__version__} ({str(e).splitlines()[0][:120]})")
    return None


def load_tokenizer(path: str):
    """AutoTokenizer.from_pretrained(path), with the one failure Llama-family repos meet said in
    one line: a tokenizer.model without tokenizer.json and no working sentencepiece + protobuf
    (checked before loading where the folder is local; transformers' own message names tiktoken)."""
    from transformers import AutoTokenizer
    local_sp = os.path.isfile(os.path.join(path, "tokenizer.model")) and not os.path.isfile(
        os.path.join(path, "tokenizer.json"))
    problem = sentencepiece_problem() if local_sp else None
    if problem is None:
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:   # a hub id, converted on load: the same cause, found after the fact
            problem = sentencepiece_problem()
            if problem is None or not re.search(r"tiktoken|sentencepiece|protobuf|Protobuf", f"{type(e).__name__} {e}"):
                raise
    raise CheckpointError(f"{path}: its tokenizer is a SentencePiece tokenizer.model, which transformers converts "
                          f"on load, and {problem}; run: {SENTENCEPIECE_PIP}")


# The weights a class does not use that a hub checkpoint holds (CLIPVisionModel from a whole
# CLIPModel repo: the text tower), named in transformers' load report: expected, not printed.
UNUSED = {"CLIPVisionModel": re.compile(r"^(text_model\.|text_projection|visual_projection|logit_scale)")}


def from_pretrained(cls, path: str, dtype: torch.dtype, device: str):
    """cls.from_pretrained(path) with transformers' load report read here rather than printed: a
    weight the checkpoint lacks (it would be left at random) is a CheckpointError naming it; the
    weights it holds that cls does not use are listed in one line unless expected (UNUSED)."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # the report's table and 4.x-era config notes
    try:
        module, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} weights of {cls.__name__} are not in the checkpoint "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    unused = [k for k in info.get("unexpected_keys", []) if not UNUSED.get(cls.__name__, re.compile("^$")).match(k)]
    if unused:
        warnings.warn(f"{path}: {len(unused)} weights not used by {cls.__name__} ({', '.join(sorted(unused)[:3])})",
                      stacklevel=2)
    return module.to(device)


def load_llava(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Base:
    """Path (a): a transformers LLaVA checkpoint directory or hub id."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration
    llava = from_pretrained(LlavaForConditionalGeneration, path, dtype, device)
    return base_from_llava(llava, load_tokenizer(path), AutoImageProcessor.from_pretrained(path), path)


def base_from_llava(llava, tokenizer, image_processor, name: str = "llava") -> Base:
    """Split an in-memory LlavaForConditionalGeneration into a Base. Its language model (the
    bare decoder in transformers 5) and lm_head go into a causal-LM shell built on the meta
    device, so no frozen weight is ever held twice."""
    from transformers import AutoModelForCausalLM
    cfg = llava.config
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"{name}: unsupported vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg.text_config, dtype=llava.lm_head.weight.dtype)
    setattr(lm, lm.base_model_prefix, llava.model.language_model)   # e.g. lm.model for Llama
    lm.lm_head = llava.lm_head
    lm.generation_config = llava.generation_config
    left = [n for n, p in lm.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"{name}: causal-LM shell kept meta parameters {left[:3]}")
    projector = {k: v.detach().clone() for k, v in llava.model.multi_modal_projector.state_dict().items()}
    layer = cfg.vision_feature_layer
    return Base(llava.model.vision_tower, lm, tokenizer, image_processor, cfg.image_token_id,
                _patches(cfg.vision_config), projector, layer if isinstance(layer, int) else layer[-1],
                cfg.vision_feature_select_strategy == "default")


def load_projector_file(path: str) -> dict[str, torch.Tensor]:
    """An LLaVA projector file -> Adapter state (linear_1.*, linear_2.*).
    Accepts the original LLaVA names (model.mm_projector.0.weight, ...2.bias) and transformers'
    (multi_modal_projector.linear_1.weight, ...). Loads with safetensors or
    torch.load(weights_only=True), which refuses pickles that would run code."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        raw = load_file(path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    rename = {"0": "linear_1", "2": "linear_2", "linear_1": "linear_1", "linear_2": "linear_2"}
    out = {}
    for key, value in raw.items():
        parts = key.split(".")
        if len(parts) < 3 or parts[-3] not in ("mm_projector", "multi_modal_projector") or parts[-2] not in rename:
            raise KeyError(f"{path}: unexpected key {key!r} for a LLaVA mlp2x_gelu projector")
        out[f"{rename[parts[-2]]}.{parts[-1]}"] = value
    need = {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    if set(out) != need:
        raise KeyError(f"{path}: projector keys {sorted(out)} are not {sorted(need)}")
    return out


def pair_tokenizer(llm_path: str):
    """Path (b)'s tokenizer: the LM's, with an `<image>` token added if it lacks one and a pad
    token (unk, else eos) if it has none."""
    tok = load_tokenizer(llm_path)
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def load_pair(vision_path: str, llm_path: str, projector_path: str | None = None,
              dtype: torch.dtype = torch.float32, device: str = "cpu") -> Base:
    """Path (b): CLIP vision checkpoint + causal-LM checkpoint (+ LLaVA projector file).
    An `<image>` token is added to the tokenizer if it lacks one; its id may exceed the
    LM's vocabulary, which PilotLlava.embed handles without resizing the embeddings."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, CLIPVisionModel
    vision = from_pretrained(CLIPVisionModel, vision_path, dtype, device)
    lm = from_pretrained(AutoModelForCausalLM, llm_path, dtype, device)
    tok = pair_tokenizer(llm_path)
    projector = load_projector_file(projector_path) if projector_path else None
    return Base(vision, lm, tok, AutoImageProcessor.from_pretrained(vision_path),
                tok.convert_tokens_to_ids("<image>"), _patches(vision.config), projector)


def _llava_text_side(cfg: ModelConfig):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(cfg.llava)
    return load_tokenizer(cfg.llava), config.image_token_id, _patches(config.vision_config)


def _pair_text_side(cfg: ModelConfig):
    from transformers import CLIPVisionConfig
    tok = pair_tokenizer(cfg.llm)
    return tok, tok.convert_tokens_to_ids("<image>"), _patches(CLIPVisionConfig.from_pretrained(cfg.vision))


def _llava_config(cfg: ModelConfig):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(cfg.llava, local_files_only=True), cfg.llava


def _pair_config(cfg: ModelConfig):
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig
    vision = CLIPVisionConfig.from_pretrained(cfg.vision, local_files_only=True)
    text = AutoConfig.from_pretrained(cfg.llm, local_files_only=True)
    return LlavaConfig(vision_config=vision, text_config=text), f"{cfg.vision} + {cfg.llm}"


class Loader(NamedTuple):
    """One source of a base (the module docstring's (a), (b)), three ways to read it."""
    base: object        # cfg -> Base: the weights
    text_side: object   # cfg -> (tokenizer, image_token_id, n_image_tokens), no weights
    config: object      # cfg -> (LlavaConfig, description), no weights, no download


LOADERS = {
    "llava": Loader(lambda c: load_llava(c.llava, DTYPES[c.dtype], c.device), _llava_text_side, _llava_config),
    "pair": Loader(lambda c: load_pair(c.vision, c.llm, c.projector, DTYPES[c.dtype], c.device),
                   _pair_text_side, _pair_config),
}


def loader(cfg: ModelConfig) -> Loader:
    """THE one place that picks where a checkpoint's base comes from: model.llava (a), else
    model.vision + model.llm (b). A Loader reads it three ways: `loader(cfg).base(cfg)` the
    weights; `.text_side(cfg)` what data checks need before any weight loads; `.config(cfg)`
    its shape. model.llava "embedded" is the stand-in that tools/embedded.py builds, and
    train.base_loader picks it there."""
    if cfg.llava == "embedded":
        raise ValueError("model.llava 'embedded' is tools/embedded.py's stand-in base (train.base_loader picks it)")
    if cfg.llava:
        return LOADERS["llava"]
    if not (cfg.vision and cfg.llm):
        raise ValueError("model: set model.llava, or both model.vision and model.llm")
    return LOADERS["pair"]


def llava_15_7b_config():
    """LLaVA-1.5-7B's shape (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 + Vicuna-7B v1.5."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, projection_dim=768)
    tc = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_id=32000, image_seq_length=576)


def meta_config(cfg: ModelConfig, source: Loader):
    """The LlavaConfig a run would load from `source`, without weights or downloads: a local (or
    already cached) checkpoint's config (the embedded recipe's), else LLaVA-1.5-7B's built-in shape."""
    try:
        return source.config(cfg)
    except (OSError, ValueError):
        if cfg.llava == "embedded":
            raise
        return llava_15_7b_config(), "built-in LLaVA-1.5-7B shape (checkpoint config not available offline)"


def build_connector(kind: str, base: Base, released_init: bool = False,
                    generator: torch.Generator | None = None) -> nn.Module:
    """kind 'plain' (baselines) or 'stage1' (Pilot), psi_t / the projector initialised from
    the checkpoint's projector when it has one (SPEC section 3 [choice]), the rest drawn from
    `generator`."""
    dev = next(base.lm.parameters()).device
    if kind == "plain":
        conn = pilot.PlainConnector(base.vision_width, base.llm_width, generator)
        if base.projector is not None:
            conn.projector.load_state_dict(base.projector)
    elif kind == "stage1":
        conn = pilot.TaskClientConnector(base.vision_width, base.llm_width, released_init, generator)
        if base.projector is not None:
            conn.psi_t.load_state_dict(base.projector)
            if released_init:  # the released code loads the projector into psi_s as well
                conn.psi_s.load_state_dict(base.projector)
    else:
        raise ValueError(f"connector kind must be 'plain' or 'stage1', got {kind!r}")
    return conn.to(dev)


def enable_checkpointing(lm: nn.Module) -> None:
    """Activation (gradient) checkpointing on every decoder layer, non-reentrant. transformers
    renamed `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)` to
    `activation_checkpointing_enable(activation_checkpointing_kwargs=...)` during 5.x (5.17 has
    only the old name, 5.24 both): take the new one where it exists."""
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_model(base: Base, connector: nn.Module, cfg: ModelConfig,
                generator: torch.Generator | None = None) -> PilotLlava:
    """Wrap the LM's linears with LoRA (freezing the rest; A drawn from `generator`) and
    assemble the model."""
    pilot.add_lora(base.lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, generator)
    if cfg.gradient_checkpointing:   # recompute each decoder layer in backward (7B on one GPU)
        enable_checkpointing(base.lm)
    return PilotLlava(base.vision, base.lm, connector, base.image_token_id, base.feature_layer, base.drop_cls)
# -----------------------------------------------------------------------------
# Running the model on a client's batches: precision, the loader, greedy answers scored


def autocast(model: PilotLlava):
    """bf16/fp16 autocast on CUDA when the base is in half precision; a no-op on CPU."""
    p = next(model.lm.parameters())
    enabled = p.device.type == "cuda" and p.dtype != torch.float32
    return torch.autocast("cuda", dtype=p.dtype, enabled=enabled)


@torch.no_grad()
def evaluate(model: PilotLlava, enc: data.Encoder, samples: Sequence[data.Sample],
             metric: str, batch_size: int, max_new_tokens: int, progress: bool = False,
             skipped: list[str] | None = None) -> float:
    """The metric (data.METRICS, corpus-level) of greedy answers to each record's first turn
    against its references (data.references): batched generation with the KV cache
    (PilotLlava.generate), batches decoded ahead by the loader's workers, the metric computed
    once over every record scored."""
    model.eval()
    tok = enc.tokenizer
    dev = next(model.lm.parameters()).device
    plan = [list(range(i, min(i + batch_size, len(samples)))) for i in range(0, len(samples), batch_size)]
    predictions, references = [], []
    bar = tqdm(total=len(samples), desc="scoring", unit="sample", disable=None if progress else True, leave=False)
    for batch, kept in data.load_batches(enc, samples, plan, dev, prompts=True, skipped=skipped):
        if batch is not None:
            with autocast(model):
                seqs = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
            predictions += [tok.decode(seq, skip_special_tokens=True) for seq in seqs]
            references += [data.references(samples[j]) for j in kept]
        bar.update(len(kept))
    bar.close()
    return data.METRICS[metric](predictions, references) if predictions else float("nan")
