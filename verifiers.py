"""LLaVA-OneVision as the yes/no reward model behind ORM, PRM, PARM and PARM++.

The paper (Sec. 3.2, 4, 5) asks LLaVA-OneVision one question about one image and reads the probability of the
first answer token being "yes" or "no". This file holds the whole model, written from scratch:

    pixels [B,3,384,384] -> SigLIP (kept layers, no post-LN, no head) -> [B,729,Dv]
                         -> mlp2x_gelu projector -> [B,729,H] ++ image_newline -> [B,730,H]
    chat text split at <image>, each chunk tokenised on its own, the 730 rows spliced in
                         -> Qwen2 (GQA, q/k/v bias, RoPE, RMSNorm) -> logits at the answer position only

`Verifier` wraps it into judgments (batched, one forward per judgment), the PARM two-turn conversation with a
reusable KV cache, and greedy reflection text for PARM++. `load_verifier` reads the lmms-lab / LLaVA-NeXT
layout (what the paper's `orm_ft` and `parm` checkpoints use) and the llava-hf layouts. Facts and their sources:
`shared/reference/llava_onevision.md`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import data
from data import CheckpointError

IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER = -200  # LLaVA's IMAGE_TOKEN_INDEX: marks where the image rows go in a token list
SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
PAD_FILL = (127, 127, 127)  # int(0.5 * 255): the grey expand2square pads with
# HF `GenerationConfig` defaults, which apply when a checkpoint ships no generation_config.json
HF_DEFAULT_TOP_K, HF_DEFAULT_TOP_P = 50, 1.0


# ----------------------------------------------------------------------------------------------------------
# configuration


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
    n_vocab: int | None = None     # rows used: len(tokenizer), as the original loader truncates (None = all)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
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
        """lmms-lab llava-onevision-qwen2-{0.5b,7b}-ov, and the tiny model `write_tiny_llava` writes."""
        return {
            "0.5b": LlavaConfig(),
            "7b": LlavaConfig(hidden_size=3584, intermediate_size=18944, n_layer=28, n_head=28, n_kv_head=4,
                              vocab_size=152064, tie_word_embeddings=False),
            "tiny": LlavaConfig(hidden_size=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2,
                                vocab_size=448, tie_word_embeddings=False,
                                vision=VisionConfig(hidden_size=32, intermediate_size=64, n_layer=2, n_head=2)),
        }

    @classmethod
    def from_preset(cls, name: str) -> "LlavaConfig":
        presets = cls.presets()
        if name not in presets:
            raise ValueError(f"unknown LLaVA preset {name!r}: use one of {', '.join(presets)}")
        return presets[name]

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | os.PathLike) -> "LlavaConfig":
        """Build the config from a checkpoint folder's config.json (either layout).

        lmms-lab: the LM fields are top level and the vision tower is SigLIP so400m, hard-coded by LLaVA; a
        `vision_tower/config.json` (the hub copy, which still counts the deleted last layer) overrides it.
        llava-hf: `text_config` / `vision_config`, with Qwen2Config / SiglipVisionConfig defaults for absent
        fields, and the vision layer count is already the kept one (vision_feature_layer -1)."""
        ckpt_dir = Path(ckpt_dir)
        cfg = data.read_config(ckpt_dir)
        kind = cfg.get("model_type")
        if kind in ("llava", "llava_qwen"):
            text = cfg
            tower = str(cfg.get("mm_vision_tower") or "siglip")
            if "siglip" not in tower.lower():
                raise CheckpointError(f"{ckpt_dir}/config.json names vision tower {tower!r}: only the SigLIP "
                                      "tower of LLaVA-OneVision is supported")
            if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
                raise CheckpointError(f"{ckpt_dir}/config.json has mm_projector_type "
                                      f"{cfg['mm_projector_type']!r}: only mlp2x_gelu (LLaVA-OneVision) is supported")
            if (ckpt_dir / "vision_tower" / "config.json").is_file():
                vis = data.read_config(ckpt_dir / "vision_tower")
                vision = _vision_from_hf(vis, kept=_get(vis, "num_hidden_layers", 27) - 1)
            else:
                vision = VisionConfig()
            if "mm_hidden_size" in cfg and cfg["mm_hidden_size"] != vision.hidden_size:
                raise CheckpointError(f"{ckpt_dir}/config.json has mm_hidden_size {cfg['mm_hidden_size']} but the "
                                      f"vision tower has hidden size {vision.hidden_size}: fix vision_tower/config.json")
            tie = text.get("tie_word_embeddings", False)
        elif kind == "llava_onevision":
            text = dict(cfg.get("text_config") or {})
            vis = dict(cfg.get("vision_config") or {})
            layer, strategy = cfg.get("vision_feature_layer", -1), cfg.get("vision_feature_select_strategy", "full")
            if layer != -1 or strategy != "full":
                raise CheckpointError(f"{ckpt_dir}/config.json has vision_feature_layer={layer}, "
                                      f"vision_feature_select_strategy={strategy!r}: only -1 / 'full' (what the "
                                      "llava-hf LLaVA-OneVision conversion writes) is supported")
            defaults = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "image_size": 224, "patch_size": 16}
            vis = {**defaults, **vis}
            vision = _vision_from_hf(vis, kept=vis["num_hidden_layers"])
            text = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "rope_theta": 10000.0, **text}
            tie = text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
        else:
            raise CheckpointError(f"{ckpt_dir}/config.json has model_type {kind!r}: this is not a LLaVA-OneVision "
                                  "checkpoint (expected 'llava' or 'llava_qwen' from lmms-lab, or "
                                  "'llava_onevision' from llava-hf)")
        if text.get("use_sliding_window", False):
            raise CheckpointError(f"{ckpt_dir}/config.json enables sliding-window attention, which LLaVA-OneVision "
                                  "does not use: set use_sliding_window to false")
        # rope_scaling is ignored on purpose: LLaVA-NeXT's Qwen2 loader forces it to None
        rope = text.get("rope_parameters") or {}
        n_head = text["num_attention_heads"]
        return cls(hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
                   n_layer=text["num_hidden_layers"], n_head=n_head,
                   n_kv_head=text.get("num_key_value_heads") or n_head, vocab_size=text["vocab_size"],
                   rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
                   rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(tie), vision=vision)


def _get(d: dict, key: str, default):
    v = d.get(key)
    return default if v is None else v


def _vision_from_hf(vis: dict, kept: int) -> VisionConfig:
    act = vis.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise CheckpointError(f"SigLIP vision config has hidden_act {act!r}: LLaVA-OneVision's tower uses "
                              "gelu_pytorch_tanh")
    return VisionConfig(hidden_size=_get(vis, "hidden_size", 1152),
                        intermediate_size=_get(vis, "intermediate_size", 4304), n_layer=kept,
                        n_head=_get(vis, "num_attention_heads", 16), image_size=_get(vis, "image_size", 384),
                        patch_size=_get(vis, "patch_size", 14),
                        layer_norm_eps=float(_get(vis, "layer_norm_eps", 1e-6)))


# ----------------------------------------------------------------------------------------------------------
# SigLIP vision tower (Sec. 2 of the fact sheet)


class Module(nn.Module):
    """A plain container, so parameter names follow the checkpoints' nesting (embeddings.patch_embedding...)."""


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.n_head
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
        self.mlp = Module()
        self.mlp.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.mlp.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x)), approximate="tanh"))


class SiglipTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.embeddings.position_embedding = nn.Embedding(cfg.n_patches, cfg.hidden_size)
        self.encoder = Module()
        self.encoder.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.n_layer))
        # stored in every checkpoint but never applied: LLaVA takes the last kept layer's raw output
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def embed(self, pixels):  # [B, 3, S, S] -> [B, P, D], patches in row-major order
        x = self.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        return x + self.embeddings.position_embedding.weight

    def forward(self, pixels):
        x = self.embed(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# Qwen2 language model (Sec. 4 of the fact sheet), with a KV cache that tolerates ragged batches


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
    """Keys/values of every layer, [n_layer, B, n_kv, capacity, head_dim], plus which columns hold real tokens.

    Rows of a batch have different lengths. A forward writes T new columns for all rows; row b's real ones are
    its first n_new[b] (right padding), so padding can sit in the middle of a row after an extension. `valid`
    masks it out of attention, and `next_pos` keeps each row's RoPE positions contiguous over its real tokens."""

    def __init__(self, n_layer, batch, n_kv, head_dim, capacity, dtype, device):
        shape = (n_layer, batch, n_kv, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
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

    def row(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row b's keys/values as views [n_layer, n_kv, len, hd]; valid only for a cache holding one prefill."""
        n = int(self.next_pos[b])
        return self.k[:, b, :, :n], self.v[:, b, :, :n]


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.q_proj = nn.Linear(H, cfg.n_head * hd)
        self.k_proj = nn.Linear(H, cfg.n_kv_head * hd)
        self.v_proj = nn.Linear(H, cfg.n_kv_head * hd)
        self.o_proj = nn.Linear(cfg.n_head * hd, H, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)     # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv_head, -1).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv_head, -1).transpose(1, 2)
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
        self.mlp = Module()
        self.mlp.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class Qwen2LM(nn.Module):
    def __init__(self, cfg: LlavaConfig, tied: bool | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.n_vocab, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        tied = cfg.tie_word_embeddings if tied is None else tied
        # a tied checkpoint (0.5B) stores no lm_head: the output projection reads embed_tokens.weight
        self.lm_head = None if tied else nn.Linear(cfg.hidden_size, cfg.n_vocab, bias=False)

    def forward(self, x, n_new: torch.Tensor, cache: KVCache | None = None, trace: list | None = None):
        """Run the new positions x [B, T, H]; row b's real ones are its first n_new[b].

        Returns the final-normed hidden state at each row's last real position [B, H]: the answer position,
        the only place the reward reads logits. `trace`, when given, receives the residual stream of every
        layer in HF's hidden_states convention (embeddings, ..., norm(last layer))."""
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
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
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


# ----------------------------------------------------------------------------------------------------------
# LLaVA-OneVision: tower + projector + image_newline + LM


class LlavaOneVision(nn.Module):
    def __init__(self, cfg: LlavaConfig, tied: bool | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision = SiglipTower(cfg.vision)
        self.projector = Module()
        self.projector.linear_1 = nn.Linear(cfg.vision.hidden_size, cfg.hidden_size)
        self.projector.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.image_newline = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.lm = Qwen2LM(cfg, tied)

    def encode_images(self, pixels):
        """[B, 3, S, S] -> the spliced image rows [B, P + 1, H]."""
        f = self.vision(pixels)                                                         # [B, P, Dv]
        x = self.projector.linear_2(F.gelu(self.projector.linear_1(f)))                 # exact-erf GELU
        # "pad" mode gives one 27x27 view, so spatial_unpad appends image_newline once, not once per row
        return torch.cat((x, self.image_newline.expand(x.shape[0], 1, -1).to(x.dtype)), dim=1)

    def splice(self, ids: Sequence[Sequence[int]], images: torch.Tensor):
        """Token lists (one IMAGE_PLACEHOLDER each) + image rows [B, P+1, H] -> right-padded embeddings
        [B, T, H] and the real lengths [B]."""
        n_img = images.shape[1]
        lengths = [len(t) - 1 + n_img for t in ids]
        x = images.new_zeros(len(ids), max(lengths), self.cfg.hidden_size)
        for b, t in enumerate(ids):
            p = t.index(IMAGE_PLACEHOLDER)
            text = torch.tensor(t[:p] + t[p + 1:], device=x.device)
            e = self.lm.embed_tokens(text)
            x[b, :p] = e[:p]
            x[b, p:p + n_img] = images[b]
            x[b, p + n_img:lengths[b]] = e[p:]
        return x, torch.tensor(lengths, device=x.device)


# ----------------------------------------------------------------------------------------------------------
# prompts (Sec. 3.2, 4, 5) and the qwen_1_5 chat template


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
    """Sec. 4, PARM, task 2: potential assessment. As in the released `selector.potential_assessment` it is a
    two-turn conversation: the clarity question, the assistant's "yes", then the follow-up (no new image)."""
    return (clarity_question(prompt), "yes", POTENTIAL_FOLLOW_UP)


def reflection_question(prompt: str) -> str:
    """Sec. 5, PARM++: reflection evaluation. This wording is ours: the released code has no PARM++ and the
    paper prints no prompt. It asks for "yes" when the image passes, otherwise "no" plus the reason."""
    return (f"{IMAGE_TOKEN} This image is generated by a prompt: {prompt}. Does this image accurately represent "
            "the prompt? If it does, answer yes. If it does not, answer no and explain in one sentence which "
            "objects, counts, colors, positions or attributes in the image do not match the prompt.")


Question = str | Sequence[str]


def render_chat(turns: Question, system: str = SYSTEM_PROMPT) -> str:
    """The qwen_1_5 ChatML string of LLaVA-NeXT's `conv_qwen`, ending with the open assistant turn.

    `turns` is one user message, or messages alternating user, assistant, ..., user."""
    turns = [turns] if isinstance(turns, str) else list(turns)
    if len(turns) % 2 == 0 or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"a conversation must be strings alternating user, assistant, ..., user (an odd count), "
                         f"got {len(turns)} turn(s)")
    out = f"<|im_start|>system\n{system}<|im_end|>\n"
    for i, text in enumerate(turns):
        out += f"<|im_start|>{('user', 'assistant')[i % 2]}\n{text}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def tokenize_chat(tokenizer, turns: Question, where: str = "question") -> list[int]:
    """Render, split at <image>, tokenise each chunk on its own (no BOS) and join with IMAGE_PLACEHOLDER,
    as LLaVA's `tokenizer_image_token` does."""
    text = render_chat(turns)
    n = text.count(IMAGE_TOKEN)
    if n != 1:
        raise ValueError(f"{where} has {n} {IMAGE_TOKEN} placeholders: the verifier takes exactly one image per "
                         f"question, so put one {IMAGE_TOKEN} in the user text (e.g. orm_question(prompt))")
    before, after = text.split(IMAGE_TOKEN)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    return enc(before) + [IMAGE_PLACEHOLDER] + enc(after)


# ----------------------------------------------------------------------------------------------------------
# image preprocessing ("pad" aspect, what selector.py forces)


def as_pil(image, where: str = "image"):
    """A PIL RGB image from a PIL image, a float tensor [3,H,W] in [-1,1] (MAGVIT's decode; converted to uint8
    by clamping and truncating as Show-o saves its PNGs, which is lossless to round-trip) or uint8 [H,W,3]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{where} is a float tensor of shape {list(image.shape)}: pass [3, H, W] in [-1, 1]")
        return Image.fromarray(data.to_uint8_image(image[None].detach())[0])
    if isinstance(image, (torch.Tensor, np.ndarray)):
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"{where} is an array of dtype {arr.dtype} and shape {list(arr.shape)}: pass uint8 "
                             "[H, W, 3], a float tensor [3, H, W] in [-1, 1], or a PIL image")
        return Image.fromarray(np.ascontiguousarray(arr))
    raise TypeError(f"{where} is a {type(image).__name__}, not an image: pass a PIL image, a float tensor "
                    "[3, H, W] in [-1, 1] or a uint8 array [H, W, 3] (use data.load_image for a file)")


def preprocess(image, size: int = 384, where: str = "image") -> torch.Tensor:
    """LLaVA "pad" preprocessing -> float32 [3, size, size] in [-1, 1].

    expand2square onto grey 127 (centred), PIL BICUBIC on uint8, then x * (1/255) in float64 -> float32 and
    (x - 0.5) / 0.5 in float32, the exact arithmetic of LLaVA's SigLipImageProcessor."""
    from PIL import Image

    im = as_pil(image, where)
    w, h = im.size
    if w != h:
        canvas = Image.new("RGB", (max(w, h),) * 2, PAD_FILL)
        canvas.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        im = canvas
    x = np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------------
# the released code's first-token warpers


def released_filter(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """What `generate()` does to the first token's logits in the released selector: HF's TopK then TopP warpers
    (transformers 4.40 semantics) with generation_config.json's values; the rest becomes -inf. Temperature is
    1.0 there and the repetition penalty has no history at the first token, so neither applies."""
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


# ----------------------------------------------------------------------------------------------------------
# the reward model


@dataclass
class Judgment:
    """One yes/no judgment. `p_yes` / `p_no` come from the full softmax at the answer position, or from the
    released code's top-k/top-p-filtered distribution when asked for. `answer` is the decided first token,
    lower-cased as the released code compares it ("yes", "no", or whatever other token won)."""
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

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class Verifier:
    """LLaVA-OneVision turned into the paper's yes/no reward model (Sec. 3.2, 4, 5)."""

    def __init__(self, model: LlavaOneVision, tokenizer, generation: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        generation = generation or {}
        self.top_k = generation.get("top_k", HF_DEFAULT_TOP_K)
        self.top_p = generation.get("top_p", HF_DEFAULT_TOP_P)
        self.yes_id, self.no_id = (tokenizer.token_to_id(t) for t in ("yes", "no"))
        # work counters, for tests and traces
        self.tokens_processed = 0   # LM positions run (text + image rows, padding excluded)
        self.images_encoded = 0
        self.forwards = 0

    @property
    def device(self) -> torch.device:
        return self.model.image_newline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.image_newline.dtype

    # -- inputs

    def tokenize(self, question: Question, where: str = "question") -> list[int]:
        return tokenize_chat(self.tokenizer, question, where)

    def pixels(self, images) -> torch.Tensor:
        images = self._as_list(images, "images")
        size = self.model.cfg.vision.image_size
        return torch.stack([preprocess(im, size, f"image {i}") for i, im in enumerate(images)])

    @staticmethod
    def _as_list(x, what: str) -> list:
        if isinstance(x, torch.Tensor) and x.dim() == 4:  # a decoded batch [B, 3, H, W]
            return list(x)
        if not isinstance(x, (list, tuple)):
            raise TypeError(f"{what} must be a list with one entry per image, got a {type(x).__name__}")
        return list(x)

    # -- core passes

    def _prefill(self, images, questions, cache_extra: int | None = 0, trace: list | None = None):
        """Encode the images and run the spliced conversations. Returns the answer-position states [B, H], the
        positions run per row, the KV cache (room for `cache_extra` more columns; None = keep no cache) and
        the token lists."""
        images, questions = self._as_list(images, "images"), self._as_list(questions, "questions")
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images and {len(questions)} questions: pass one question per image")
        if not images:
            raise ValueError("no images to judge: pass at least one image and question")
        ids = [self.tokenize(q, f"question {i}") for i, q in enumerate(questions)]
        pixels = self.pixels(images).to(self.device, self.dtype)
        x, n_new = self.model.splice(ids, self.model.encode_images(pixels))
        cache = None if cache_extra is None else self.model.lm.new_cache(len(ids), x.shape[1] + cache_extra)
        h = self.model.lm(x, n_new, cache, trace)
        self._count(n_new, images=len(images))
        return h, n_new, cache, ids

    def _extend(self, cache: KVCache, tokens: Sequence[Sequence[int]]):
        """Append text tokens (ragged, at least one per row) to every row of `cache`."""
        n_new = torch.tensor([len(t) for t in tokens], device=self.device)
        pad = torch.zeros(len(tokens), int(n_new.max()), dtype=torch.long, device=self.device)
        for b, t in enumerate(tokens):
            pad[b, :len(t)] = torch.tensor(t, device=self.device)
        h = self.model.lm(self.model.lm.embed_tokens(pad), n_new, cache)
        self._count(n_new)
        return self.model.lm.logits(h), n_new

    def _count(self, n_new, images: int = 0):
        self.tokens_processed += int(n_new.sum())
        self.images_encoded += images
        self.forwards += 1

    @torch.inference_mode()
    def answer_logits(self, images, questions, trace: list | None = None) -> torch.Tensor:
        """Raw next-token logits at the answer position [B, n_vocab] (fp32), one batched forward."""
        return self.model.lm.logits(self._prefill(images, questions, None, trace)[0])

    def _decide(self, logits, n_new, decide: str, generator, released_scores: bool) -> list[Judgment]:
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

    # -- judgments

    @torch.inference_mode()
    def judge(self, images, questions, *, decide: str = "greedy", generator: torch.Generator | None = None,
              released_scores: bool = False) -> list[Judgment]:
        """Sec. 3.2 / 4: one yes/no judgment per (image, question), all in one forward.

        `images`: PIL images, float tensors [3,H,W] in [-1,1] or uint8 [H,W,3] arrays. `questions`: user texts
        with one <image> (see orm_question & co.) or multi-turn conversations (see potential_question).
        `decide="greedy"` takes the most likely first token; `"sample"` draws it from the top-k/top-p-filtered
        distribution with `generator`, as the released code does. `released_scores=True` reports the filtered
        probabilities the released code reads (they saturate at 1.0) instead of the full softmax."""
        h, n_new, _, _ = self._prefill(images, questions, None)
        return self._decide(self.model.lm.logits(h), n_new, decide, generator, released_scores)

    def judge_orm(self, images, prompts: Sequence[str], **kw) -> list[Judgment]:
        """Sec. 3.2, ORM (and PARM task 3, best-of-N' selection): does the final image match the prompt?"""
        return self.judge(images, [orm_question(p) for p in prompts], **kw)

    def judge_prm(self, images, prompts: Sequence[str], **kw) -> list[Judgment]:
        """Sec. 3.2, PRM: does this intermediate step's image match the prompt?"""
        return self.judge(images, [prm_question(p) for p in prompts], **kw)

    @torch.inference_mode()
    def judge_clarity(self, images, prompts: Sequence[str], *, decide: str = "greedy",
                      generator: torch.Generator | None = None, released_scores: bool = False):
        """Sec. 4, PARM, task 1: clarity judgment of a step's image. Returns the judgments and one TurnCache per
        image, which `judge_potential` extends so that the image and the first turn are not run again."""
        questions = [clarity_question(p) for p in self._as_list(prompts, "prompts")]
        h, n_new, cache, ids = self._prefill(images, questions)
        handles = [TurnCache(tuple(t), *cache.row(b)) for b, t in enumerate(ids)]
        return self._decide(self.model.lm.logits(h), n_new, decide, generator, released_scores), handles

    @torch.inference_mode()
    def judge_potential(self, handles: Sequence[TurnCache], prompts: Sequence[str], **kw) -> list[Judgment]:
        """Sec. 4, PARM, task 2: potential assessment, the follow-up turn after the clarity "yes". Only the new
        tokens (the assistant's "yes" and the second user turn) are run, on top of each image's cached turn."""
        return self.judge_followup(handles, [potential_question(p) for p in self._as_list(prompts, "prompts")], **kw)

    @torch.inference_mode()
    def judge_followup(self, handles: Sequence[TurnCache], conversations: Sequence[Question], *,
                       decide: str = "greedy", generator: torch.Generator | None = None,
                       released_scores: bool = False) -> list[Judgment]:
        """Judge conversations that extend cached ones: the longest shared token prefix is reused, the rest run."""
        handles, conversations = list(handles), self._as_list(conversations, "conversations")
        if len(handles) != len(conversations):
            raise ValueError(f"got {len(handles)} cache handles and {len(conversations)} conversations: pass one "
                             "per handle")
        reuse, tails = [], []
        for i, (hnd, conv) in enumerate(zip(handles, conversations)):
            if not isinstance(hnd, TurnCache):
                raise TypeError(f"handle {i} is a {type(hnd).__name__}: pass the TurnCache objects judge_clarity "
                                "returned")
            ids = self.tokenize(conv, f"conversation {i}")
            c = next((j for j, (a, b) in enumerate(zip(hnd.ids, ids)) if a != b), min(len(hnd.ids), len(ids)))
            c = min(c, len(ids) - 1)  # the answer position must be run to get its logits
            p = ids.index(IMAGE_PLACEHOLDER)
            if c <= p:
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
        return self._decide(logits, n_new, decide, generator, released_scores)

    @torch.inference_mode()
    def reflect(self, images, prompts: Sequence[str], max_new_tokens: int = 64,
                stop_tokens: Sequence[str] = STOP_TOKENS) -> list[str]:
        """Sec. 5, PARM++: reflection evaluation. Greedy, KV-cached text generation answering
        `reflection_question(prompt)`: "yes" when the image passes, otherwise the reason it fails. Generation
        stops at a stop token or after `max_new_tokens`."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least one token")
        stop = {self.tokenizer.token_to_id(t) for t in stop_tokens} - {None}
        questions = [reflection_question(p) for p in self._as_list(prompts, "prompts")]
        h, _, cache, _ = self._prefill(images, questions, max_new_tokens - 1)
        logits = self.model.lm.logits(h)
        out: list[list[int]] = [[] for _ in questions]
        done = torch.zeros(len(questions), dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            tok = logits.argmax(-1)
            for b, t in enumerate(tok.tolist()):
                if not done[b] and t not in stop:
                    out[b].append(t)
            done |= torch.isin(tok, torch.tensor(sorted(stop), device=self.device, dtype=tok.dtype))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits, _ = self._extend(cache, tok[:, None].tolist())
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]


# ----------------------------------------------------------------------------------------------------------
# loading


# Each layout: where our module's tensors live in the checkpoint (first matching module prefix wins).
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    # lmms-lab / LLaVA-NeXT (LlavaQwenForCausalLM): the paper's orm_ft and parm, lmms-lab/llava-onevision-*
    "lmms-lab": (("lm.lm_head.", "lm_head."), ("lm.", "model."),
                 ("vision.", "model.vision_tower.vision_tower.vision_model."),
                 ("projector.linear_1.", "model.mm_projector.0."), ("projector.linear_2.", "model.mm_projector.2."),
                 ("image_newline", "model.image_newline")),
    # llava-hf as on the hub (llava-hf/llava-onevision-qwen2-*-ov-hf), saved by transformers 4.45-4.51
    "llava-hf": (("lm.lm_head.", "language_model.lm_head."), ("lm.", "language_model.model."),
                 ("vision.", "vision_tower.vision_model."), ("projector.", "multi_modal_projector."),
                 ("image_newline", "image_newline")),
    # llava-hf, saved by transformers 4.52+
    "llava-hf-4.52": (("lm.lm_head.", "lm_head."), ("lm.", "model.language_model."),
                      ("vision.", "model.vision_tower.vision_model."), ("projector.", "model.multi_modal_projector."),
                      ("image_newline", "model.image_newline")),
}
# transformers 5.x saves the hub names again, but without SigLIP's `vision_model.` level
LAYOUTS["llava-hf-5"] = tuple((m, c.replace("vision_model.", "")) for m, c in LAYOUTS["llava-hf"])


def key_map(module: nn.Module, prefixes: Sequence[tuple[str, str]]) -> dict[str, str]:
    """checkpoint key -> parameter name for every parameter of `module`, renamed by (module, checkpoint)
    prefix pairs; the first pair whose module prefix matches wins."""
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
                          "expected lmms-lab (model.embed_tokens, model.vision_tower.vision_tower...) or llava-hf "
                          "(language_model.model... / model.language_model...); point at a LLaVA-OneVision folder")


def vocab_size_of(tokenizer) -> int:
    """len(tokenizer), which the original loader truncates the LM vocabulary to. llava-hf tokenizers carry the
    converter's <image>/<video> after <|im_end|>; those rows were never part of the LM, so they are dropped."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    while n and tokenizer.id_to_token(n - 1) in ("<image>", "<video>"):
        n -= 1
    return n


def check_tokenizer(tokenizer, where) -> None:
    missing = [t for t in CHAT_TOKENS + ("yes", "no") if tokenizer.token_to_id(t) is None]
    if missing:
        raise CheckpointError(f"the tokenizer in {where} lacks {', '.join(missing)}: LLaVA-OneVision needs Qwen2's "
                              "chat tokens and single-token 'yes'/'no'; use the tokenizer.json shipped with the model")


def load_verifier(ckpt_dir: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                  device: torch.device | str = "cpu") -> Verifier:
    """Load a LLaVA-OneVision checkpoint folder (layout auto-detected) as a reward model.

    The folder holds config.json, the safetensors weights (single file or sharded with an index),
    tokenizer.json and optionally generation_config.json (its top_k/top_p feed the released-score option)."""
    ckpt_dir = Path(ckpt_dir)
    dtype, device = data.parse_dtype(dtype), data.parse_device(device)
    cfg = LlavaConfig.from_checkpoint(ckpt_dir)
    tokenizer = data.load_tokenizer(ckpt_dir)
    check_tokenizer(tokenizer, ckpt_dir)
    n_vocab = vocab_size_of(tokenizer)
    if n_vocab > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer in {ckpt_dir} has {n_vocab} tokens but the model only {cfg.vocab_size} "
                              "embedding rows: the tokenizer belongs to another model")
    cfg = replace(cfg, n_vocab=n_vocab)
    keys = data.find_weight_files(ckpt_dir)
    layout = detect_layout(keys)
    prefixes = LAYOUTS[layout]
    tied = cfg.tie_word_embeddings and dict(prefixes)["lm.lm_head."] + "weight" not in keys
    with torch.device("meta"):
        model = LlavaOneVision(cfg, tied=tied)
    kmap = key_map(model, prefixes)
    rows = {k: n_vocab for k, v in kmap.items() if v in ("lm.embed_tokens.weight", "lm.lm_head.weight")}
    data.load_state(model, ckpt_dir, kmap, dtype=dtype, device=device, row_limit=rows,
                    what=f"LLaVA-OneVision checkpoint ({layout} layout)")
    gen = ckpt_dir / "generation_config.json"
    return Verifier(model, tokenizer, data.read_config(ckpt_dir, gen.name) if gen.is_file() else None)


# ----------------------------------------------------------------------------------------------------------
# a tiny random checkpoint in the official lmms-lab format


def _tiny_tokenizer():
    corpus = data.tiny_corpus()
    for p in ("a photo of a red apple", "a photo of two dogs", "a photo of a cat left of a bench"):
        corpus += [orm_question(p), prm_question(p), clarity_question(p), POTENTIAL_FOLLOW_UP, reflection_question(p)]
    # answers start right after "assistant\n", so the answer tokens carry no leading space, as in Qwen2's vocab
    corpus = [c.replace(IMAGE_TOKEN, "") for c in corpus] + ["yes", "no", "Yes", "No"] * 20
    tok = data.train_tiny_bpe(corpus, 400, qwen_style=True)
    tok.add_special_tokens(list(CHAT_TOKENS))
    check_tokenizer(tok, "the tiny tokenizer")
    return tok


def _random_init(model: nn.Module, gen: torch.Generator, std: float = 0.02):
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.data = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            # larger query/key weights give peaked attention, so that positions and masks change the output
            # (with std 0.02 attention is nearly uniform and a wrong position or cache row would go unnoticed)
            scale = 12 if name.endswith(("q_proj.weight", "k_proj.weight")) or name == "image_newline" else 1
            p.data = std * scale * torch.randn(p.shape, generator=gen)


def write_tiny_llava(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a deterministic tiny random LLaVA-OneVision in the lmms-lab format (sharded bf16 safetensors with
    an index, config.json with the lmms-lab fields, vision_tower/config.json, tokenizer.json,
    generation_config.json). The `yes`/`no` lm_head rows are nudged so that yes/no dominate at the answer
    position, like the fixtures; otherwise random weights put ~0 probability on them."""
    out = Path(out_dir)
    tok = _tiny_tokenizer()
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg = replace(LlavaConfig.from_preset("tiny"), n_vocab=n_vocab)
    gen = torch.Generator().manual_seed(seed)
    model = LlavaOneVision(cfg)
    _random_init(model, gen)
    for p in model.parameters():  # what a bf16 checkpoint will hold
        p.data = p.data.bfloat16().float()
    verifier = Verifier(model, tok)
    # nudge: point the yes/no rows along the mean answer-position state of a few calibration judgments
    images = [torch.rand(3, 64, 64, generator=gen) * 2 - 1 for _ in range(3)]
    qs = [orm_question("a photo of a red apple"), clarity_question("a photo of two dogs"),
          potential_question("a photo of a cat")]
    with torch.inference_mode():
        m = verifier._prefill(images, qs, None)[0].mean(0)
    head = model.lm.lm_head.weight.data
    head[verifier.yes_id] = m * (7.0 / m.dot(m))
    head[verifier.no_id] = m * (6.3 / m.dot(m))

    state = {c: model.get_parameter(p).detach().to(torch.bfloat16)
             for c, p in key_map(model, LAYOUTS["lmms-lab"]).items()}
    pad_rows = cfg.vocab_size - n_vocab  # the checkpoint stores padded rows, as the real ones do (152064 > 151646)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = torch.cat((state[k], 0.02 * torch.randn(pad_rows, cfg.hidden_size, generator=gen).bfloat16()))
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in state.items() if "vision_tower" not in k},
              "model-00002-of-00002.safetensors": {k: v for k, v in state.items() if "vision_tower" in k}}
    for name, tensors in shards.items():
        data.save_state(tensors, out / name)
    data.write_json({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                     "weight_map": {k: n for n, ts in shards.items() for k in sorted(ts)}},
                    out / "model.safetensors.index.json")
    special = {t: tok.token_to_id(t) for t in CHAT_TOKENS}
    v = cfg.vision
    data.write_json({
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": False, "use_sliding_window": False,
        "max_position_embeddings": 32768, "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"], "torch_dtype": "bfloat16",
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": v.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad", "mm_newline_position": "grid", "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "tokenizer_model_max_length": 32768, "tokenizer_padding_side": "right",
    }, out / "config.json")
    data.write_json({
        "architectures": ["SigLipVisionModel"], "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.n_layer + 1,  # the hub config counts the layer LLaVA deletes
        "num_attention_heads": v.n_head, "image_size": v.image_size, "patch_size": v.patch_size,
        "layer_norm_eps": v.layer_norm_eps, "num_channels": 3,
    }, out / "vision_tower" / "config.json")
    data.write_json({"bos_token_id": special["<|endoftext|>"], "do_sample": True,
                     "eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]],
                     "pad_token_id": special["<|endoftext|>"], "repetition_penalty": 1.05, "temperature": 0.7,
                     "top_k": 20, "top_p": 0.8}, out / "generation_config.json")
    with data.atomic_path(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    return out


# ----------------------------------------------------------------------------------------------------------
# fine-tuning the reward model: the fine-tuned ORM/PRM (Sec. 3.2), PARM (Sec. 4) and PARM++ (Sec. 5)
#
# Supervised fine-tuning on LLaVA conversation records (`train.py curate` writes them), as the released
# LLaVA-NeXT recipe does (fact sheet §7): next-token cross-entropy on the assistant turns, AdamW with lr 1e-5
# and 2e-6 for the SigLIP tower, cosine schedule with 3% warm-up, one epoch, gradient clipping at 1.0. The
# batching, schedule, checkpoints and exact resume are the Show-o fine-tunes' (dpo.Trainer).

import functools  # noqa: E402  (this section was added after the others)

import torch.utils.checkpoint  # noqa: E402

import dpo  # noqa: E402

IGNORE = -100
LABEL_RULES = ("released", "answer")


def sft_tokens(tokenizer, turns: Sequence[str], rule: str = "released",
               where: str = "conversation") -> tuple[list[int], list[int]]:
    """Fine-tuning data of the reward models (Sec. 3.2, 4, 5): a training conversation (user, assistant, ...,
    user, assistant) -> token ids (IMAGE_PLACEHOLDER for the image) and labels (IGNORE where no loss is taken), aligned with the ids (the shift happens in `sft_loss`).

    The ids are exactly those the verifier reads at inference (`tokenize_chat`) followed by the last answer and
    its "<|im_end|>\\n". Labels, `rule`:
      "released": LLaVA-NeXT's preprocess_qwen (fact sheet §7): every token of each assistant turn
                  ("<|im_start|>assistant\\n" + answer + "<|im_end|>\\n"), plus every "\\n", <|im_start|> and
                  <|im_end|> token anywhere, system and user turns included (a quirk of the released code).
      "answer":   only each answer's tokens and the <|im_end|> that closes it."""
    if rule not in LABEL_RULES:
        raise ValueError(f"label rule {rule!r}: use one of {', '.join(LABEL_RULES)}")
    turns = list(turns)
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError(f"{where} has {len(turns)} turn(s): it must alternate user, assistant and end with the "
                         "assistant's answer")
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    ids = tokenize_chat(tokenizer, turns[:-1], where) + enc(turns[-1] + "<|im_end|>\n")
    labels = [IGNORE] * len(ids)
    header = len(enc("<|im_start|>assistant\n"))
    for k in range(1, len(turns), 2):
        start = len(tokenize_chat(tokenizer, turns[:k], where))     # the answer starts right after the header
        answer = enc(turns[k] + "<|im_end|>\n")
        if ids[start:start + len(answer)] != answer:
            raise ValueError(f"{where}: answer {k // 2 + 1} is tokenised differently inside the conversation than "
                             "on its own; remove special tokens from the answer text")
        lo, hi = (start - header, start + len(answer)) if rule == "released" else (start, start + len(answer) - 1)
        labels[lo:hi] = ids[lo:hi]
    if rule == "released":
        newline = enc("\n")
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
    """data.read_conversations' records -> SFTData. Returns (data, problems): one "where: why" per record that
    does not tokenise."""
    out, problems = SFTData([], [], [], []), []
    for rec in records:
        try:
            ids, labels = sft_tokens(tokenizer, rec.turns, rule, rec.where)
        except ValueError as e:
            problems.append(str(e) if str(e).startswith(rec.where) else f"{rec.where}: {e}")
            continue
        out.ids.append(ids)
        out.labels.append(labels)
        out.images.append(rec.image)
        out.source.append(rec.where)
    return out, problems


def sft_loss(model: LlavaOneVision, pixels: torch.Tensor, ids: Sequence[Sequence[int]],
             labels: Sequence[Sequence[int]]) -> tuple[torch.Tensor, dict]:
    """The fine-tuning loss of the reward models (Sec. 3.2, 4, 5): next-token cross-entropy of LLaVA-OneVision
    on the labelled tokens of a batch, averaged over those tokens
    (HF's causal-LM loss, which the released fine-tune uses). The image rows are never labelled. Logits are
    computed only where a label is, so the vocabulary-wide matrix stays small. Returns (loss, stats)."""
    x, lengths = model.splice(ids, model.encode_images(pixels))
    states: list[torch.Tensor] = []
    model.lm(x, lengths, None, states)              # states[-1]: the final-normed state at every position
    n_img = model.cfg.n_image_tokens
    target = torch.full(x.shape[:2], IGNORE, dtype=torch.long)
    for b, (t, y) in enumerate(zip(ids, labels)):
        p = list(t).index(IMAGE_PLACEHOLDER)
        row = list(y[:p]) + [IGNORE] * n_img + list(y[p + 1:])
        target[b, :len(row)] = torch.tensor(row)
    target = target[:, 1:].to(x.device)             # the state at position t predicts token t + 1
    scored = target != IGNORE
    logits = model.lm.logits(states[-1][:, :-1][scored])
    loss = F.cross_entropy(logits, target[scored])
    accuracy = (logits.argmax(-1) == target[scored]).float().mean()
    return loss, {"loss": loss.item(), "token_accuracy": accuracy.item(), "tokens": int(scored.sum())}


@dataclass
class SFTConfig(dpo.OptimConfig):
    """The released LLaVA-NeXT fine-tune of ORM/PARM (fact sheet §7; the paper: one epoch, batch 8, lr 1e-5).
    The released run's batch is 8 per GPU on 8 GPUs (64); `cond_dropout` is Show-o's and unused here."""
    lr: float = 1e-5
    vision_lr: float = 2e-6
    freeze_vision: bool = False
    batch_size: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    shuffle: bool = True
    seed: int = 0
    label_rule: str = "released"


def sft_optimizer(model: LlavaOneVision, cfg: SFTConfig) -> torch.optim.AdamW:
    """AdamW with the released parameter groups: `vision_lr` for the SigLIP tower (the released rule: every
    name containing "vision_tower"), `lr` for the projector, image_newline and the LM. Frozen parameters are
    left out. Each group's peak lr is its "base_lr", which dpo.Trainer schedules."""
    vision = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("vision.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("vision.")]
    groups = [{"params": rest, "base_lr": cfg.lr}] + ([{"params": vision, "base_lr": cfg.vision_lr}] if vision else [])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def set_gradient_checkpointing(model: LlavaOneVision, on: bool) -> None:
    """Recompute every SigLIP and Qwen2 layer in the backward pass (less activation memory, same numbers).
    Only the layers' call is wrapped, so parameter names, and with them the saved checkpoints, do not change."""
    for layer in [*model.vision.encoder.layers, *model.lm.layers]:
        if on:
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, type(layer).forward.__get__(layer),
                                              use_reentrant=False)
        else:
            layer.__dict__.pop("forward", None)


class VerifierTrainer(dpo.Trainer):
    """Supervised fine-tuning of the LLaVA-OneVision reward model on conversation records (Sec. 3.2 ORM/PRM,
    Sec. 4 PARM, Sec. 5 PARM++). One optimizer step per batch of `cfg.batch_size` records."""

    def __init__(self, verifier: Verifier, examples: SFTData, cfg: SFTConfig):
        if len(examples) == 0:
            raise data.DataError("no training conversations to fine-tune on")
        model = verifier.model
        for p in model.vision.parameters():
            p.requires_grad_(not cfg.freeze_vision)
        self.verifier, self.max_grad_norm = verifier, cfg.max_grad_norm
        self._setup(model, verifier.tokenizer, examples, cfg, round_index=1, optimizer=sft_optimizer(model, cfg))
        set_gradient_checkpointing(model, cfg.gradient_checkpointing)

    def loss(self, step: int) -> tuple[torch.Tensor, dict]:
        index = self.batch_indices(step)
        ex = self.examples
        pixels = self.verifier.pixels([data.load_image(ex.images[i]) for i in index]).to(self.device)
        with dpo.autocast(self.device, self.cfg.bf16):
            return sft_loss(self.policy, pixels, [ex.ids[i] for i in index], [ex.labels[i] for i in index])


@torch.no_grad()
def evaluate_sft(verifier: Verifier, examples: SFTData, batch: int = 8) -> float:
    """Mean cross-entropy per labelled token over all of `examples` (the same tokens `sft_loss` trains on)."""
    was = verifier.model.training
    verifier.model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch):
        index = range(start, min(start + batch, len(examples)))
        pixels = verifier.pixels([data.load_image(examples.images[i]) for i in index]).to(verifier.device,
                                                                                          verifier.dtype)
        loss, stats = sft_loss(verifier.model, pixels, [examples.ids[i] for i in index],
                               [examples.labels[i] for i in index])
        total += loss.item() * stats["tokens"]
        count += stats["tokens"]
    verifier.model.train(was)
    return total / count


# files of an lmms-lab checkpoint folder that a fine-tune keeps as they are
VERIFIER_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                       "vocab.json", "merges.txt", "generation_config.json", "vision_tower/config.json")


def save_verifier(model: LlavaOneVision, tokenizer, out_dir: str | os.PathLike, like_dir: str | os.PathLike,
                  dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 4 * 2 ** 30) -> Path:
    """Write `model` as an lmms-lab LLaVA-OneVision folder, the layout of the paper's orm_ft/parm checkpoints,
    so that `load_verifier(out_dir)` (and `sample.py --verifier`) reads it: safetensors weights (one
    model.safetensors, or shards of at most `shard_bytes` with model.safetensors.index.json), config.json,
    the tokenizer and generation files and vision_tower/config.json, copied from `like_dir`, the lmms-lab
    checkpoint the model was fine-tuned from. Vocabulary rows past len(tokenizer), which the model never uses,
    are copied from `like_dir` too, so every tensor keeps its stored shape. config.json is written last: a
    folder without it is incomplete and does not load."""
    import shutil

    from safetensors import safe_open

    like, out = Path(like_dir), Path(out_dir)
    files = data.find_weight_files(like)
    if detect_layout(files) != "lmms-lab":
        raise CheckpointError(f"{like} is not in the lmms-lab layout: fine-tune from an lmms-lab LLaVA-OneVision "
                              "checkpoint (e.g. lmms-lab/llava-onevision-qwen2-7b-ov), whose layout the paper's "
                              "checkpoints use")
    state = {c: model.get_parameter(p).detach().to(dtype) for c, p in key_map(model, LAYOUTS["lmms-lab"]).items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state and key in files:
            with safe_open(files[key], framework="pt") as f:
                unused = f.get_slice(key)[state[key].shape[0]:]
            state[key] = torch.cat((state[key].cpu(), unused.to(dtype)))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, tensors in zip(names, shards):
        data.save_state(tensors, out / name)
    if len(shards) > 1:
        data.write_json({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                         "weight_map": {k: n for n, ts in zip(names, shards) for k in ts}},
                        out / "model.safetensors.index.json")
    for name in VERIFIER_SIDE_FILES:
        if (like / name).is_file():
            with data.atomic_path(out / name) as tmp:
                shutil.copyfile(like / name, tmp)
    config = data.read_config(like)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    data.write_json(config, out / "config.json")
    return out
