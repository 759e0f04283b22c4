"""LLaVA-OneVision as the yes/no reward model of ORM, PRM (Sec. 3.2), PARM (Sec. 4) and PARM++ (Sec. 5): one
question about one image, scored by the probability that the first answer token is "yes" or "no".

    pixels [B,3,384,384] -> SigLIP (kept layers, no post-LN, no head) -> [B,729,Dv]
                         -> mlp2x_gelu projector -> [B,729,H] ++ image_newline -> [B,730,H]
    chat text split at <image>, each chunk tokenised on its own, the 730 rows spliced in
                         -> Qwen2 (GQA, q/k/v bias, RoPE, RMSNorm) -> logits at the answer position only

Originals followed: the paper code's `selector.py` and the LLaVA-NeXT it vendors as `llava/` (each function names
its file) on transformers 4.40's `modeling_qwen2.py`; for llava-hf, `modeling_llava_onevision.py` and its converter.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from safetensors import safe_open
from torch import nn

import data
from data import CheckpointError

IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER = -200  # IMAGE_TOKEN_INDEX of `llava/constants.py`: where the image rows go in a token list
IGNORE = -100             # IGNORE_INDEX of `llava/constants.py`: a label that takes no loss
SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_FILL = data.GREY  # int(0.5 * 255) = 127: the grey `expand2square` (`llava/mm_utils.py`) pads with
HF_DEFAULT_TOP_K, HF_DEFAULT_TOP_P = 50, 1.0  # HF GenerationConfig's, for a checkpoint without generation_config.json

# ---- 1. The model: SigLIP tower, projector and Qwen2 LM (`llava/model/llava_arch.py`) ------------------------

@dataclass
class VisionConfig:
    """SigLIP as LLaVA runs it. `n_layer` counts the layers that are kept and run (so400m: 27 - 1 = 26)."""
    hidden_size: int = 1152
    intermediate_size: int = 4304
    n_layer: int = 26
    n_head: int = 16
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def n_patches(self) -> int:
        # the patch conv is "valid": 384 = 27 * 14 + 6, the last 6 pixel rows/columns are never seen
        return (self.image_size // self.patch_size) ** 2

@dataclass
class LlavaConfig:
    hidden_size: int = 896
    intermediate_size: int = 4864
    n_layer: int = 24
    n_head: int = 14
    n_kv_head: int = 2
    vocab_size: int = 151936       # rows stored in the checkpoint
    n_vocab: int | None = None     # rows used: len(tokenizer), as `llava/model/builder.py` truncates (None = all)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self):
        if self.n_vocab is None:
            self.n_vocab = self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def n_image_tokens(self) -> int:
        return self.vision.n_patches + 1  # + image_newline, appended once in "pad" mode

    @staticmethod
    def presets() -> dict[str, "LlavaConfig"]:
        """lmms-lab llava-onevision-qwen2-{0.5b,7b}-ov, the tiny model `write_tiny_llava` writes, and the
        verifier a miniature world trains from scratch (`new_llava`; its vocab_size is set from the tokenizer)."""
        return {"0.5b": LlavaConfig(),
                "7b": LlavaConfig(hidden_size=3584, intermediate_size=18944, n_layer=28, n_head=28, n_kv_head=4,
                                  vocab_size=152064, tie_word_embeddings=False),
                "tiny": LlavaConfig(hidden_size=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2,
                                    vocab_size=448, tie_word_embeddings=False,
                                    vision=VisionConfig(hidden_size=32, intermediate_size=64, n_layer=2, n_head=2)),
                # The shapes world: its 120 px images are "pad"-resized to 60 px and cut into 20 px patches, so
                # the 3x3 patches are exactly the 3x3 slots (data.SLOTS) and each image row the LM reads is one
                # slot's content; a smaller size blurs neighbouring cells together, a larger one only costs.
                # RoPE θ 10^4: sequences are ~60-200 positions, where 10^6 leaves most frequencies unused.
                "world": LlavaConfig(hidden_size=128, intermediate_size=512, n_layer=4, n_head=4, n_kv_head=2,
                                     vocab_size=1024, rope_theta=10_000.0, tie_word_embeddings=False,
                                     vision=VisionConfig(hidden_size=64, intermediate_size=256, n_layer=2, n_head=2,
                                                         image_size=60, patch_size=20))}

    @classmethod
    def from_preset(cls, name: str) -> "LlavaConfig":
        presets = cls.presets()
        if name not in presets:
            raise ValueError(f"unknown LLaVA preset {name!r}: use one of {', '.join(presets)}")
        return presets[name]

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | os.PathLike) -> "LlavaConfig":
        """config.json of lmms-lab (model_type llava / llava_qwen, LM fields at top level) or llava-hf
        (llava_onevision: `text_config`, `vision_config` over transformers' Qwen2Config, SiglipVisionConfig),
        every field typed and bounded as it is read."""
        ckpt_dir = Path(ckpt_dir)
        src, cfg = ckpt_dir / "config.json", data.read_config(ckpt_dir)
        field = _field_reader(cfg, src)
        kind = field("model_type", str, None)
        if kind in ("llava", "llava_qwen"):
            tower = field("mm_vision_tower", str, "siglip")
            if "siglip" not in tower.lower():
                raise CheckpointError(f"{src} names vision tower {tower!r}: only the SigLIP tower of "
                                      "LLaVA-OneVision is supported")
            if field("mm_projector_type", str, "mlp2x_gelu") != "mlp2x_gelu":
                raise CheckpointError(f"{src} has mm_projector_type {cfg['mm_projector_type']!r}: only mlp2x_gelu "
                                      "(LLaVA-OneVision) is supported")
            vision = VisionConfig()  # so400m, hard-coded in `siglip_encoder.py`
            hub = ckpt_dir / "vision_tower" / "config.json"
            if hub.is_file():  # the hub's, counting the deleted layer
                vision = _vision_from_hf(data.read_config(hub.parent), 1, hub)
            if field("mm_hidden_size", int, vision.hidden_size) != vision.hidden_size:
                raise CheckpointError(f"{src} has mm_hidden_size {cfg['mm_hidden_size']} but the tower has hidden "
                                      f"size {vision.hidden_size}: fix vision_tower/config.json")
            return _language_config(cfg, vision, field("tie_word_embeddings", bool, False), src, "")
        if kind == "llava_onevision":
            layer = field("vision_feature_layer", int, -1)
            strategy = field("vision_feature_select_strategy", str, "full")
            if layer != -1 or strategy != "full":
                raise CheckpointError(f"{src} has vision_feature_layer={layer}, vision_feature_select_strategy="
                                      f"{strategy!r}: only -1 / 'full' is supported")
            text = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "rope_theta": 10000.0, **field("text_config", dict, {})}
            vision = _vision_from_hf({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                      "num_attention_heads": 12, "image_size": 224, "patch_size": 16,
                                      **field("vision_config", dict, {})}, 0, src, "vision_config.")  # kept layers
            tie = data.config_field(text, "tie_word_embeddings", bool, src, field("tie_word_embeddings", bool, False),
                                    section="text_config.")
            return _language_config(text, vision, tie, src, "text_config.")
        raise CheckpointError(f"{src} has model_type {kind!r}: this is not a LLaVA-OneVision checkpoint (lmms-lab: "
                              "'llava' or 'llava_qwen'; llava-hf: 'llava_onevision')")

def _field_reader(cfg: dict, src: Path, section: str = ""):
    """data.config_field bound to one config dict (`section`: where it sits in `src`)."""
    def field(key, kind, default=data.REQUIRED, low=None, high=None):
        return data.config_field(cfg, key, kind, src, default, low, high, section)
    return field

def _language_config(text: dict, vision: VisionConfig, tie: bool, src: Path, section: str) -> LlavaConfig:
    """The Qwen2 fields of a LLaVA config (`section`: where they sit in `src`), typed, bounded and consistent:
    whole heads of even size, query heads a multiple of the key/value heads, no sliding window."""
    field = _field_reader(text, src, section)
    if field("use_sliding_window", bool, False):
        raise CheckpointError(f"{src} enables sliding-window attention, which LLaVA-OneVision does not use: set "
                              f"{section}use_sliding_window to false")
    n_head = field("num_attention_heads", int, low=1, high=1024)
    rope = field("rope_parameters", dict, {})   # rope_scaling is ignored: LLaVA-NeXT's loader forces it to None
    theta = data.config_field(rope, "rope_theta", float, src, field("rope_theta", float, 10000.0, 1.0, 1e12), 1.0,
                              1e12, f"{section}rope_parameters.")
    c = LlavaConfig(hidden_size=field("hidden_size", int, low=1, high=2 ** 16),
                    intermediate_size=field("intermediate_size", int, low=1, high=2 ** 18),
                    n_layer=field("num_hidden_layers", int, low=1, high=1024), n_head=n_head,
                    n_kv_head=field("num_key_value_heads", int, n_head, 1, n_head),
                    vocab_size=field("vocab_size", int, low=1, high=2 ** 24), rope_theta=theta,
                    rms_norm_eps=field("rms_norm_eps", float, 1e-6, 0.0, 1.0), tie_word_embeddings=tie, vision=vision)
    if c.hidden_size % n_head or c.head_dim % 2 or n_head % c.n_kv_head:
        raise CheckpointError(f"{src}: {section}hidden_size {c.hidden_size} must split into num_attention_heads "
                              f"{n_head} heads of even size, a multiple of num_key_value_heads {c.n_kv_head}")
    return c

def _vision_from_hf(vis: dict, deleted: int, src: Path, section: str = "") -> VisionConfig:
    """A SiglipVisionConfig dict (null fields take so400m's values) whose last `deleted` layers LLaVA drops."""
    field = _field_reader(vis, src, section)
    if field("hidden_act", str, "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(f"{src}: {section}hidden_act is {vis['hidden_act']!r}, but LLaVA-OneVision's tower "
                              "uses gelu_pytorch_tanh")
    image_size = field("image_size", int, 384, 1, 4096)
    c = VisionConfig(hidden_size=field("hidden_size", int, 1152, 1, 2 ** 16),
                     intermediate_size=field("intermediate_size", int, 4304, 1, 2 ** 18),
                     n_layer=field("num_hidden_layers", int, 27, 1 + deleted, 1024) - deleted,
                     n_head=field("num_attention_heads", int, 16, 1, 1024), image_size=image_size,
                     patch_size=field("patch_size", int, 14, 1, image_size),
                     layer_norm_eps=field("layer_norm_eps", float, 1e-6, 0.0, 1.0))
    if c.hidden_size % c.n_head:
        raise CheckpointError(f"{src}: {section}hidden_size {c.hidden_size} must split into num_attention_heads "
                              f"{c.n_head} heads")
    return c

def run_layer(layer: nn.Module, recompute: bool, *args):
    """layer(*args), or with its activations recomputed in the backward pass (gradient checkpointing)."""
    return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)

# SigLIP as LLaVA runs it (`llava/model/multimodal_encoder/siglip_encoder.py`)
class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, self.n_head = cfg.hidden_size, cfg.n_head
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # [B, P, D], full (unmasked) attention over the patches
        B, P, D = x.shape
        q, k, v = (p(x).view(B, P, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, P, D))

class SiglipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.Module()  # a plain container, so parameter names follow the checkpoints' nesting
        self.mlp.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.mlp.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x)), approximate="tanh"))

class SiglipTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.embeddings.position_embedding = nn.Embedding(cfg.n_patches, cfg.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.n_layer))
        # stored in every checkpoint but never applied: LLaVA takes the last kept layer's raw output
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def embed(self, pixels):  # [B, 3, S, S] -> [B, P, D], patches in row-major order
        x = self.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        return x + self.embeddings.position_embedding.weight

    def forward(self, pixels, checkpoint: bool = False):
        """[B, 3, S, S] -> [B, P, D]. `checkpoint`: recompute each layer in the backward pass (when training)."""
        x = self.embed(pixels)
        for layer in self.encoder.layers:
            x = run_layer(layer, checkpoint and self.training, x)
        return x

# Qwen2 (`llava/model/language_model/llava_qwen.py` on transformers 4.40's `modeling_qwen2.py`)
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back, then scale: the order HF Qwen2 uses, which matters in fp16/bf16
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

def rope(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, 1, T, head_dim] for positions [B, T]; computed in fp32 and cast, as HF does."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    angle = pos[..., None].float() * inv_freq
    angle = torch.cat((angle, angle), dim=-1)[:, None]
    return angle.cos().to(dtype), angle.sin().to(dtype)

def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

class KVCache:
    """Keys/values [n_layer, B, n_kv, capacity, hd]. A forward writes T columns, row b's first n_new[b] real, so
    padding sits mid-row after an extension: `valid` masks it out, `next_pos` keeps RoPE positions contiguous."""
    def __init__(self, n_layer, batch, n_kv, head_dim, capacity, dtype, device):
        shape = (n_layer, batch, n_kv, capacity, head_dim)
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0  # columns in use

    def write(self, layer: int, k, v):
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise RuntimeError(f"KV cache overflow: {end} columns needed, {self.k.shape[3]} allocated")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n_new: torch.Tensor, T: int):
        self.valid[:, self.length:self.length + T] = torch.arange(T, device=n_new.device) < n_new[:, None]
        self.length += T
        self.next_pos += n_new

class Qwen2Attention(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        H, self.head_dim = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, cfg.n_head * cfg.head_dim)
        self.k_proj, self.v_proj = (nn.Linear(H, cfg.n_kv_head * cfg.head_dim) for _ in range(2))
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, H, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape  # q: [B, n_head, T, hd], k and v: [B, n_kv_head, T, hd]
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # [B, nkv, past + T, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

class Qwen2Block(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))

class Qwen2LM(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.n_vocab, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # a tied checkpoint (0.5B) stores no lm_head: the output projection reads embed_tokens.weight
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.n_vocab, bias=False)

    def forward(self, x, n_new: torch.Tensor, cache: KVCache | None = None, trace: list | None = None,
                checkpoint: bool = False):
        """New positions x [B, T, H], row b's first n_new[b] real -> final-normed state [B, H] at each row's last,
        the answer position. `trace`: HF's hidden_states; `checkpoint`: recompute layers (training, no cache)."""
        B, T, _ = x.shape
        past = 0 if cache is None else cache.length
        start = torch.zeros(B, dtype=torch.long, device=x.device) if cache is None else cache.next_pos
        cos, sin = rope(start[:, None] + torch.arange(T, device=x.device), self.cfg.head_dim, self.cfg.rope_theta,
                        x.dtype)
        mask = None  # a fresh prefill is plainly causal: right padding never precedes a real token
        if past:
            new_ok = torch.arange(T, device=x.device) < n_new[:, None]
            key_ok = torch.cat((cache.valid[:, :past], new_ok), dim=1)                        # [B, past + T]
            causal = torch.arange(past + T, device=x.device) <= past + torch.arange(T, device=x.device)[:, None]
            mask = (key_ok[:, None, :] & causal)[:, None]                                      # [B, 1, T, past+T]
        if trace is not None:
            trace.append(x)
        recompute = checkpoint and self.training and cache is None
        for i, layer in enumerate(self.layers):
            x = run_layer(layer, recompute, x, cos, sin, mask, cache, i)
            if trace is not None:
                trace.append(self.norm(x) if i == len(self.layers) - 1 else x)
        if cache is not None:
            cache.advance(n_new, T)
        return self.norm(x[torch.arange(B, device=x.device), n_new - 1])

    def logits(self, h):  # [B, H] -> [B, n_vocab] in fp32, as Qwen2ForCausalLM returns them
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w).float()

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(len(self.layers), batch, self.cfg.n_kv_head, self.cfg.head_dim, capacity, w.dtype, w.device)

class LlavaOneVision(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = SiglipTower(cfg.vision)
        self.projector = nn.Module()  # mlp2x_gelu of `llava/model/multimodal_projector/builder.py`
        self.projector.linear_1 = nn.Linear(cfg.vision.hidden_size, cfg.hidden_size)
        self.projector.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.image_newline = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.lm = Qwen2LM(cfg)
        self.gradient_checkpointing = False  # True: recompute layers in the backward pass, as the released fine-tune

    def encode_images(self, pixels):
        """[B, 3, S, S] -> the spliced image rows [B, P + 1, H] (`encode_images` of `llava_arch.py`)."""
        f = self.vision(pixels, self.gradient_checkpointing)                            # [B, P, Dv]
        x = self.projector.linear_2(F.gelu(self.projector.linear_1(f)))                 # exact-erf GELU
        # "pad" mode gives one 27x27 view, so spatial_unpad appends image_newline once, not once per row
        return torch.cat((x, self.image_newline.expand(x.shape[0], 1, -1).to(x.dtype)), dim=1)

    def splice(self, ids: Sequence[Sequence[int]], images: torch.Tensor):
        """`prepare_inputs_labels_for_multimodal` of `llava_arch.py`: right-padded embeddings and real lengths."""
        n_img = images.shape[1]
        lengths = [len(t) - 1 + n_img for t in ids]
        x = images.new_zeros(len(ids), max(lengths), self.cfg.hidden_size)
        for b, t in enumerate(ids):
            p = t.index(IMAGE_PLACEHOLDER)
            e = self.lm.embed_tokens(torch.tensor(t[:p] + t[p + 1:], device=x.device))
            x[b, :p] = e[:p]
            x[b, p:p + n_img] = images[b]
            x[b, p + n_img:lengths[b]] = e[p:]
        return x, torch.tensor(lengths, device=x.device)

# ---- 2. The questions (Sec. 3.2, 4, 5), the qwen_1_5 chat template and the image preprocessing ---------------

# A captioning instruction, as LLaVA's pretraining data asks for short descriptions: a miniature world's verifier
# learns to see on painted scenes with it before its reward fine-tune (train.py curate --task scenes)
CAPTION_QUESTION = f"{IMAGE_TOKEN}\nDescribe the image concisely."

def orm_question(prompt: str) -> str:
    """Sec. 3.2, ORM: the outcome question, verbatim from the released `selector.orm` (= the paper's text)."""
    return (f"{IMAGE_TOKEN} This image is generated by a prompt: {prompt}. Does this image accurately represent "
            "the prompt? Please answer yes or no without explanation.")

def prm_question(prompt: str) -> str:
    """Sec. 3.2, PRM: the step-wise question from the paper's text (the released code has no PRM)."""
    return (f"{IMAGE_TOKEN} This is an intermediate image in the generation process by a prompt: {prompt}. "
            "Does this intermediate image accurately represent the prompt? Please answer yes or no without "
            "explanation.")

def clarity_question(prompt: str) -> str:
    """Sec. 4, PARM, task 1: clarity judgment, verbatim from the released `selector.clarity_judgement`
    (double spaces, the 8-space indents and the quoting `'{prompt}.'` included)."""
    return (f"{IMAGE_TOKEN} \n The above image is a certain step  in the text to image generation process. "
            "This image is not the final generated one, and will keep iterating better. The image is generated "
            f"by prompt '{prompt}.'\n        Do you think this image can be used to judge whether it has the "
            "potential to iterate to the image satisfied the prompt?(The image, which needn't to be confused  but "
            "can be clear and basically judged the object, can be used to judge the potential)\n        Answer yes "
            "or no with no explanation.(yes or no in lowercase and no full point)")

POTENTIAL_FOLLOW_UP = ("Do you think whether the image has the potential to iterate to the image satisfied the "
                       "prompt? Please answer yes or no with no explanation.(yes or no in lowercase and no full "
                       "point)")

def potential_question(prompt: str) -> tuple[str, str, str]:
    """Sec. 4, PARM, task 2: potential assessment, two turns as in the released `selector.potential_assessment`."""
    return (clarity_question(prompt), "yes", POTENTIAL_FOLLOW_UP)

def reflection_question(prompt: str) -> str:
    """Sec. 5, PARM++: reflection evaluation, in our words (the released code has no PARM++, the paper no prompt)."""
    return (f"{IMAGE_TOKEN} This image is generated by a prompt: {prompt}. Does this image accurately represent "
            "the prompt? If it does, answer yes. If it does not, answer no and explain in one sentence which "
            "objects, counts, colors, positions or attributes in the image do not match the prompt.")

QUESTIONS = {"orm": orm_question, "prm": prm_question, "clarity": clarity_question, "reflect": reflection_question}

def question_task(turns: Sequence[str]) -> str | None:
    """Which task a conversation's turns (user, assistant, ..., user) ask: a one-turn question of `QUESTIONS`
    about some prompt, or "potential" (Sec. 4, PARM task 2: clarity, "yes", the follow-up); None for other text."""
    def asks(kind: str, text: str) -> bool:
        head, tail = QUESTIONS[kind]("\0").split("\0")     # the question's text around its prompt
        return text.startswith(head) and text.endswith(tail) and len(text) > len(head) + len(tail)

    turns = list(turns)
    first = next((kind for kind in QUESTIONS if turns and asks(kind, turns[0])), None)
    if len(turns) == 3 and first == "clarity" and turns[1:] == ["yes", POTENTIAL_FOLLOW_UP]:
        return "potential"
    return first if len(turns) == 1 else None

Question = str | Sequence[str]

def render_chat(turns: Question) -> str:
    """The qwen_1_5 ChatML (`conv_qwen` of `llava/conversation.py`) of turns user, assistant, ..., user; open end."""
    turns = [turns] if isinstance(turns, str) else list(turns)
    if len(turns) % 2 == 0 or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"turns alternate user, assistant, ..., user (an odd count of strings), got {len(turns)}")
    body = "".join(f"<|im_start|>{('user', 'assistant')[i % 2]}\n{text}<|im_end|>\n" for i, text in enumerate(turns))
    return f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n{body}<|im_start|>assistant\n"

def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids

def tokenize_chat(tokenizer, turns: Question, where: str = "question") -> list[int]:
    """`tokenizer_image_token` of `llava/mm_utils.py`: the chunks around <image> tokenised alone, no BOS."""
    text = render_chat(turns)
    n = text.count(IMAGE_TOKEN)
    if n != 1:
        raise ValueError(f"{where} has {n} {IMAGE_TOKEN} placeholders: the verifier takes exactly one image per "
                         f"question, so put one {IMAGE_TOKEN} in the user text (e.g. orm_question(prompt))")
    before, after = text.split(IMAGE_TOKEN)
    return _encode(tokenizer, before) + [IMAGE_PLACEHOLDER] + _encode(tokenizer, after)

def preprocess(image, size: int = 384, where: str = "image") -> torch.Tensor:
    """The "pad" preprocessing `selector.py` forces (`process_images` of `llava/mm_utils.py`) of a PIL image, uint8
    [H,W,3] or float [3,H,W] in [-1,1] (MAGVIT's decode, truncated as Show-o saves PNGs) -> float32 [3, size, size]:
    `expand2square` onto grey 127, PIL BICUBIC, x * (1/255) in float64, (x - 0.5) / 0.5 in float32 (SigLIP's)."""
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{where} is a float tensor of shape {list(image.shape)}: pass [3, H, W] in [-1, 1]")
        image = Image.fromarray(data.to_uint8_image(image[None].detach())[0])
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"{where} is an array of dtype {arr.dtype} and shape {list(arr.shape)}: pass uint8 "
                             "[H, W, 3], a float tensor [3, H, W] in [-1, 1], or a PIL image")
        image = Image.fromarray(np.ascontiguousarray(arr))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"{where} is a {type(image).__name__}, not an image: pass a PIL image, a float tensor "
                        "[3, H, W] in [-1, 1] or a uint8 array [H, W, 3] (use data.load_image for a file)")
    im = image if image.mode == "RGB" else image.convert("RGB")
    w, h = im.size
    side = max(w, h)
    if w != h:
        canvas = Image.new("RGB", (side, side), PAD_FILL)
        canvas.paste(im, ((side - w) // 2, (side - h) // 2))
        im = canvas
    x = np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

# ---- 3. The reward model -----------------------------------------------------------------------------------

def released_filter(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """What `generate()` of the released `selector.py` does to the first token's logits: transformers 4.40's TopK
    then TopP warpers (generation_config.json's values) set the rest to -inf; temperature 1.0 and the repetition
    penalty (no history yet) change nothing."""
    x = logits
    if top_k:
        kth = torch.topk(x, min(top_k, x.shape[-1])).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=False)
        drop = sorted_x.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[..., -1:] = False  # the most likely token always survives
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x

@dataclass
class Judgment:
    """A yes/no judgment: p_yes / p_no of the full (or released, filtered) softmax; `answer` lower-cased as released."""
    p_yes: float
    p_no: float
    answer: str
    token_id: int
    tokens_processed: int  # LM positions this judgment ran (only the new ones for a cached follow-up)

    @property
    def is_yes(self) -> bool:
        return self.answer == "yes"

@dataclass
class TurnCache:
    """A judged conversation's KV cache for one image: reuse it to ask a follow-up about the same image."""
    ids: tuple[int, ...]  # the conversation's tokens, IMAGE_PLACEHOLDER for the image
    keys: torch.Tensor    # [n_layer, n_kv, len, hd]
    values: torch.Tensor

class Verifier:
    """LLaVA-OneVision turned into the paper's yes/no reward model (Sec. 3.2, 4, 5)."""
    def __init__(self, model: LlavaOneVision, tokenizer, generation: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        generation = generation or {}
        self.top_k, self.top_p = generation.get("top_k", HF_DEFAULT_TOP_K), generation.get("top_p", HF_DEFAULT_TOP_P)
        self.yes_id, self.no_id = (tokenizer.token_to_id(t) for t in ("yes", "no"))
        self.tokens_processed = self.forwards = 0  # work counters: LM positions run (padding not) and LM forwards

    @property
    def device(self) -> torch.device:
        return self.model.image_newline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.image_newline.dtype

    def tokenize(self, question: Question, where: str = "question") -> list[int]:
        return tokenize_chat(self.tokenizer, question, where)

    def pixels(self, images) -> torch.Tensor:
        size = self.model.cfg.vision.image_size
        return torch.stack([preprocess(im, size, f"image {i}") for i, im in enumerate(self._as_list(images, "images"))])

    @staticmethod
    def _as_list(x, what: str) -> list:
        if isinstance(x, torch.Tensor) and x.dim() == 4:  # a decoded batch [B, 3, H, W]
            return list(x)
        if not isinstance(x, (list, tuple)):
            raise TypeError(f"{what} must be a list with one entry per image, got a {type(x).__name__}")
        return list(x)

    def _lm(self, x, n_new, cache: KVCache | None, trace: list | None = None):
        h = self.model.lm(x, n_new, cache, trace)
        self.tokens_processed += int(n_new.sum())
        self.forwards += 1
        return h

    def _prefill(self, images, questions, cache_extra: int | None = 0, trace: list | None = None):
        """-> answer-position states [B, H], positions run [B], KV cache (`cache_extra` spare columns) and ids."""
        images, questions = self._as_list(images, "images"), self._as_list(questions, "questions")
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images and {len(questions)} questions: pass one question per image")
        if not images:
            raise ValueError("no images to judge: pass at least one image and question")
        ids = [self.tokenize(q, f"question {i}") for i, q in enumerate(questions)]
        pixels = self.pixels(images).to(self.device, self.dtype)
        x, n_new = self.model.splice(ids, self.model.encode_images(pixels))
        cache = None if cache_extra is None else self.model.lm.new_cache(len(ids), x.shape[1] + cache_extra)
        return self._lm(x, n_new, cache, trace), n_new, cache, ids

    def _extend(self, cache: KVCache, tokens: Sequence[Sequence[int]]):
        """Append text tokens (ragged, at least one per row) to every row of `cache`; the logits after them."""
        width = max(len(t) for t in tokens)
        pad = torch.tensor([list(t) + [0] * (width - len(t)) for t in tokens], device=self.device)
        n_new = torch.tensor([len(t) for t in tokens], device=self.device)
        return self.model.lm.logits(self._lm(self.model.lm.embed_tokens(pad), n_new, cache)), n_new

    @torch.inference_mode()
    def answer_logits(self, images, questions, trace: list | None = None) -> torch.Tensor:
        """Raw next-token logits at the answer position [B, n_vocab] (fp32), one batched forward."""
        return self.model.lm.logits(self._prefill(images, questions, None, trace)[0])

    def _decide(self, logits, n_new, decide="greedy", generator=None, released_scores=False) -> list[Judgment]:
        if decide not in ("greedy", "sample"):
            raise ValueError(f"decide={decide!r}: use 'greedy' (deterministic) or 'sample' (the released code's "
                             "draw from the top-k/top-p-filtered distribution)")
        filtered = released_filter(logits, self.top_k, self.top_p)
        probs = (filtered if released_scores else logits).softmax(-1)
        if decide == "greedy":
            tokens = logits.argmax(-1)
        else:
            p = filtered.softmax(-1)  # drawn on the generator's device, so a CPU generator serves a GPU model
            tokens = torch.multinomial(p if generator is None else p.to(generator.device), 1, generator=generator)[:, 0]
        return [Judgment(p_yes=float(p[self.yes_id]), p_no=float(p[self.no_id]),
                         answer=self.tokenizer.id_to_token(int(t)).lower(), token_id=int(t),
                         tokens_processed=int(n)) for p, t, n in zip(probs, tokens, n_new)]

    @torch.inference_mode()
    def judge(self, images, questions, *, decide: str = "greedy", generator: torch.Generator | None = None,
              released_scores: bool = False) -> list[Judgment]:
        """Sec. 3.2 / 4: one yes/no judgment per (image, question with one <image>, or conversation) in one forward.
        `decide`: "greedy", or "sample" from the released top-k/top-p filter with `generator`; `released_scores`:
        those filtered probabilities (they saturate at 1.0), not the full softmax. The other judge_* take these."""
        h, n_new, _, _ = self._prefill(images, questions, None)
        return self._decide(self.model.lm.logits(h), n_new, decide, generator, released_scores)

    def judge_orm(self, images, prompts: Sequence[str], **kw) -> list[Judgment]:
        """Sec. 3.2, ORM (and PARM task 3, best-of-N' selection): does the final image match the prompt?"""
        return self.judge(images, [orm_question(p) for p in prompts], **kw)

    def judge_prm(self, images, prompts: Sequence[str], **kw) -> list[Judgment]:
        """Sec. 3.2, PRM: does this intermediate step's image match the prompt?"""
        return self.judge(images, [prm_question(p) for p in prompts], **kw)

    @torch.inference_mode()
    def judge_clarity(self, images, prompts: Sequence[str], **kw) -> tuple[list[Judgment], list[TurnCache]]:
        """Sec. 4, PARM, task 1: clarity judgment, and per image a TurnCache that `judge_potential` extends."""
        questions = [clarity_question(p) for p in self._as_list(prompts, "prompts")]
        h, n_new, cache, ids = self._prefill(images, questions)
        handles = [TurnCache(tuple(t), cache.k[:, b, :, :n], cache.v[:, b, :, :n])  # views of row b's n columns
                   for b, (t, n) in enumerate(zip(ids, n_new.tolist()))]
        return self._decide(self.model.lm.logits(h), n_new, **kw), handles

    def judge_potential(self, handles: Sequence[TurnCache], prompts: Sequence[str], **kw) -> list[Judgment]:
        """Sec. 4, PARM, task 2: potential assessment; only its new tokens are run, on each image's cached turn."""
        return self.judge_followup(handles, [potential_question(p) for p in self._as_list(prompts, "prompts")], **kw)

    @torch.inference_mode()
    def judge_followup(self, handles: Sequence[TurnCache], conversations: Sequence[Question], **kw) -> list[Judgment]:
        """Judge conversations that extend cached ones: the longest shared token prefix is reused, the rest run."""
        handles, conversations = list(handles), self._as_list(conversations, "conversations")
        if len(handles) != len(conversations):
            raise ValueError(f"got {len(handles)} cache handles and {len(conversations)} conversations: pass one each")
        reuse, tails = [], []
        for i, (hnd, conv) in enumerate(zip(handles, conversations)):
            if not isinstance(hnd, TurnCache):
                raise TypeError(f"handle {i} is a {type(hnd).__name__}: pass the TurnCache that judge_clarity returned")
            ids = self.tokenize(conv, f"conversation {i}")
            c = next((j for j, (a, b) in enumerate(zip(hnd.ids, ids)) if a != b), min(len(hnd.ids), len(ids)))
            c = min(c, len(ids) - 1)  # the answer position must be run to get its logits
            if c <= ids.index(IMAGE_PLACEHOLDER):
                raise ValueError(f"conversation {i} does not extend the cached one past the image (they differ at "
                                 f"token {c}): pass the handle of the same image and question")
            reuse.append(c - 1 + self.model.cfg.n_image_tokens)  # cached LM positions kept
            tails.append(ids[c:])
        cache = self.model.lm.new_cache(len(handles), max(reuse) + max(len(t) for t in tails))
        for b, (hnd, n) in enumerate(zip(handles, reuse)):
            cache.k[:, b, :, :n] = hnd.keys[:, :, :n]
            cache.v[:, b, :, :n] = hnd.values[:, :, :n]
            cache.valid[b, :n] = True
            cache.next_pos[b] = n
        cache.length = max(reuse)
        logits, n_new = self._extend(cache, tails)
        return self._decide(logits, n_new, **kw)

    @torch.inference_mode()
    def reflect(self, images, prompts: Sequence[str], max_new_tokens: int = 64,
                stop_tokens: Sequence[str] = ("<|im_end|>", "<|endoftext|>")) -> list[str]:
        """Sec. 5, PARM++: reflection evaluation: greedy KV-cached text for `reflection_question`, "yes" or why not."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least one token")
        stop = {self.tokenizer.token_to_id(t) for t in stop_tokens} - {None}
        questions = [reflection_question(p) for p in self._as_list(prompts, "prompts")]
        h, _, cache, _ = self._prefill(images, questions, max_new_tokens - 1)
        logits = self.model.lm.logits(h)
        out, done = [[] for _ in questions], [False] * len(questions)
        for step in range(max_new_tokens):
            tokens = logits.argmax(-1).tolist()
            for b, t in enumerate(tokens):
                done[b] = done[b] or t in stop
                if not done[b]:
                    out[b].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            logits, _ = self._extend(cache, [[t] for t in tokens])
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]

# ---- 4. Loading and saving checkpoints ---------------------------------------------------------------------

LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {  # (our module prefix, checkpoint prefix), first match wins
    # lmms-lab (LlavaQwenForCausalLM of `llava_qwen.py`): the paper's orm_ft and parm, lmms-lab/llava-onevision-*
    "lmms-lab": (("lm.lm_head.", "lm_head."), ("lm.", "model."),
                 ("vision.", "model.vision_tower.vision_tower.vision_model."),
                 ("projector.linear_1.", "model.mm_projector.0."), ("projector.linear_2.", "model.mm_projector.2."),
                 ("image_newline", "model.image_newline")),
    # llava-hf/llava-onevision-qwen2-*-ov-hf (`convert_llava_onevision_weights_to_hf.py`; transformers 4.45-4.51)
    "llava-hf": (("lm.lm_head.", "language_model.lm_head."), ("lm.", "language_model.model."),
                 ("vision.", "vision_tower.vision_model."), ("projector.", "multi_modal_projector."),
                 ("image_newline", "image_newline")),
    # llava-hf saved by transformers 4.52+ (`_checkpoint_conversion_mapping` of `modeling_llava_onevision.py`)
    "llava-hf-4.52": (("lm.lm_head.", "lm_head."), ("lm.", "model.language_model."),
                      ("vision.", "model.vision_tower.vision_model."), ("projector.", "model.multi_modal_projector."),
                      ("image_newline", "model.image_newline")),
}
# transformers 5.x saves the hub names again, but without SigLIP's `vision_model.` level
LAYOUTS["llava-hf-5"] = tuple((m, c.replace("vision_model.", "")) for m, c in LAYOUTS["llava-hf"])
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")  # the lmms-lab tensors with one row per token
VERIFIER_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                       "vocab.json", "merges.txt", "generation_config.json", "vision_tower/config.json")

def key_map(module: nn.Module, prefixes: Sequence[tuple[str, str]]) -> dict[str, str]:
    """checkpoint key -> parameter name of `module`, by (module, checkpoint) prefix pairs, the first match wins."""
    out = {}
    for name, _ in module.named_parameters():
        mod, ckpt = next(((m, c) for m, c in prefixes if name.startswith(m)), ("", ""))
        out[ckpt + name[len(mod):]] = name
    return out

def detect_layout(keys) -> str:
    keys = set(keys)
    for name, prefixes in LAYOUTS.items():
        p = dict(prefixes)
        if p["lm."] + "embed_tokens.weight" in keys and p["vision."] + "embeddings.patch_embedding.weight" in keys:
            return name
    sample = ", ".join(sorted(keys)[:4])
    raise CheckpointError(f"the weights are in no LLaVA-OneVision layout this loader knows (keys like {sample}): "
                          "expected lmms-lab (model.vision_tower.vision_tower...) or llava-hf (language_model...)")

def check_tokenizer(tokenizer, where) -> int:
    """Check the chat and yes/no tokens; return len(tokenizer), the LM rows `llava/model/builder.py` keeps, less
    the <image>/<video> that llava-hf's converter appends after <|im_end|> (never LM rows)."""
    missing = [t for t in CHAT_TOKENS + ("yes", "no") if tokenizer.token_to_id(t) is None]
    if missing:
        raise CheckpointError(f"the tokenizer in {where} lacks {', '.join(missing)}: LLaVA-OneVision needs Qwen2's "
                              "chat tokens and single-token 'yes'/'no'; use the tokenizer.json shipped with the model")
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    while n and tokenizer.id_to_token(n - 1) in ("<image>", "<video>"):
        n -= 1
    return n

def load_verifier(ckpt_dir: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                  device: torch.device | str = "cpu") -> Verifier:
    """A LLaVA-OneVision checkpoint folder in any of the `LAYOUTS` (auto-detected) as a reward model."""
    ckpt_dir = Path(ckpt_dir)
    dtype, device = data.parse_dtype(dtype), data.parse_device(device)
    cfg = LlavaConfig.from_checkpoint(ckpt_dir)
    gen = ckpt_dir / "generation_config.json"       # read with the configs, before anything is built
    generation = data.read_config(ckpt_dir, gen.name) if gen.is_file() else {}
    scoring = {"top_k": data.config_field(generation, "top_k", int, gen, HF_DEFAULT_TOP_K, 0, 2 ** 24),
               "top_p": data.config_field(generation, "top_p", float, gen, HF_DEFAULT_TOP_P, 0.0, 1.0)}
    tokenizer = data.load_tokenizer(ckpt_dir)
    n_vocab = check_tokenizer(tokenizer, ckpt_dir)
    if n_vocab > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer in {ckpt_dir} has {n_vocab} tokens but the model only {cfg.vocab_size} "
                              "embedding rows: the tokenizer belongs to another model")
    keys = data.find_weight_files(ckpt_dir)
    layout = detect_layout(keys)
    prefixes = LAYOUTS[layout]
    # a checkpoint that stores an lm_head uses it, whatever its config says
    tied = cfg.tie_word_embeddings and dict(prefixes)["lm.lm_head."] + "weight" not in keys
    with torch.device("meta"):
        model = LlavaOneVision(replace(cfg, n_vocab=n_vocab, tie_word_embeddings=tied))
    kmap = key_map(model, prefixes)
    rows = {k: n_vocab for k, v in kmap.items() if v in ("lm.embed_tokens.weight", "lm.lm_head.weight")}
    data.load_state(model, ckpt_dir, kmap, dtype=dtype, device=device, row_limit=rows,
                    what=f"LLaVA-OneVision checkpoint ({layout} layout)")
    return Verifier(model, tokenizer, scoring)

def lmms_lab_state(model: LlavaOneVision, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors under their lmms-lab checkpoint keys, cast to `dtype`."""
    return {c: model.get_parameter(p).detach().to(dtype) for c, p in key_map(model, LAYOUTS["lmms-lab"]).items()}

def save_shards(shards: list[dict[str, torch.Tensor]], out: Path) -> None:
    """Write model.safetensors, or model-0000i-of-0000n.safetensors with model.safetensors.index.json."""
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    shards = dict(zip(["model.safetensors"] if len(shards) == 1 else names, shards))
    for name, tensors in shards.items():
        data.save_state(tensors, out / name)
    if len(shards) > 1:
        data.write_json({"metadata": {"total_size": sum(v.numel() * v.element_size()
                                                        for ts in shards.values() for v in ts.values())},
                         "weight_map": {k: n for n, ts in shards.items() for k in ts}},
                        out / "model.safetensors.index.json")

def save_verifier(model: LlavaOneVision, tokenizer, out_dir: str | os.PathLike, like_dir: str | os.PathLike,
                  dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 4 * 2 ** 30) -> Path:
    """The lmms-lab layout of the paper's checkpoints (`safe_save_model_for_hf_trainer` of `llava/train/train.py`),
    side files and rows past len(tokenizer) from `like_dir`; config.json goes last, as without it nothing loads."""
    like, out = Path(like_dir), Path(out_dir)
    files = data.find_weight_files(like)
    if detect_layout(files) != "lmms-lab":
        raise CheckpointError(f"{like} is not in the lmms-lab layout of the paper's checkpoints: fine-tune from an "
                              "lmms-lab LLaVA-OneVision checkpoint (e.g. lmms-lab/llava-onevision-qwen2-7b-ov)")
    state = lmms_lab_state(model, dtype)
    for key in VOCAB_KEYS:
        if key in state and key in files:
            with safe_open(files[key], framework="pt") as f:
                unused = f.get_slice(key)[state[key].shape[0]:]
            state[key] = torch.cat((state[key].cpu(), unused.to(dtype)))
    shards, size = [{}], 0
    for k, v in state.items():  # a new shard whenever the next tensor would overflow this one
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][k] = v
        size += nbytes
    save_shards(shards, out)
    for name in VERIFIER_SIDE_FILES:
        if (like / name).is_file():
            with data.atomic_path(out / name) as tmp:
                shutil.copyfile(like / name, tmp)
    config = data.read_config(like)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    data.write_json(config, out / "config.json")
    return out

# ---- 5. Fine-tuning the reward models (Sec. 3.2, 4, 5): labels and loss of LLaVA-NeXT's recipe ---------------

LABEL_RULES = ("released", "answer")

def sft_tokens(tokenizer, turns: Sequence[str], rule="released", where="conversation") -> tuple[list[int], list[int]]:
    """Fine-tuning data of the reward models (Sec. 3.2, 4, 5): a conversation (user, assistant, ..., assistant)
    -> the ids the verifier reads + the last answer and "<|im_end|>\\n", and labels (IGNORE: no loss; `sft_loss`
    shifts them). `rule` "answer" labels each answer and its <|im_end|>; "released" (preprocess_qwen of
    `llava/train/train.py`) each whole assistant turn and, a quirk, every "\\n", <|im_start|>, <|im_end|> anywhere."""
    if rule not in LABEL_RULES:
        raise ValueError(f"label rule {rule!r}: use one of {', '.join(LABEL_RULES)}")
    turns = list(turns)
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError(f"{where} has {len(turns)} turn(s): it must alternate user, assistant and end with the "
                         "assistant's answer")
    ids = tokenize_chat(tokenizer, turns[:-1], where) + _encode(tokenizer, turns[-1] + "<|im_end|>\n")
    labels = [IGNORE] * len(ids)
    header = len(_encode(tokenizer, "<|im_start|>assistant\n"))
    for k in range(1, len(turns), 2):
        start = len(tokenize_chat(tokenizer, turns[:k], where))     # the answer starts right after the header
        answer = _encode(tokenizer, turns[k] + "<|im_end|>\n")
        if ids[start:start + len(answer)] != answer:
            raise ValueError(f"{where}: answer {k // 2 + 1} is tokenised differently inside the conversation than "
                             "on its own; remove special tokens from the answer text")
        lo, hi = (start - header, start + len(answer)) if rule == "released" else (start, start + len(answer) - 1)
        labels[lo:hi] = ids[lo:hi]
    if rule == "released":
        newline = _encode(tokenizer, "\n")
        always = {tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")}
        always |= set(newline) if len(newline) == 1 else set()
        labels = [t if t in always else y for t, y in zip(ids, labels)]
    return ids, labels

@dataclass
class SFTData:
    """Tokenised training records: ids and labels per record (`sft_tokens`), its image and where it came from."""
    ids: list[list[int]]
    labels: list[list[int]]
    images: list[Path]
    source: list[str]

    def __len__(self) -> int:
        return len(self.ids)

def encode_conversations(tokenizer, records: Sequence[data.Conversation],
                         rule: str = "released") -> tuple[SFTData, list[str]]:
    """data.read_conversations' records -> (SFTData, one "where: why" per record that does not tokenise)."""
    rows, problems = [], []
    for rec in records:
        try:
            rows.append((*sft_tokens(tokenizer, rec.turns, rule, rec.where), rec.image, rec.where))
        except ValueError as e:
            problems.append(str(e) if str(e).startswith(rec.where) else f"{rec.where}: {e}")
    return SFTData(*([row[column] for row in rows] for column in range(4))), problems

def sft_loss(model: LlavaOneVision, pixels: torch.Tensor, ids: Sequence[Sequence[int]],
             labels: Sequence[Sequence[int]], tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """The fine-tuning loss of the reward models (Sec. 3.2, 4, 5), HF's causal-LM loss as in the released fine-tune:
    mean next-token cross-entropy over the labelled tokens, the only logits computed. Returns (loss, stats).
    `tokens`: when these examples are one process's share of a batch, the batch's labelled tokens
    (`sft_token_count`), so that the mean is the batch's and the shares' losses and stats add up to it."""
    x, lengths = model.splice(ids, model.encode_images(pixels))
    states: list[torch.Tensor] = []
    model.lm(x, lengths, None, states, model.gradient_checkpointing)  # states[-1]: final-normed, every position
    target = torch.full(x.shape[:2], IGNORE, dtype=torch.long)
    for b, (t, y) in enumerate(zip(ids, labels)):
        p = list(t).index(IMAGE_PLACEHOLDER)
        row = list(y[:p]) + [IGNORE] * model.cfg.n_image_tokens + list(y[p + 1:])
        target[b, :len(row)] = torch.tensor(row)
    target = target[:, 1:].to(x.device)             # the state at position t predicts token t + 1
    scored = target != IGNORE
    tokens = tokens or int(scored.sum())
    logits = model.lm.logits(states[-1][:, :-1][scored])
    loss = F.cross_entropy(logits, target[scored], reduction="sum") / tokens
    accuracy = (logits.argmax(-1) == target[scored]).float().sum() / tokens
    return loss, {"loss": loss.item(), "token_accuracy": accuracy.item(), "tokens": int(scored.sum())}

def sft_token_count(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> int:
    """The tokens `sft_loss` scores in these examples: every labelled one but a sequence's first (no state
    predicts it); the image placeholder's label is never scored."""
    count = 0
    for t, row in zip(ids, labels):
        p = list(t).index(IMAGE_PLACEHOLDER)
        count += sum(1 for i, y in enumerate(row) if i and i != p and y != IGNORE)
    return count

# ---- 6. New checkpoints in the lmms-lab format: the tiny random one (`--tiny`), a world's untrained one -------

def question_texts(prompts: Sequence[str]) -> list[str]:
    """Every question the verifier is asked about each prompt (Sec. 3.2, 4, 5), prompt by prompt."""
    return [q for p in prompts for q in (orm_question(p), prm_question(p), clarity_question(p), POTENTIAL_FOLLOW_UP,
                                         reflection_question(p))]

def chat_tokenizer(corpus: Sequence[str], vocab_size: int, where: str):
    """A Qwen2-style byte-level BPE tokenizer trained on `corpus`, then Qwen2's chat tokens, checked."""
    # answers start right after "assistant\n", so the answer tokens carry no leading space, as in Qwen2's vocab
    tok = data.train_tiny_bpe(list(corpus) + ["yes", "no", "Yes", "No"] * 20, vocab_size, qwen_style=True)
    tok.add_special_tokens(list(CHAT_TOKENS))
    check_tokenizer(tok, where)
    return tok

def world_tokenizer(prompts: Sequence[str], question_prompts: Sequence[str], answers: Sequence[str],
                    vocab_size: int = 1024):
    """A miniature world's text tokenizer (README: The paper in miniature): its prompts, the chat the verifier
    reads for every question, cut at its special tokens and <image> as `tokenize_chat` cuts it, and the answers
    (PARM++ reasons). `vocab_size` is above the world's ~600 pieces, so every word becomes one token and the
    counts only order the merges: questions over `question_prompts` (a sample covering every template) then give
    the tokens that questions over every prompt give, in 0.2 s instead of 5 s."""
    special = re.compile("|".join(re.escape(t) for t in CHAT_TOKENS + (IMAGE_TOKEN,)))
    chats = [chunk for q in question_texts(question_prompts) for chunk in special.split(render_chat(q)) if chunk]
    return chat_tokenizer([*prompts, *chats, *answers], vocab_size, "the world tokenizer")

def _tiny_model(cfg: LlavaConfig, tok, gen: torch.Generator) -> LlavaOneVision:
    """Random weights, rounded to bf16. The `yes`/`no` lm_head rows point along the mean answer-position state
    of a few judgments, so that yes/no dominate there as in the fixtures (random weights give them ~0)."""
    model = LlavaOneVision(cfg)
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            w = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            # larger query/key weights give peaked attention, so that positions and masks change the output
            # (with std 0.02 attention is nearly uniform and a wrong position or cache row would go unnoticed)
            scale = 12 if name.endswith(("q_proj.weight", "k_proj.weight")) or name == "image_newline" else 1
            w = 0.02 * scale * torch.randn(p.shape, generator=gen)
        p.data = w.bfloat16().float()
    verifier = Verifier(model, tok)
    images = [torch.rand(3, 64, 64, generator=gen) * 2 - 1 for _ in range(3)]
    qs = [orm_question("a photo of a red apple"), clarity_question("a photo of two dogs"),
          potential_question("a photo of a cat")]
    with torch.inference_mode():
        m = verifier._prefill(images, qs, None)[0].mean(0)
    model.lm.lm_head.weight.data[verifier.yes_id] = m * (7.0 / m.dot(m))
    model.lm.lm_head.weight.data[verifier.no_id] = m * (6.3 / m.dot(m))
    return model

def new_llava(cfg: LlavaConfig, gen: torch.Generator, std: float = 0.02) -> LlavaOneVision:
    """A LLaVA-OneVision to train from scratch (a miniature world's verifier), fp32, with GPT-2's initialisation
    as the world's Show-o gets it: weights ~ N(0, std), norms 1, biases 0."""
    model = LlavaOneVision(cfg)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
        else:
            p.data = torch.zeros(p.shape) if name.endswith("bias") else std * torch.randn(p.shape, generator=gen)
    return model

def write_tiny_llava(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A deterministic tiny random LLaVA-OneVision in the lmms-lab format, as two bf16 shards with an index."""
    corpus = data.tiny_corpus() + question_texts(("a photo of a red apple", "a photo of two dogs",
                                                  "a photo of a cat left of a bench"))
    tok = chat_tokenizer([c.replace(IMAGE_TOKEN, "") for c in corpus], 400, "the tiny tokenizer")
    cfg = replace(LlavaConfig.from_preset("tiny"), n_vocab=tok.get_vocab_size(with_added_tokens=True))
    gen = torch.Generator().manual_seed(seed)
    return write_llava(out_dir, tok, _tiny_model(cfg, tok, gen), gen)

def write_llava(out_dir: str | os.PathLike, tok, model: LlavaOneVision, gen: torch.Generator,
                dtype: torch.dtype = torch.bfloat16) -> Path:
    """A new checkpoint of `model` (its config: model.cfg) and `tok` in the lmms-lab layout of the paper's, as
    `dtype` shards of the LM and the vision tower with an index; `save_verifier` and `load_verifier` take it."""
    out, cfg = Path(out_dir), model.cfg
    state = lmms_lab_state(model, dtype)
    for k in (k for k in VOCAB_KEYS if k in state):  # padded vocabulary rows, as real ones store (152064 > 151646)
        state[k] = torch.cat((state[k], 0.02 * torch.randn(cfg.vocab_size - cfg.n_vocab, cfg.hidden_size,
                                                           generator=gen).to(dtype)))
    save_shards([{k: state[k] for k in sorted(state) if "vision_tower" not in k},
                 {k: state[k] for k in sorted(state) if "vision_tower" in k}], out)
    eot, im_end, v = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>"), cfg.vision
    configs = {"config.json": {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_sliding_window": False,
        "max_position_embeddings": 32768, "bos_token_id": eot, "eos_token_id": im_end,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "mm_vision_tower": f"google/siglip-so400m-patch{v.patch_size}-{v.image_size}", "mm_hidden_size": v.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad", "mm_newline_position": "grid", "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [[v.image_size * i, v.image_size * j] for i in range(1, 7) for j in range(1, 7)],
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "tokenizer_model_max_length": 32768, "tokenizer_padding_side": "right",
    }, "vision_tower/config.json": {
        "architectures": ["SigLipVisionModel"], "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.n_layer + 1,  # the hub config counts the layer LLaVA deletes
        "num_attention_heads": v.n_head, "image_size": v.image_size, "patch_size": v.patch_size,
        "layer_norm_eps": v.layer_norm_eps, "num_channels": 3,
    }, "generation_config.json": {
        "bos_token_id": eot, "do_sample": True, "eos_token_id": [im_end, eot], "pad_token_id": eot,
        "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
    }}
    for name, config in configs.items():
        data.write_json(config, out / name)
    with data.atomic_path(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    return out
