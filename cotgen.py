"""The paper's generator (Sec. 3.1), Show-o (Phi-1.5, omni-attention) + MAGVIT-v2 with masked parallel decoding and
CFG; the searches ORM / PRM best-of-N (Sec. 3.2), PARM (Sec. 4), PARM++ (Sec. 5); the `--tiny` checkpoints. Originals:
Show-o's (showlab/Show-o) `models/{modeling_showo,phi,sampling,modeling_magvitv2}.py`, `training/prompting_utils.py`,
`inference_t2i.py`; the paper code's (ZiyuGuo99/Image-Generation-CoT) `orm.py`, `parm.py`."""
from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import AddedToken
from torch import nn
from torch.utils.checkpoint import checkpoint

import data
from data import CheckpointError

# ---- 1. Show-o ------------------------------------------------------------------------------------------
# Show-o's nine new tokens, in the order UniversalPrompting (`training/prompting_utils.py`) adds them after [PAD]
SHOWO_SPECIAL_TOKENS = tuple("<|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|>".split())
EOT_TOKEN = "<|endoftext|>"

@dataclass
class ShowoConfig:
    """Show-o = Phi-1.5 resized to Show-o's vocabulary. Defaults: the released 256px showlab/show-o."""
    vocab_size: int = 58498          # Show-o rows: phi text + 10 specials + codebook + [MASK]
    llm_vocab_size: int = 50295      # len(phi tokenizer)
    codebook_size: int = 8192
    num_vq_tokens: int = 256         # image tokens N (16x16 at 256px, 32x32 at 512px)
    num_new_special_tokens: int = 10
    max_seq_length: int = 128        # yaml field; the text part is max_seq_length + 1 slots
    n_layer: int = 24
    n_head: int = 32
    n_embd: int = 2048
    intermediate_size: int = 8192
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    # the kind of generator (config.json's "order"; absent: masked): "masked" is Show-o (masked parallel decoding,
    # bidirectional image attention); "raster" is a LlamaGen-style model on the same layers and layout (ours, the
    # paper's Table 4): causal image attention, next-token prediction, sampled with `temperature` and `top_k`
    # (0: every code), which masked decoding ignores (Paths anneals its own temperature)
    order: str = "masked"
    temperature: float = 1.0
    top_k: int = 0
    token_order: list[int] | None = None   # raster: the image tokens' indices in the order it makes them (None: as
                                           # the image tokenizer lays them out)

    # derived sizes are properties: loading and `write_tiny_showo` set the fields after construction
    head_dim = property(lambda self: self.n_embd // self.n_head)
    rot_dim = property(lambda self: int(self.partial_rotary_factor * self.head_dim))   # rotary dims of a head
    image_offset = property(lambda self: self.llm_vocab_size + self.num_new_special_tokens)  # first image id
    code_ids = property(lambda self: slice(self.image_offset, self.image_offset + self.codebook_size))  # K codes' ids
    mask_token_id = property(lambda self: self.vocab_size - 1)   # as the original constructor recomputes it
    text_len = property(lambda self: self.max_seq_length + 1)
    seq_len = property(lambda self: self.text_len + 1 + self.num_vq_tokens + 1)   # text, soi, N image tokens, eoi

    @classmethod
    def preset(cls, name: str) -> "ShowoConfig":
        presets = {"show-o-256": cls(), "show-o-512": cls(num_vq_tokens=1024),
                   # the built-in tiny model of `--tiny` (vocabulary sizes are those of the tiny BPE tokenizer)
                   "tiny": cls(vocab_size=0, llm_vocab_size=0, codebook_size=64, num_vq_tokens=64, max_seq_length=24,
                               n_layer=2, n_head=4, n_embd=64, intermediate_size=256)}
        if name not in presets:
            raise ValueError(f"unknown Show-o preset {name!r}: use one of {', '.join(presets)}")
        return presets[name]

class ShowoTokenizer:
    """phi-1.5's tokenizer plus Show-o's tokens, and the t2i layout of `training/prompting_utils.py`."""
    def __init__(self, tokenizer, config: ShowoConfig):
        self.tok, self.config = tokenizer, config
        eot = tokenizer.token_to_id(EOT_TOKEN)
        if eot is None:
            raise CheckpointError(f"the phi tokenizer has no {EOT_TOKEN} token: "
                                  "is this the microsoft/phi-1_5 tokenizer?")
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        if n != config.llm_vocab_size:
            raise CheckpointError(f"the phi tokenizer has {n} tokens but Show-o's config says llm_vocab_size = "
                                  f"{config.llm_vocab_size}: use the tokenizer that belongs to this checkpoint")
        tokenizer.add_special_tokens([AddedToken("[PAD]", special=True, normalized=False)])
        tokenizer.add_tokens(list(SHOWO_SPECIAL_TOKENS))
        names = ("[PAD]",) + SHOWO_SPECIAL_TOKENS
        ids = {t: tokenizer.token_to_id(t) for t in names}
        if ids != {t: config.llm_vocab_size + i for i, t in enumerate(names)}:
            raise CheckpointError(f"the phi tokenizer already contains Show-o's tokens at other ids ({ids}): "
                                  "pass the original phi-1.5 tokenizer.json, not a modified copy")
        self.bos_id = self.eos_id = eot
        self.pad_id = ids["[PAD]"]
        self.soi_id, self.eoi_id, self.t2i_id = ids["<|soi|>"], ids["<|eoi|>"], ids["<|t2i|>"]

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """The generator's mask of t2i sequences [B, L]: omni-attention; for a raster generator also causal
        inside image segments (raster order), which leaves text and pads as they are (already causal)."""
        allowed = omni_attention_mask(ids, self.pad_id, self.soi_id, self.eoi_id)
        if self.config.order == "raster":
            allowed = allowed & torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()
        return allowed

    def text_ids(self, prompt: str) -> list[int]:
        """Prompt -> ids: the tokenizer adds no special tokens, then a bos is prepended."""
        ids = self.tok.encode(prompt, add_special_tokens=False).ids
        return ids if ids and ids[0] == self.bos_id else [self.bos_id] + ids

    def is_truncated(self, prompt: str) -> bool:
        return len(self.text_ids(prompt)) + 2 > self.config.text_len

    def image_segment(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N] vocabulary ids -> [B, N+2] with <|soi|> ... <|eoi|> around them."""
        edge = lambda i: torch.full((image_tokens.shape[0], 1), i, dtype=torch.long, device=image_tokens.device)
        return torch.cat([edge(self.soi_id), image_tokens.long(), edge(self.eoi_id)], dim=1)

    def t2i_ids(self, prompts: Sequence[str], image_tokens: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """The t2i sequences [B, L]: text part + <|soi|> + N image ids (vocabulary ids, all [MASK] by default) +
        <|eoi|>. `condition` [B, N] codes: PARM++'s previous image, a second image segment before this one (ours)."""
        c, n, text = self.config, self.config.text_len, []
        for prompt in prompts:
            # [<|t2i|>, bos, text, eos], left-padded with [PAD] to max_seq_length+1, or truncated (eos kept)
            t = [self.t2i_id] + self.text_ids(prompt) + [self.eos_id]
            text.append([self.pad_id] * (n - len(t)) + t if len(t) <= n else t[: n - 1] + [self.eos_id])
        if image_tokens is None:
            image_tokens = torch.full((len(text), c.num_vq_tokens), c.mask_token_id, dtype=torch.long)
        previous = [] if condition is None else [self.image_segment(condition.cpu().long() + c.image_offset)]
        return torch.cat([torch.tensor(text, dtype=torch.long), *previous, self.image_segment(image_tokens.cpu())], 1)

def omni_attention_mask(ids: torch.Tensor, pad_id: int, soi_id: int, eoi_id: int) -> torch.Tensor:
    """Show-o's omni-attention (`create_attention_mask_predict_next`) as a "may attend" mask [B, 1, L, L]: text attends
    causally to non-pad text, an image segment to non-pad text, earlier segments and itself, pads causally to pads."""
    L = ids.shape[1]
    pad = ids == pad_id                                                           # [B, L]
    segment = torch.cumsum(ids == soi_id, 1)                                      # 0 = text before any image
    in_image = segment > torch.cumsum(ids == eoi_id, 1) - (ids == eoi_id).long()
    causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()        # [q, k]
    key_ok = ~pad[:, None, :]                                                     # [B, 1(q), L(k)]
    text_rule = torch.where(pad[:, :, None], causal, causal & key_ok)
    image_rule = key_ok & (segment[:, None, :] <= segment[:, :, None])
    return torch.where(in_image[:, :, None], image_rule, text_rule)[:, None]

def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # the explicit tanh formula of transformers' NewGELUActivation (not F.gelu(approximate="tanh")): bit parity
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

class PhiAttention(nn.Module):
    """Phi-1.5's attention as Show-o's `models/phi.py` modifies it: q/k LayerNorms, partial rotary embedding."""
    def __init__(self, c: ShowoConfig):
        super().__init__()
        self.n_head, self.head_dim, self.rot_dim = c.n_head, c.head_dim, c.rot_dim
        self.q_proj, self.k_proj, self.v_proj, self.dense = (nn.Linear(c.n_embd, c.n_embd) for _ in range(4))
        # Show-o forces qk_layernorm on, whatever phi's config says
        self.q_layernorm, self.k_layernorm = (nn.LayerNorm(c.head_dim, eps=c.layer_norm_eps) for _ in range(2))

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Partial rotary embedding on the first rot_dim dims of each head, rotate-half pairing."""
        x_rot, x_pass = x[..., :self.rot_dim], x[..., self.rot_dim:]
        a, b = x_rot.chunk(2, dim=-1)
        x_rot = x_rot * cos.to(x.dtype) + torch.cat((-b, a), dim=-1) * sin.to(x.dtype)
        return torch.cat((x_rot, x_pass), dim=-1)

    def forward(self, h, cos, sin, allowed, past_kv=None):
        """Attention of the T new positions; `past_kv` are keys/values of earlier positions (the text prefix)."""
        B, T, _ = h.shape
        split = lambda t: t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)   # [B, nh, T, hd]
        q = self.rope(self.q_layernorm(split(self.q_proj(h))), cos, sin)
        k = self.rope(self.k_layernorm(split(self.k_proj(h))), cos, sin)
        v = split(self.v_proj(h))
        new_kv = (k, v)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)              # [B, nh, T, hd]
        return self.dense(y.transpose(1, 2).reshape(B, T, -1)), new_kv

class PhiBlock(nn.Module):
    """Parallel block with one shared LayerNorm: x + attn(LN(x)) + mlp(LN(x)), mlp = fc2(gelu_new(fc1))."""
    def __init__(self, c: ShowoConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps)
        self.self_attn = PhiAttention(c)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(c.n_embd, c.intermediate_size), nn.Linear(c.intermediate_size, c.n_embd)

    def forward(self, x, cos, sin, allowed, past_kv=None):
        h = self.input_layernorm(x)
        a, kv = self.self_attn(h, cos, sin, allowed, past_kv)
        return (a + self.mlp.fc2(gelu_new(self.mlp.fc1(h)))) + x, kv

class Showo(nn.Module):
    """Show-o's transformer (`models/modeling_showo.py`, `models/phi.py`): checkpoint names less `showo.[model.]`."""
    def __init__(self, c: ShowoConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.n_embd)
        self.layers = nn.ModuleList(PhiBlock(c) for _ in range(c.n_layer))
        self.final_layernorm = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size)
        self.gradient_checkpointing = False

    def _embed(self, ids: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings of `ids` at positions start.. with their RoPE cos/sin (float32 on the CPU, as the original)."""
        c, end = self.config, start + ids.shape[1]
        if end > c.max_position_embeddings:
            raise ValueError(f"sequence of {end} positions exceeds Show-o's {c.max_position_embeddings}")
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.rot_dim, 2, dtype=torch.int64).float() / c.rot_dim))
        angles = torch.outer(torch.arange(start, end).float(), inv_freq)
        emb = torch.cat((angles, angles), dim=-1)
        return self.embed_tokens(ids), emb.cos().to(ids.device), emb.sin().to(ids.device)

    def forward(self, ids: torch.Tensor, allowed: torch.Tensor, output_hidden_states: bool = False):
        """The original full forward, positions 0..L-1 with pads: fp32 logits [B, L, V] (decoding uses `prefix`)."""
        x, cos, sin = self._embed(ids)
        hidden = [x]                     # the embeddings, then each block's output; the last one after final LN
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(lambda t, l=layer: l(t, cos, sin, allowed)[0], x, use_reentrant=False)
            else:
                x, _ = layer(x, cos, sin, allowed)
            hidden.append(x)
        hidden[-1] = x = self.final_layernorm(x)
        logits = self.lm_head(x).float()
        return (logits, hidden) if output_hidden_states else logits

    def prefix(self, text_ids: torch.Tensor, tok: ShowoTokenizer) -> tuple[list, torch.Tensor]:
        """(every layer's (k, v) [R, nh, T, hd], key_ok [R, T] False at pads) of the part before the decoded
        image [R, T]: text (and a conditioning image) never attends to it, so they stay fixed while it is decoded."""
        allowed = tok.attention_mask(text_ids)
        x, cos, sin = self._embed(text_ids)
        kv = []
        for layer in self.layers:
            x, layer_kv = layer(x, cos, sin, allowed)
            kv.append(layer_kv)
        return kv, text_ids != tok.pad_id

    def image_logits(self, image_ids: torch.Tensor, prefix: tuple, rows: torch.Tensor) -> torch.Tensor:
        """Codebook logits [B, N, K] of image segments [B, N+2] (soi, N, eoi); row b attends to `prefix` row
        `rows[b]` (no pads) and its own segment. Only lm_head's K code columns: the sampler reads no others."""
        kv, key_ok = prefix
        (B, S), T = image_ids.shape, kv[0][0].shape[2]
        x, cos, sin = self._embed(image_ids, T)
        key_ok = torch.cat([key_ok[rows], torch.ones(B, S, dtype=torch.bool, device=image_ids.device)], 1)
        for layer, (k, v) in zip(self.layers, kv):
            x, _ = layer(x, cos, sin, key_ok[:, None, None, :], past_kv=(k[rows], v[rows]))   # mask [B, 1, 1, T+S]
        return self.code_logits(self.final_layernorm(x[:, 1:-1]))                   # the N image positions

    def code_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the K codes at final hidden states x [..., E]: only lm_head's code columns."""
        ids = self.config.code_ids
        return F.linear(x, self.lm_head.weight[ids], self.lm_head.bias[ids]).float()

    def next_logits(self, ids: torch.Tensor, start: int, past: list,
                    allowed: torch.Tensor) -> tuple[torch.Tensor, list]:
        """A raster generator's KV-cached step: code logits [B, K] after the last of `ids` [B, T] (positions
        start..), attending to every layer's keys/values `past` too under `allowed` [B, 1, T, start+T], and the
        new positions' keys/values per layer."""
        x, cos, sin = self._embed(ids, start)
        kv = []
        for layer, layer_past in zip(self.layers, past):
            x, layer_kv = layer(x, cos, sin, allowed, layer_past)
            kv.append(layer_kv)
        return self.code_logits(self.final_layernorm(x[:, -1])), kv

# Every config number is typed and bounded when it is read: the released models sit well inside these bounds, and
# a typo (an extra digit in the yaml's max_seq_length) stops with a message instead of asking for a [L, L] mask
# that fills the memory. MAX_POSITIONS bounds every sequence length: phi-1.5 has 2048.
MAX_POSITIONS = 2 ** 15
SHOWO_FIELDS = {"vocab_size": 2 ** 24, "llm_vocab_size": 2 ** 24, "codebook_size": 2 ** 20, "num_vq_tokens": 2 ** 16}
ORDERS = ("masked", "raster")       # config.json's "order": which generator (ShowoConfig.order)
YAML_FIELDS = {"max_seq_length": (1, MAX_POSITIONS), "num_new_special_tokens": (10, 1024)}   # 10: [PAD] + 9 below
# The released layout (Show-o's `models/modeling_utils.py`). ShowoConfig field <- (phi config key, type, low, high);
# an absent field takes phi-1.5's value
PHI_CONFIG_KEYS = {"n_embd": ("hidden_size", int, 1, 2 ** 16), "n_layer": ("num_hidden_layers", int, 1, 1024),
                   "n_head": ("num_attention_heads", int, 1, 1024),
                   "intermediate_size": ("intermediate_size", int, 1, 2 ** 18),
                   "partial_rotary_factor": ("partial_rotary_factor", float, 0.0, 1.0),
                   "rope_theta": ("rope_theta", float, 1.0, 1e12),
                   "layer_norm_eps": ("layer_norm_eps", float, 0.0, 1.0),
                   "max_position_embeddings": ("max_position_embeddings", int, 1, MAX_POSITIONS)}

def yaml_field(text: str, key: str) -> dict:
    """{key: value} of the first `key: value` line of a yaml text, {} if there is none. Only two integers are read
    from Show-o's yaml, not worth a yaml parser: a value is read as JSON when it can be (64, null), else as text."""
    m = re.search(rf"^\s*{key}\s*:[ \t]*(.*?)[ \t]*(?:#.*)?$", text, flags=re.M)
    if m is None:
        return {}
    try:
        return {key: json.loads(m.group(1))}
    except json.JSONDecodeError:
        return {key: m.group(1)}

def showo_config(ckpt_dir: str | Path, phi_dir: str | Path) -> ShowoConfig:
    """Show-o's config.json + `inference_config.yaml` if the folder has one + phi's config.json in `phi_dir` if
    there is one, every number typed and bounded as it is read, then checked against each other."""
    d = Path(ckpt_dir)
    src, yaml, phi = d / "config.json", d / "inference_config.yaml", Path(phi_dir) / "config.json"
    yaml = yaml if yaml.is_file() else None
    phi = phi if phi.is_file() else None
    raw = data.read_config(d)
    c = ShowoConfig(**{k: data.config_field(raw, k, int, src, low=1, high=hi) for k, hi in SHOWO_FIELDS.items()})
    c.order = data.config_field(raw, "order", str, src, "masked")
    if c.order not in ORDERS:
        raise CheckpointError(f"{src}: field 'order' must be one of {', '.join(ORDERS)} (the kind of generator), "
                              f"not {c.order!r}")
    c.temperature = data.config_field(raw, "temperature", float, src, 1.0, 0.0, 100.0)
    c.top_k = data.config_field(raw, "top_k", int, src, 0, 0, 2 ** 20)
    c.token_order = raw.get("token_order")
    whole = lambda v: type(v) is int  # noqa: E731 (not a bool, a float or a string)
    if c.token_order is not None and (not isinstance(c.token_order, list) or not all(map(whole, c.token_order)) or
                                      sorted(c.token_order) != list(range(c.num_vq_tokens))):
        raise CheckpointError(f"{src}: field 'token_order' must list every image token index 0..{c.num_vq_tokens - 1}"
                              " once (the order a raster generator makes them)")
    if yaml is not None:
        text = data.read_text(yaml, "Show-o inference config", CheckpointError)
        for k, (low, high) in YAML_FIELDS.items():
            setattr(c, k, data.config_field(yaml_field(text, k), k, int, yaml, getattr(c, k), low, high))
    if phi is not None:        # absent: phi-1.5's values
        theirs = data.read_config(phi.parent)
        for ours, (key, kind, low, high) in PHI_CONFIG_KEYS.items():
            setattr(c, ours, data.config_field(theirs, key, kind, phi, getattr(c, ours), low, high))
        if data.config_field(theirs, "num_key_value_heads", int, phi, c.n_head, 1, c.n_head) != c.n_head:
            raise CheckpointError(f"{phi}: num_key_value_heads must equal num_attention_heads ({c.n_head}): "
                                  "Show-o's Phi has no grouped-query attention")
    check_showo_config(c, src, yaml, phi)
    return c

def check_showo_config(c: ShowoConfig, src: Path, yaml: Path | None, phi: Path | None) -> None:
    """The sizes must fit each other: vocabulary layout, square image grid, whole rotary heads, and the t2i
    sequence within max_position_embeddings (so no mask larger than the model's context is ever made)."""
    expect = c.llm_vocab_size + c.num_new_special_tokens + c.codebook_size + 1
    if c.vocab_size != expect:
        raise CheckpointError(f"{src}: vocab_size {c.vocab_size} != llm_vocab_size + "
                              f"{c.num_new_special_tokens} specials + codebook_size + 1 mask = {expect}")
    if math.isqrt(c.num_vq_tokens) ** 2 != c.num_vq_tokens:
        raise CheckpointError(f"{src}: num_vq_tokens {c.num_vq_tokens} is not a square grid")
    phi_name = phi or "phi-1.5's defaults (no phi config.json)"
    if c.n_embd % c.n_head or c.rot_dim % 2:
        raise CheckpointError(f"{phi_name}: hidden_size {c.n_embd} must split into num_attention_heads {c.n_head} "
                              f"heads whose rotary part (partial_rotary_factor {c.partial_rotary_factor}) is even")
    if c.seq_len > c.max_position_embeddings:
        raise CheckpointError(f"{yaml or 'the default'}: max_seq_length {c.max_seq_length} is too large: the t2i "
                              f"sequence (text {c.text_len} + {c.num_vq_tokens} image tokens + 3) has {c.seq_len} "
                              f"positions, more than max_position_embeddings {c.max_position_embeddings} of "
                              f"{phi_name}")

def llm_model_path(ckpt_dir: str | Path) -> str:
    """config.json's llm_model_path: where the phi-1.5 folder is, relative to the checkpoint, or a hub name."""
    return data.config_field(data.read_config(ckpt_dir), "llm_model_path", str, Path(ckpt_dir) / "config.json",
                             "microsoft/phi-1_5")

def resolve_phi_dir(ckpt_dir: str | Path, phi_dir: str | Path | None) -> Path:
    """Where phi-1.5's config + tokenizer are: `phi_dir`, else config.json's llm_model_path if it is a folder."""
    if phi_dir is None:
        llm = llm_model_path(ckpt_dir)
        phi_dir = os.path.normpath(Path(ckpt_dir) / llm)      # names it as "../phi" meant
        if not Path(phi_dir).is_dir():
            raise CheckpointError(
                f"Show-o needs the phi-1.5 tokenizer ({llm!r} in {Path(ckpt_dir) / 'config.json'}): download it with "
                "`hf download microsoft/phi-1_5 config.json tokenizer.json --local-dir weights/phi-1_5` "
                "and pass --phi weights/phi-1_5")
    p = Path(phi_dir)
    if not (p / "tokenizer.json").is_file():
        raise CheckpointError(f"{p / 'tokenizer.json'} not found: download it with "
                              f"`hf download microsoft/phi-1_5 config.json tokenizer.json --local-dir {p}`")
    return p

def showo_key_map(c: ShowoConfig) -> dict[str, str]:
    """Checkpoint key -> `Showo` parameter name: the checkpoint holds Phi as `showo` (lm_head) / `showo.model`."""
    with torch.device("meta"):
        names = [n for n, _ in Showo(c).named_parameters()]
    return {("showo." if n.startswith("lm_head.") else "showo.model.") + n: n for n in names}

def load_showo(ckpt_dir: str | Path, phi_dir: str | Path | None = None, *, dtype=torch.float32,
               device="cpu") -> tuple[Showo, ShowoTokenizer]:
    """Load a Show-o checkpoint (showlab/show-o, show-o-512x512, a DPO checkpoint) and its tokenizer."""
    phi = resolve_phi_dir(ckpt_dir, phi_dir)
    c = showo_config(ckpt_dir, phi)
    tok = ShowoTokenizer(data.load_tokenizer(phi), c)
    with torch.device("meta"):
        model = Showo(c)
    data.load_state(model, ckpt_dir, showo_key_map(c), dtype=data.parse_dtype(dtype), device=device,
                    what="Show-o checkpoint")
    return model.eval(), tok

def save_showo(model: Showo, out_dir: str | Path, like_dir: str | Path | None = None,
               phi_dir: str | Path | None = None) -> None:
    """Write `model` in Show-o's layout, atomically: the weights, with `like_dir` its config.json and inference yaml;
    with `phi_dir` too, llm_model_path becomes that folder's absolute path (a copied "../phi" would point elsewhere),
    or a relative one when the phi folder is inside `out_dir`."""
    out = Path(out_dir)
    inv = {v: k for k, v in showo_key_map(model.config).items()}
    data.save_state({inv[n]: p for n, p in model.state_dict().items()}, out / "pytorch_model.safetensors")
    if like_dir is None:
        return
    for name in ("inference_config.yaml", "config.json"):     # config.json last
        src = Path(like_dir) / name
        if name == "config.json" and phi_dir is not None:
            phi = Path(phi_dir).resolve()
            inside = phi.is_relative_to(out.resolve())      # a phi folder shipped inside the model stays relative
            data.write_json({**data.read_config(like_dir), "llm_model_path": os.path.relpath(phi, out.resolve())
                             if inside else str(phi)}, out / name)
        elif src.is_file() and src.resolve() != (out / name).resolve():
            with data.atomic_path(out / name) as tmp:
                tmp.write_bytes(src.read_bytes())

# ---- 2. MAGVIT-v2 (Show-o's `models/modeling_magvitv2.py`) ----------------------------------------------
@dataclass
class MagvitConfig:
    """Defaults are the released showlab/magvitv2 (its config.json has no architecture fields)."""
    ch: int = 128
    enc_ch_mult: tuple = (1, 2, 2, 4, 4)
    enc_num_res_blocks: tuple = (4, 3, 4, 3, 4)
    dec_ch_mult: tuple = (1, 1, 2, 2, 4)
    dec_num_res_blocks: tuple = (4, 4, 3, 4, 3)
    dec_ch: int = 128
    z_channels: int = 13   # = codebook bits

    @classmethod
    def from_json(cls, raw: dict, where="MAGVIT-v2 config") -> "MagvitConfig":
        """The `architecture` (or `oracle_arch`) of a config.json, every field typed and bounded; none: the
        released full-size model."""
        key = "architecture" if raw.get("architecture") is not None else "oracle_arch"
        arch = data.config_field(raw, key, dict, where, {})
        if not arch:
            return cls()
        ch, mult, blocks, bits = _magvit_side(arch, "encoder", where, key)
        dec_ch, dec_mult, dec_blocks, dec_bits = _magvit_side(arch, "decoder", where, key)
        quantizer = data.config_field(arch, "quantizer", dict, where, {}, section=f"{key}.")
        if data.config_field(quantizer, "codebook_dim", int, where, bits, section=f"{key}.quantizer.") != bits \
                or dec_bits != bits:
            raise CheckpointError(f"{where}: encoder, decoder and quantizer disagree on the bits (z_channels)")
        return cls(ch=ch, enc_ch_mult=tuple(mult), enc_num_res_blocks=tuple(blocks), dec_ch=dec_ch,
                   dec_ch_mult=tuple(dec_mult), dec_num_res_blocks=tuple(dec_blocks), z_channels=bits)

def _magvit_side(arch: dict, side: str, where, key: str) -> tuple[int, list, list, int]:
    """(ch, ch_mult, num_res_blocks, z_channels) of the encoder or decoder: channels in multiples of GroupNorm's
    32 groups, one block count per level, at most 20 bits (the code table has 2^bits rows)."""
    got, section = data.config_field(arch, side, dict, where, section=f"{key}."), f"{key}.{side}."
    ch = data.config_field(got, "ch", int, where, low=32, high=4096, section=section)
    mult = data.config_field(got, "ch_mult", list, where, low=1, high=64, section=section)
    blocks = data.config_field(got, "num_res_blocks", list, where, low=1, high=64, section=section)
    bits = data.config_field(got, "z_channels", int, where, low=1, high=20, section=section)
    if ch % 32 or len(mult) != len(blocks) or len(mult) > 8:
        raise CheckpointError(f"{where}: {section}ch must be a multiple of 32, and ch_mult and num_res_blocks lists "
                              f"of the same length, at most 8 (got ch {ch}, {len(mult)} and {len(blocks)} levels)")
    return ch, mult, blocks, bits

def swish(x):
    return x * torch.sigmoid(x)  # this form, not F.silu, as Show-o's `models/common_modules.py` computes it

def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)

class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h

class AttnBlock(nn.Module):
    """Single-head attention over the h*w positions."""
    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        t = self.norm(x)
        q, k, v = (m(t).reshape(B, C, H * W) for m in (self.q, self.k, self.v))
        a = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=2)      # [B, hw(q), hw(k)]
        return x + self.proj_out(torch.bmm(v, a.transpose(1, 2)).reshape(B, C, H, W))

def mid_block(c: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(block_1=ResnetBlock(c, c), attn_1=AttnBlock(c), block_2=ResnetBlock(c, c)))

class Level(nn.Module):
    """One resolution: resnet blocks, then `downsample` (pad right/bottom, stride-2 conv) or `upsample` (nearest x2)."""
    def __init__(self, cin: int, cout: int, n_blocks: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if b == 0 else cout, cout) for b in range(n_blocks))
        self.resample = resample
        if resample is not None:             # a plain container: the checkpoint's `downsample.conv` / `upsample.conv`
            self.add_module(resample, nn.Module())
            down = resample == "downsample"
            getattr(self, resample).conv = nn.Conv2d(cout, cout, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if self.resample == "downsample":
            x = self.downsample.conv(F.pad(x, (0, 1, 0, 1)))
        elif self.resample == "upsample":
            x = self.upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x

class LFQ(nn.Module):
    """Lookup-free quantiser: a code is `bits` signs, channel 0 the most significant bit."""
    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("embedding", torch.empty(2 ** bits, bits))
        self.register_buffer("power_vals", torch.empty(bits, dtype=torch.long))

    @staticmethod
    def tables(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        power = 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.long)               # [2^(bits-1) .. 1]
        signs = ((torch.arange(2 ** bits)[:, None] & power) != 0).float() * 2 - 1     # [K, bits] of ±1
        return signs, power

    def codes_to_z(self, codes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """[B, N] codes -> [B, bits, h, w] ±1 (token n at row n // w, column n % w)."""
        z = self.embedding[codes]                                                   # [B, N, bits]
        return z.view(codes.shape[0], *hw, self.bits).permute(0, 3, 1, 2)

    def z_to_codes(self, z: torch.Tensor) -> torch.Tensor:
        """[B, bits, h, w] -> [B, h*w]; z = 0 counts as bit 0."""
        bits = (z > 0).long().permute(0, 2, 3, 1).flatten(1, 2)                     # [B, N, bits]
        return (bits * self.power_vals).sum(-1)

class MAGVITv2(nn.Module):
    """Encoder -> LFQ -> decoder, plain containers named as the checkpoint; the decoder has its own ch_mult, blocks."""
    def __init__(self, c: MagvitConfig):
        super().__init__()
        self.config = c
        self.encoder = enc = nn.Module()
        mult, last = (1,) + tuple(c.enc_ch_mult), len(c.enc_ch_mult) - 1
        enc.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        enc.down = nn.ModuleList(Level(c.ch * mult[i], c.ch * mult[i + 1], k, "downsample" if i < last else None)
                                 for i, k in enumerate(c.enc_num_res_blocks))
        top = c.ch * c.enc_ch_mult[-1]
        enc.mid, enc.norm_out = mid_block(top), group_norm(top)
        enc.conv_out = nn.Conv2d(top, c.z_channels, 3, padding=1)
        enc.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)
        self.decoder = dec = nn.Module()
        ch, m = c.dec_ch, tuple(c.dec_ch_mult) + (c.dec_ch_mult[-1],)   # up[i]: ch*m[i+1] -> ch*m[i]; up[-1] runs first
        dec.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)
        dec.conv_in = nn.Conv2d(c.z_channels, ch * m[-1], 3, padding=1)
        dec.mid = mid_block(ch * m[-1])
        dec.up = nn.ModuleList(Level(ch * m[i + 1], ch * m[i], k, "upsample" if i != 0 else None)
                               for i, k in enumerate(c.dec_num_res_blocks))
        dec.norm_out, dec.conv_out = group_norm(ch * m[0]), nn.Conv2d(ch * m[0], 3, 3, padding=1)
        self.quantize = LFQ(c.z_channels)

    device = property(lambda self: self.encoder.conv_in.weight.device)

    def image_size(self, n_tokens: int) -> int:
        """Image side that encodes to n_tokens codes (one downsampling per encoder level but the last)."""
        return math.isqrt(n_tokens) * 2 ** (len(self.config.enc_ch_mult) - 1)

    def decode_code(self, codes: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Image tokens [B, N] -> image [B, 3, 16h, 16w] roughly in [-1, 1] (no final clamp)."""
        hw = hw or (math.isqrt(codes.shape[1]),) * 2
        z = self.quantize.codes_to_z(codes.clamp(0, 2 ** self.config.z_channels - 1), hw)
        dec = self.decoder
        h = dec.mid(dec.conv_in(dec.post_quant_conv(z.to(dec.conv_in.weight.dtype))))
        for level in reversed(dec.up):
            h = level(h)
        return dec.conv_out(swish(dec.norm_out(h)))

    def get_code(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> image tokens [B, (H/f)*(W/f)]."""
        enc = self.encoder
        h = enc.conv_in(pixels.to(enc.conv_in.weight.dtype))
        for level in enc.down:
            h = level(h)
        return self.quantize.z_to_codes(enc.quant_conv(enc.conv_out(swish(enc.norm_out(enc.mid(h))))))

def load_magvit(ckpt_dir: str | Path, *, dtype=torch.float32, device="cpu") -> MAGVITv2:
    c = MagvitConfig.from_json(data.read_config(ckpt_dir), Path(ckpt_dir) / "config.json")
    with torch.device("meta"):
        model = MAGVITv2(c)
    data.load_state(model, ckpt_dir, {n: n for n in model.state_dict()}, dtype=data.parse_dtype(dtype), device=device,
                    what="MAGVIT-v2 checkpoint")
    signs, power = LFQ.tables(c.z_channels)
    if not (torch.equal(model.quantize.embedding.float().cpu(), signs) and
            torch.equal(model.quantize.power_vals.cpu(), power)):
        raise CheckpointError(f"{ckpt_dir}: quantize.embedding / power_vals are not the MSB-first LFQ tables "
                              "this code assumes; is this showlab/magvitv2?")
    model.quantize.embedding = model.quantize.embedding.float()  # ±1 is exact in any dtype; keep the table fp32
    return model.eval()

def image_to_pixels(img, resolution: int) -> torch.Tensor:
    """PIL image -> [1, 3, r, r] in [-1, 1]: bicubic shorter side, centre crop (Show-o's `training/utils.py`)."""
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - 0.5) / 0.5)[None]

# ---- 3. Masked parallel decoding (Sec. 3.1; `t2i_generate` of `models/modeling_showo.py`) -------------
def cosine_schedule(r: float) -> torch.Tensor:
    """Share of tokens masked after a share r of the steps (`models/sampling.py`); float32: float64 changes mask_len."""
    return torch.cos(torch.tensor(r) * math.pi * 0.5)

@dataclass
class Step:
    """What one call of `Paths.step()` did to the paths it advanced (all tensors are per advanced path)."""
    paths: list[int]              # which paths advanced
    step: list[int]               # the step index s (0-based) each of them just completed
    x0: torch.Tensor              # [k, N] codes: each path's current x̂0 prediction (the full sampled map)
    mask_len: list[int]           # image tokens re-masked for the next step
    temperature: list[float]      # the annealed temperature used for re-masking
    masking: torch.Tensor         # [k, N] True = re-masked
    probs: torch.Tensor | None = None  # [k, N, K] the CFG distribution sampled from (with keep_probs=True)

class Paths:
    """N decoding paths of one prompt as one batch (Sec. 3.1). Each path draws from its own generator in the original
    order (per step a multinomial over every slot, then the Gumbel uniforms), so the batch changes nothing. `stop(i)` /
    `resume(i)`: PARM's truncation. fast=True caches the text's keys/values; False runs the original full forward."""
    def __init__(self, model: Showo, tokenizer: ShowoTokenizer, prompt: str, n: int = 1, *, steps: int = 18,
                 cfg: float = 1.75, temperature: float | Sequence[float] = 1.0, generators: Sequence | None = None,
                 seed: int = 0, fast: bool = True, keep_probs: bool = False, condition: torch.Tensor | None = None,
                 record: PathRecord | None = None):
        if n < 1:
            raise ValueError(f"number of paths must be at least 1 (got {n})")
        if steps < 1:
            raise ValueError(f"number of decoding steps must be at least 1 (got {steps})")
        c, device = model.config, model.embed_tokens.weight.device
        self.model, self.tok, self.config = model, tokenizer, c
        self.n, self.steps, self.cfg, self.fast, self.keep_probs = n, steps, float(cfg), fast, keep_probs
        if record is not None and (generators is not None or keep_probs or condition is not None):
            raise ValueError("a PathRecord keys each path by its seed: pass seed, not generators, keep_probs or "
                             "condition")
        if generators is None:
            generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]
        if len(generators) != n:
            raise ValueError(f"{len(generators)} generators for {n} paths: give one per path")
        # each path's starting temperature; a list can restore the released scripts' τ leak (see `Search`)
        temperature = [float(t) for t in temperature] if isinstance(temperature, Sequence) else [float(temperature)] * n
        if len(temperature) != n:
            raise ValueError(f"{len(temperature)} temperatures for {n} paths")
        self.generators, self.temperature = list(generators), temperature
        # the cond row, and the empty prompt's row for CFG (`inference_t2i.py`); a conditioning image is in both
        cond = None if condition is None else condition.reshape(1, -1).expand(2, -1)
        self.ids = tokenizer.t2i_ids([prompt, ""], condition=cond).to(device)      # [2, L]
        self.tokens = torch.full((n, c.num_vq_tokens), c.mask_token_id, dtype=torch.long, device=device)
        self.x0, self.step_of, self.stopped = [None] * n, [0] * n, [False] * n      # x0: the last step's x̂0 [N]
        self.token_forwards = 0      # token positions run through the transformer (work counter)
        rows = 2 if self.cfg else 1
        # a path's share of a step's forward: its image segment (fast) or its whole sequences (the original)
        self.step_forwards = rows * ((c.num_vq_tokens + 2) if fast else self.ids.shape[1])
        self.record, self.seeds = record, [seed + i for i in range(n)]
        self._scope = (prompt, self.cfg, steps, fast)
        if fast:
            before = self.ids[:, : -(c.num_vq_tokens + 2)]          # all before the decoded image's segment
            with torch.inference_mode():
                self._prefix = model.prefix(before, tokenizer)
            self.token_forwards += rows * before.shape[1]
        else:
            self._allowed = omni_attention_mask(self.ids, tokenizer.pad_id, tokenizer.soi_id, tokenizer.eoi_id)

    def finished(self, i: int) -> bool:
        return self.step_of[i] >= self.steps

    def live(self) -> list[int]:
        return [i for i in range(self.n) if not self.stopped[i] and not self.finished(i)]

    def stop(self, i: int) -> None:
        self.stopped[i] = True

    def resume(self, i: int) -> None:
        self.stopped[i] = False

    def copy_state(self, src: int, dst: int) -> None:
        """Make path `dst` continue from path `src`'s state (PRM's re-branching); it keeps its own generator."""
        self.tokens[dst] = self.tokens[src]
        self.x0[dst], self.step_of[dst] = self.x0[src], self.step_of[src]
        self.temperature[dst], self.stopped[dst] = self.temperature[src], self.stopped[src]

    def final_tokens(self, which: Sequence[int] | None = None) -> torch.Tensor:
        """[n, N] codes of every path's (or `which` paths') last step (what the original t2i_generate returns)."""
        which = range(self.n) if which is None else which
        if any(not self.finished(i) for i in which):
            raise RuntimeError("some paths have not finished: resume and step them first")
        return torch.stack([self.x0[i] for i in which])

    def __iter__(self) -> Iterator[Step]:
        while self.live():
            yield self.step()

    @torch.inference_mode()
    def probs(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """softmax of the guided logits (1+g)·cond − g·uncond over the K codes, [k, N, K] for image-slot
        states [k, N] (vocabulary ids). Depends on nothing else, so a test can feed recorded states in."""
        c, k, g = self.config, image_tokens.shape[0], self.cfg
        rows = 2 if g else 1
        if self.fast:
            seg = self.tok.image_segment(image_tokens).repeat(rows, 1)                 # [rows*k, N+2]: cond; uncond
            which = torch.arange(rows, device=seg.device).repeat_interleave(k)
            logits = self.model.image_logits(seg, self._prefix, which)
            self.token_forwards += seg.numel()
        else:
            image = slice(-(c.num_vq_tokens + 1), -1)                                  # the N decoded slots
            ids = self.ids[:rows].repeat_interleave(k, 0).clone()                      # [rows*k, L]: cond; uncond
            ids[:, image] = image_tokens.repeat(rows, 1)
            logits = self.model(ids, self._allowed[:rows].repeat_interleave(k, 0))[:, image, c.code_ids]
            self.token_forwards += ids.numel()
        if g:
            # in place: the original's roundings without two fresh [k, N, K] temporaries, a step's largest tensors
            cond, uncond = logits.chunk(2)
            logits = cond.mul_(1 + g).sub_(uncond.mul_(g))
        return torch.softmax(logits, dim=-1)

    @torch.inference_mode()
    def step(self) -> Step:
        """One pass of the original loop per live path: sample, keep known codes, re-mask (`mask_by_random_topk`).
        A step the record holds is replayed: no forward, the path's generator still makes the step's draws."""
        live = self.live()
        if not live:
            raise RuntimeError("no live path to advance")
        keys = [self._key(i) for i in live] if self.record is not None else [None] * len(live)
        known = [self.record.get(k, self.tokens.device) if k else None for k in keys]
        fresh = [i for i, kn in zip(live, known) if kn is None]
        probs, distinct = None, 0
        if fresh:   # paths in one state share its forward: every path's first step (all masked), PRM's re-branched
                    # paths; a row's result does not depend on the rows beside it (test_search)
            states, which = torch.unique(self.tokens[fresh], dim=0, return_inverse=True)
            probs, distinct = self.probs(states)[which], len(states)
        # the work counter still counts a forward per path, as it counts a replayed step: the search's stated work
        self.token_forwards += self.step_forwards * (len(live) - distinct)
        mask_len, masking = [], []
        for i, key, kn in zip(live, keys, known):
            r = (self.step_of[i] + 1) / self.steps
            # the temperature anneals by compounding (1 - r) every step, starting again for each path
            self.temperature[i] *= 1.0 - r
            if kn is None:
                sampled, tokens, m = self._advance(i, probs[fresh.index(i)], r)
                if key is not None:
                    self.record.put(key, sampled, tokens, m)
            else:
                sampled, tokens, m = kn
                self._skip_draws(self.generators[i])
            self.tokens[i], self.x0[i] = tokens, sampled
            mask_len.append(m)
            masking.append(tokens == self.config.mask_token_id)
            self.step_of[i] += 1
        return Step(paths=live, step=[self.step_of[i] - 1 for i in live], x0=torch.stack([self.x0[i] for i in live]),
                    mask_len=mask_len, temperature=[self.temperature[i] for i in live],
                    masking=torch.stack(masking), probs=probs if self.keep_probs else None)

    def _advance(self, i: int, dist: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Path i's step from its [N, K] distribution: (x̂0 codes, the new image-slot state, tokens re-masked)."""
        c, N, off = self.config, self.config.num_vq_tokens, self.config.image_offset
        tokens, gen = self.tokens[i], self.generators[i]
        unknown = tokens == c.mask_token_id
        # every slot is sampled, known ones too: the original consumes the RNG that way
        sampled = torch.where(unknown, torch.multinomial(dist, 1, generator=gen)[:, 0], tokens - off)
        conf = torch.where(unknown, torch.gather(dist, -1, sampled[:, None])[:, 0], torch.finfo(dist.dtype).max)
        mask_len = int(max(1.0, min(float(unknown.sum() - 1), float(torch.floor(N * cosine_schedule(r))))))
        u = torch.zeros(1, N, device=dist.device).uniform_(0, 1, generator=gen)[0]
        gumbel = -torch.log(torch.clamp(-torch.log(torch.clamp(u, min=1e-20)), min=1e-20))
        confidence = torch.log(torch.clamp(conf, min=1e-20)) + self.temperature[i] * gumbel
        masking = confidence < torch.sort(confidence).values[mask_len]
        return sampled, torch.where(masking, c.mask_token_id, sampled + off), mask_len

    def _key(self, i: int) -> tuple:
        """What decides path i's next step: prompt, cfg, steps, its seed, its step, temperature and state."""
        state = self.tokens[i].cpu().numpy().tobytes()
        return (*self._scope, self.seeds[i], self.step_of[i], self.temperature[i], state)

    def _skip_draws(self, gen: torch.Generator) -> None:
        """Make the draws of one step (`_advance`) without using them: how many a multinomial over N x K and N
        uniforms take does not depend on the probabilities (test_search checks the generator's state)."""
        c = self.config
        flat = torch.full((c.num_vq_tokens, c.codebook_size), 1.0 / c.codebook_size, device=self.tokens.device)
        torch.multinomial(flat, 1, generator=gen)
        torch.zeros(1, c.num_vq_tokens, device=self.tokens.device).uniform_(0, 1, generator=gen)

class PathRecord:
    """Decoding steps remembered (Sec. 3.1): each step a `Paths` computed, keyed by what decides it (prompt, cfg,
    steps, the path's seed, step, temperature and image-slot state), with the x̂0 it sampled and the state it left.
    Searches of one generator that share a record share their paths: a step decoded by one is replayed by the
    next, bit for bit, with the work it costs still counted. Give each generator (model) its own record."""
    def __init__(self):
        # codes are kept as Python bytes, not tensors: a full evaluation holds ~10^5 steps, and as many small tensors
        # allocated between decoding's large temporaries fragmented the heap to ~300 KB a step (16 GB in a worker)
        self._steps: dict[tuple, tuple[bytes, bytes, int]] = {}
        self.replayed = 0

    def __len__(self) -> int:
        return len(self._steps)

    def get(self, key: tuple, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int] | None:
        got = self._steps.get(key)
        self.replayed += got is not None
        if got is None:
            return None
        x0, tokens, mask_len = got
        codes = lambda b: torch.frombuffer(bytearray(b), dtype=torch.long).to(device)  # noqa: E731
        return codes(x0), codes(tokens), mask_len

    def put(self, key: tuple, x0: torch.Tensor, tokens: torch.Tensor, mask_len: int) -> None:
        self._steps[key] = (x0.cpu().long().numpy().tobytes(), tokens.cpu().long().numpy().tobytes(), mask_len)

class RasterPaths(Paths):
    """N decoding paths of a raster generator (ours, the paper's Table 4: LlamaGen makes the image tokens one at a
    time, left to right, top to bottom) with `Paths`' interface, so that every search runs on it unchanged. A step
    is a group of about N/steps tokens, and its x̂0 is the partial image: the tokens made so far and code 0 (empty)
    for the others, so early images are incomplete. A token is drawn from the CFG logits (1+g)·cond − g·uncond
    (Show-o's), divided by the path's temperature and cut to the top_k codes (LlamaGen's `sample`; defaults: the
    checkpoint's config), by the path's own generator, one draw per token: stop/resume and the batch change
    nothing. The text's keys/values are computed once; then each token is one position per path and CFG row, on
    the keys/values cached for the path's earlier tokens. PARM++'s conditioning image is refused."""
    def __init__(self, model: Showo, tokenizer: ShowoTokenizer, prompt: str, n: int = 1, *, steps: int = 18,
                 cfg: float = 1.75, temperature: float | Sequence[float] | None = None, top_k: int | None = None,
                 generators: Sequence | None = None, seed: int = 0, keep_probs: bool = False,
                 condition: torch.Tensor | None = None, record: PathRecord | None = None):
        c, N = model.config, model.config.num_vq_tokens
        if condition is not None:
            raise ValueError("a raster generator takes no conditioning image (PARM++'s self-correction): only "
                             "Show-o's masked generator is trained for it")
        if record is not None:
            raise ValueError("a raster path's state is its KV cache, which a PathRecord does not hold: decode it "
                             "live (record=None)")
        if not 1 <= steps <= N:
            raise ValueError(f"{steps} steps for {N} image tokens: a raster step makes at least one token")
        super().__init__(model, tokenizer, prompt, n, steps=steps, cfg=cfg, generators=generators, seed=seed,
                         temperature=c.temperature if temperature is None else temperature, keep_probs=keep_probs)
        self.top_k = c.top_k if top_k is None else top_k
        self.tokens = torch.zeros_like(self.tokens)                           # codes: 0 (empty) until made
        self.ends = [(s + 1) * N // steps for s in range(steps)]              # tokens made after step s
        # the j-th token made goes to image slot order[j] (x̂0 and the tokens keep the image tokenizer's layout)
        self.order = torch.tensor(c.token_order or range(N), device=self.tokens.device)
        self.rank = torch.argsort(self.order)                                 # slot -> when it is made
        self.rows = 2 if self.cfg else 1                                      # row i + r·n: path i, cond/uncond
        kv, key_ok = self._prefix
        pick = torch.arange(self.rows, device=key_ok.device).repeat_interleave(n)
        grow = lambda t: torch.cat([t[pick], t.new_zeros(len(pick), t.shape[1], N, t.shape[3])], 2)  # noqa: E731
        self.cache = [(grow(k), grow(v)) for k, v in kv]       # [rows·n, nh, T + N, hd]: text, soi, tokens 0..N-2
        self.key_ok = torch.cat([key_ok[pick], key_ok.new_ones(len(pick), N)], 1)

    def probs(self, image_tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a raster path's distributions come one token at a time: keep_probs=True keeps "
                                  "them in each Step")

    def copy_state(self, src: int, dst: int) -> None:
        super().copy_state(src, dst)
        for k, v in self.cache:
            for r in range(self.rows):
                k[dst + r * self.n], v[dst + r * self.n] = k[src + r * self.n], v[src + r * self.n]

    @torch.inference_mode()
    def step(self) -> Step:
        """Each live path makes its step's tokens; paths at the same step go as one batch, one token at a time."""
        live, N = self.live(), self.config.num_vq_tokens
        if not live:
            raise RuntimeError("no live path to advance")
        kept = {i: [] for i in live}
        for s in sorted({self.step_of[i] for i in live}):
            group = [i for i in live if self.step_of[i] == s]
            for j in range(self.ends[s - 1] if s else 0, self.ends[s]):
                for i, p in zip(group, self.next_token(group, j)):
                    kept[i].append(p)
        for i in live:
            self.x0[i] = self.tokens[i].clone()
            self.step_of[i] += 1
        made = torch.tensor([self.ends[self.step_of[i] - 1] for i in live])
        return Step(paths=live, step=[self.step_of[i] - 1 for i in live], x0=torch.stack([self.x0[i] for i in live]),
                    mask_len=(N - made).tolist(), temperature=[self.temperature[i] for i in live],
                    masking=self.rank[None] >= made[:, None].to(self.tokens.device),
                    probs=torch.stack([torch.stack(kept[i]) for i in live]) if self.keep_probs else None)

    def next_token(self, group: list[int], j: int) -> torch.Tensor:
        """Token j of the paths `group` (each has made tokens 0..j-1), drawn; returns their distributions [k, K]."""
        c, n, dev = self.config, self.n, self.tokens.device
        T = self.key_ok.shape[1] - c.num_vq_tokens
        idx = torch.tensor(group, device=dev)
        rows = torch.cat([idx + r * n for r in range(self.rows)])
        last = self.tokens[idx, self.order[j - 1]] + c.image_offset if j else torch.full_like(idx, self.tok.soi_id)
        past = [(k[rows, :, :T + j], v[rows, :, :T + j]) for k, v in self.cache]
        logits, new = self.model.next_logits(last.repeat(self.rows)[:, None], T + j, past,
                                             self.key_ok[rows, None, None, :T + j + 1])
        for (k, v), (k_new, v_new) in zip(self.cache, new):
            k[rows, :, T + j], v[rows, :, T + j] = k_new[:, :, 0], v_new[:, :, 0]
        self.token_forwards += len(rows)
        if self.cfg:
            cond, uncond = logits.chunk(2)
            logits = cond * (1 + self.cfg) - uncond * self.cfg
        temperature = torch.tensor([self.temperature[i] or 1.0 for i in group], device=dev)[:, None]
        logits = logits / temperature
        if 0 < self.top_k < logits.shape[-1]:
            logits = logits.masked_fill(logits < torch.topk(logits, self.top_k).values[:, -1:], -math.inf)
        probs = torch.softmax(logits, dim=-1)
        for p, i in zip(probs, group):          # temperature 0: the most likely code
            draw = torch.multinomial(p, 1, generator=self.generators[i])[0] if self.temperature[i] else p.argmax()
            self.tokens[i, self.order[j]] = draw
        return probs

def open_paths(model: Showo, tokenizer: ShowoTokenizer, prompt: str, n: int = 1, **kw) -> Paths:
    """The decoding paths of `model`'s kind (its config's order): Show-o's `Paths`, or `RasterPaths`."""
    return (RasterPaths if model.config.order == "raster" else Paths)(model, tokenizer, prompt, n, **kw)

def generate(model: Showo, tokenizer: ShowoTokenizer, prompt: str, n: int = 1, *, on_step=None,
             history: bool = False, **kw):
    """Decode n paths to the end (Sec. 3.1; `kw` go to `open_paths`): codes [n, N], with history=True also each step's
    x̂0 [n, steps, N] (then no path may be stopped). `on_step(paths, step)` runs after each step and may stop paths."""
    paths = open_paths(model, tokenizer, prompt, n, **kw)
    x0 = []
    for step in paths:
        if history:
            x0.append(step.x0)
        if on_step is not None:
            on_step(paths, step)
    codes = torch.stack(paths.x0)
    return (codes, torch.stack(x0, 1)) if history else codes

# ---- 4. Test-time verification: searches over the decoding paths (Sec. 3.2, 4, 5) -------------------
class Judge:
    """The searches' view of a verifier (verifiers.Verifier): a batched call per task and step; `who` = [(path, t)]."""
    def __init__(self, verifier, *, decide: str = "greedy", generator: torch.Generator | None = None,
                 released_scores: bool = False):
        if decide not in ("greedy", "sample"):
            raise ValueError(f"--judge {decide!r}: use greedy (deterministic) or sample (the released code)")
        self.verifier = verifier
        self.kw = {"decide": decide, "generator": generator, "released_scores": released_scores}
        self._turns: dict[int, object] = {}   # path -> the cached clarity turn of its first clear step

    tokens_processed = property(lambda self: self.verifier.tokens_processed)

    def orm(self, images, prompt: str, who) -> list:
        return self.verifier.judge_orm(images, [prompt] * len(who), **self.kw)

    def prm(self, images, prompt: str, who) -> list:
        return self.verifier.judge_prm(images, [prompt] * len(who), **self.kw)

    def clarity(self, images, prompt: str, who) -> list:
        judgments, turns = self.verifier.judge_clarity(images, [prompt] * len(who), **self.kw)
        # only a "yes" is followed up; holding the other caches would keep a 7B's KV memory alive for nothing
        self._turns.update({path: t for (path, _), t, j in zip(who, turns, judgments) if j.is_yes})
        return judgments

    def potential(self, prompt: str, who) -> list:
        turns = [self._turns.pop(path) for path, _ in who]
        return self.verifier.judge_potential(turns, [prompt] * len(who), **self.kw)

    def reflect(self, images, prompt: str, max_new_tokens: int) -> list[str]:
        return self.verifier.reflect(images, [prompt] * images.shape[0], max_new_tokens=max_new_tokens)

@dataclass
class SearchResult:
    """The chosen image of a search and everything that led to it (`trace` is JSON-ready)."""
    codes: torch.Tensor                # [N] the chosen image's codes
    winner: int                        # index of the winning path
    finals: torch.Tensor               # [n, N] each path's last x̂0 (for a truncated path: where it stopped)
    pruned: list[bool]
    trace: dict
    history: torch.Tensor | None = None  # [n, S, N] every step's x̂0 (plain generation only)

class Search:
    """What the searches share: paths, x̂0 decoding, verifier calls, JSON trace, work counters. released_temperature:
    paths after the first run at τ = 0, as the paper code's loops (`baseline.py`, `orm.py`, `parm.py`) keep τ."""
    def __init__(self, model: Showo, tok: ShowoTokenizer, magvit: MAGVITv2, judge: Judge | None, prompt: str, n: int,
                 *, strategy: str, steps=18, cfg=1.75, seed=0, progress=None, released_temperature=False, record=None):
        self.magvit, self.judge, self.prompt, self.strategy = magvit, judge, prompt, strategy
        # (a raster generator: path 0 at temperature 1, the others take the most likely code)
        temperature = {"temperature": [1.0] + [0.0] * (n - 1)} if released_temperature else {}
        self.paths = open_paths(model, tok, prompt, n, steps=steps, cfg=cfg, seed=seed, record=record, **temperature)
        self.progress = progress or (lambda *_: None)
        self.decodes, self.judge_tokens0 = 0, (judge.tokens_processed if judge is not None else 0)
        self.log = {i: {"path": i, "seed": seed + i, "steps": [], "ended": None} for i in range(n)}

    def finish(self, what: str | None = None) -> list[torch.Tensor]:
        """Step the live paths to the end, reporting progress; returns each step's x̂0 [k, N]."""
        x0 = []
        for step in self.paths:
            x0.append(step.x0)
            self.progress(step.step[0] + 1, what or f"{len(step.paths)} paths alive")
        return x0

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """x̂0 codes [k, N] -> images [k, 3, H, W] in about [-1, 1] (what the verifier is shown)."""
        self.decodes += codes.shape[0]
        return self.magvit.decode_code(codes)

    def ask(self, task: str, who: list[tuple[int, int]], codes: torch.Tensor | None = None) -> list:
        """A batched verifier call of `task` on the x̂0 `codes` of `who`, logged (potential, a follow-up: no image)."""
        judge = getattr(self.judge, task)
        judgments = judge(self.prompt, who) if codes is None else judge(self.decode(codes), self.prompt, who)
        for (i, t), j in zip(who, judgments):
            self.log[i]["steps"].append({"step": t, "task": task, "answer": j.answer,
                                         "p_yes": round(j.p_yes, 6), "p_no": round(j.p_no, 6)})
        return judgments

    def result(self, winner: int, why: str, pruned: list[bool] | None = None, **extra) -> SearchResult:
        p = self.paths
        pruned = pruned or [False] * p.n
        finals = torch.stack([x if x is not None else torch.full_like(p.tokens[0], -1) for x in p.x0])
        for i in range(p.n):
            self.log[i]["ended"] = self.log[i]["ended"] or ("finished" if p.finished(i) else "stopped")
            self.log[i]["final_step"] = p.step_of[i]
        trace = {"strategy": self.strategy, "prompt": self.prompt, "n": p.n, "steps": p.steps, "cfg": p.cfg,
                 "winner": winner, "why": why, "paths": [self.log[i] for i in range(p.n)],
                 "work": {"showo_token_forwards": p.token_forwards, "decodes": self.decodes,
                          "verifier_tokens": (self.judge.tokens_processed - self.judge_tokens0) if self.judge else 0},
                 **extra}
        return SearchResult(codes=finals[winner], winner=winner, finals=finals, pruned=pruned, trace=trace)

def best_of(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the lowest index (as the released code's strict '>')."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))

def decode_all(model, tok, magvit, prompt, n, **kw) -> SearchResult:
    """Plain generation of n paths (Sec. 3.1, no verifier): the winner is path 0; keeps every step's x̂0. `kw`,
    here and in every search: `Search`'s steps, cfg, seed, progress, released_temperature and record (a
    PathRecord: searches of one generator that share it decode each path once)."""
    s = Search(model, tok, magvit, None, prompt, n, strategy="none", **kw)
    history = torch.stack(s.finish(), 1)
    return replace(s.result(0, "no verifier: path 0"), history=history)

def orm_search(model, tok, magvit, judge: Judge, prompt: str, n: int = 20, **kw) -> SearchResult:
    """Sec. 3.2, ORM best-of-N (`orm.py`): decode N paths, score the final images by the ORM prompt, keep max p(yes)."""
    s = Search(model, tok, magvit, judge, prompt, n, strategy="orm", **kw)
    s.finish()
    judgments = s.ask("orm", [(i, s.paths.steps) for i in range(n)], s.paths.final_tokens())
    winner = best_of([j.p_yes for j in judgments])
    return s.result(winner, f"best-of-{n}: highest ORM p(yes) = {judgments[winner].p_yes:.4f}")

def prm_search(model, tok, magvit, judge: Judge, prompt: str, n: int = 20, **kw) -> SearchResult:
    """Sec. 3.2, PRM step-level best-of-N: after every step, score each path's x̂0 with the PRM prompt; all N
    paths re-branch from the most confident one (each keeps its own generator, so they diverge again)."""
    s = Search(model, tok, magvit, judge, prompt, n, strategy="prm", **kw)
    followed = []
    for step in s.paths:
        t = step.step[0]
        judgments = s.ask("prm", [(i, t) for i in step.paths], step.x0)
        best = step.paths[best_of([j.p_yes for j in judgments])]
        followed.append(best)
        if t + 1 < s.paths.steps:                   # no re-branching after the last step
            for i in step.paths:
                if i != best:
                    s.paths.copy_state(best, i)
        s.progress(t + 1, f"{n} paths, following path {best} (PRM p(yes) {max(j.p_yes for j in judgments):.3f})")
    return s.result(followed[-1], f"step-level best-of-{n}: most confident path at the last step", followed=followed)

def parm_search(model, tok, magvit, judge: Judge, prompt: str, n: int = 20, *, truncate=True, **kw) -> SearchResult:
    """Sec. 4, PARM (the paper code's `parm.py`). Task 1, clarity judgment: each step, every live path not yet judged
    clear is asked whether its x̂0 is clear enough to judge. Task 2, potential assessment: at its first clear step, as
    a follow-up turn on that image, whether it can still satisfy the prompt; "no" truncates it (`truncate=False`
    decodes on, as the released code). Task 3, best-of-N': the N' paths with potential are scored with the ORM prompt,
    the best kept; if N' = 0 the lowest p(no) wins (never clear: 1), resumed and finished if truncated (same image)."""
    s = Search(model, tok, magvit, judge, prompt, n, strategy="parm", **kw)
    clear_at: dict[int, int] = {}             # path -> its first clear step
    potential, p_no = {}, [1.0] * n           # path -> "yes" of its potential assessment; p(no) of it
    for step in s.paths:
        t = step.step[0]
        ask = [(j, i) for j, i in enumerate(step.paths) if i not in clear_at]
        if ask:
            judgments = s.ask("clarity", [(i, t) for _, i in ask], step.x0[[j for j, _ in ask]])
            clear = [i for (_, i), jd in zip(ask, judgments) if jd.is_yes]
            clear_at.update((i, t) for i in clear)
            if clear:
                for i, jd in zip(clear, s.ask("potential", [(i, t) for i in clear])):
                    potential[i], p_no[i] = jd.is_yes, jd.p_no
                    if not jd.is_yes and truncate:
                        s.paths.stop(i)
                        s.log[i]["ended"] = f"truncated after step {t + 1}: potential assessment said no"
        s.progress(t + 1, f"{len(s.paths.live())} alive, {len(clear_at)} judged clear, {sum(s.paths.stopped)} pruned")
    pruned = list(s.paths.stopped)              # only truncation stops a path here
    keep = [i for i in range(n) if potential.get(i)]
    if keep:
        judgments = s.ask("orm", [(i, s.paths.steps) for i in keep], s.paths.final_tokens(keep))
        winner = keep[best_of([jd.p_yes for jd in judgments])]
        why = f"best-of-N' with N' = {len(keep)}: highest ORM p(yes) among the paths with potential"
    else:
        winner = best_of([-p for p in p_no])
        why = f"N' = 0: lowest p(no) = {p_no[winner]:.4f}"
        if pruned[winner]:
            s.paths.resume(winner)
            s.finish(f"finishing path {winner}")
            why += f"; path {winner} was resumed from step {clear_at[winner] + 1} and finished"
    return s.result(winner, why, pruned, clear_at=clear_at, n_prime=len(keep))

def self_correction_text(prompt: str, reason: str) -> str:
    """PARM++'s self-correction text (ours, no released PARM++): the reason after the prompt; the image: `t2i_ids`."""
    return f"{prompt}\nCorrection: {' '.join(reason.split())}"

def reflection_reason(answer: str) -> str:
    """Sec. 5, the explanation in a reflection answer "no. <reason>" (the reflect data's answer format), as the
    self-correction data hold it: the reason alone, so that the generator is conditioned at sampling on the text it
    was trained on. An answer without that head is taken whole."""
    head, dot, reason = answer.strip().partition(".")
    return reason.strip() if dot and head.strip().lower() == "no" and reason.strip() else answer.strip()

def parm_plus_plus(model, tok, magvit, judge: Judge, prompt: str, n: int = 20, *, steps=18, cfg=1.75, seed=0,
                   truncate=True, rounds=3, max_reason_tokens=64, progress=None, released_temperature=False,
                   record=None):
    """Sec. 5, PARM++: PARM's choice, then up to `rounds` reflection rounds: reflection evaluation asks if the image
    matches the prompt; on "no" the verifier writes the reason and Show-o regenerates from prompt, image and reason.
    Show-o's masked generator only: a raster generator is never trained to regenerate from an image."""
    if model.config.order != "masked":
        raise ValueError(f"PARM++ needs Show-o's masked generator (its self-correction regenerates from a previous "
                         f"image), not a {model.config.order} one: use PARM (--parm)")
    result = parm_search(model, tok, magvit, judge, prompt, n, steps=steps, cfg=cfg, seed=seed, truncate=truncate,
                         progress=progress, released_temperature=released_temperature, record=record)
    codes, reflections, work, tokens0 = result.codes, [], result.trace["work"], judge.tokens_processed
    for r in range(rounds + 1):
        image = magvit.decode_code(codes[None])
        work["decodes"] += 1
        verdict = judge.orm(image, prompt, [(result.winner, f"reflection {r}")])[0]
        entry = {"round": r, "answer": verdict.answer, "p_yes": round(verdict.p_yes, 6), "codes": codes.tolist()}
        reflections.append(entry)
        if verdict.is_yes or r == rounds:
            entry["stopped"] = "reflection evaluation said yes" if verdict.is_yes else f"{rounds} rounds done"
            break
        entry["reason"] = reason = judge.reflect(image, prompt, max_reason_tokens)[0]
        paths = Paths(model, tok, self_correction_text(prompt, reflection_reason(reason)), 1, steps=steps, cfg=cfg,
                      seed=seed + 1000 * (r + 1), condition=codes)
        for step in paths:
            if progress:
                progress(step.step[0] + 1, f"self-correction round {r + 1}")
        codes = paths.final_tokens()[0]
        work["showo_token_forwards"] += paths.token_forwards
    work["verifier_tokens"] += judge.tokens_processed - tokens0
    result.trace.update(strategy="parm++", reflections=reflections)
    result.codes = codes
    return result

# ---- 5. Built-in tiny checkpoints (`--tiny`): random weights written in the released formats ----------
TINY_LEVELS = {"ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": [1, 1, 1, 1], "z_channels": 6}
TINY_MAGVIT = {"encoder": TINY_LEVELS, "decoder": TINY_LEVELS, "quantizer": {"codebook_dim": 6}}

def _random_fill(model: nn.Module, seed: int, std: float | None = None) -> dict[str, torch.Tensor]:
    """Deterministic random weights: norms at 1/0, other weights ~ N(0, 1/fan_in) and biases small (the tiny
    checkpoints: random outputs that still depend on every input), or with `std` GPT-2's initialisation for
    training from scratch, weights ~ N(0, std) and biases 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(model.named_parameters()):
        if "norm" in name:
            out[name] = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
        elif p.dim() == 1:
            out[name] = torch.randn(p.shape, generator=g) * 0.02 if std is None else torch.zeros(p.shape)
        else:
            w = torch.randn(p.shape, generator=g)
            out[name] = w / math.sqrt(p[0].numel()) if std is None else w * std
    return out

def phi_style_tokenizer(corpus: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer laid out like phi-1.5's: the BPE vocabulary, then <|endoftext|>, then the
    whitespace-run tokens (the tiny checkpoints' and the miniature worlds' text tokenizer)."""
    tok = data.train_tiny_bpe(corpus, vocab_size)
    tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    tok.add_tokens([AddedToken("   ", normalized=True), AddedToken("  ", normalized=True)])
    return tok

def write_showo(showo_dir: str | Path, phi_dir: str | Path, tok, c: ShowoConfig, seed: int = 0,
                std: float | None = None) -> None:
    """A new Show-o with random weights in the released layout: `phi_dir` (tokenizer.json, phi's config.json)
    and `showo_dir` (config.json pointing at `phi_dir`, inference_config.yaml, pytorch_model.safetensors).
    `c`'s vocabulary sizes are set from `tok`."""
    showo_dir, phi_dir = Path(showo_dir), Path(phi_dir)
    c.llm_vocab_size = tok.get_vocab_size(with_added_tokens=True)
    c.vocab_size = c.image_offset + c.codebook_size + 1
    phi_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(phi_dir / "tokenizer.json"))
    data.write_json({"architectures": ["PhiForCausalLM"], "model_type": "phi",
                     **{theirs: getattr(c, ours) for ours, (theirs, *_) in PHI_CONFIG_KEYS.items()},
                     "num_key_value_heads": c.n_head, "hidden_act": "gelu_new", "qk_layernorm": False,
                     "tie_word_embeddings": False, "vocab_size": c.vocab_size + 7}, phi_dir / "config.json")
    data.write_json({"_class_name": "Showo", "_diffusers_version": "0.30.1", "codebook_size": c.codebook_size,
                     "llm_model_path": os.path.relpath(phi_dir, showo_dir), "llm_vocab_size": c.llm_vocab_size,
                     "mask_token_id": c.mask_token_id, "num_vq_tokens": c.num_vq_tokens, "vocab_size": c.vocab_size,
                     "w_clip_vit": False, **({} if c.order == "masked" else
                                             {"order": c.order, "temperature": c.temperature, "top_k": c.top_k,
                                              **({"token_order": c.token_order} if c.token_order else {})})},
                    showo_dir / "config.json")
    (showo_dir / "inference_config.yaml").write_text(
        f"model:\n  showo:\n    num_new_special_tokens: {c.num_new_special_tokens}\n"
        f"dataset:\n  preprocessing:\n    max_seq_length: {c.max_seq_length}\n")
    showo = Showo(c)
    showo.load_state_dict(_random_fill(showo, seed, std))
    save_showo(showo, showo_dir)

def write_tiny_showo(root: str | Path, seed: int = 0) -> None:
    """Write `phi/`, `showo/` and `magvitv2/` under `root` as the released repos lay them out."""
    root = Path(root)
    write_showo(root / "showo", root / "phi", phi_style_tokenizer(data.tiny_corpus(), 400), ShowoConfig.preset("tiny"),
                seed)
    mc = MagvitConfig.from_json({"architecture": TINY_MAGVIT})
    weights = _random_fill(MAGVITv2(mc), seed + 1)
    weights["quantize.embedding"], weights["quantize.power_vals"] = LFQ.tables(mc.z_channels)
    data.write_json({"_class_name": "MAGVITv2", "_diffusers_version": "0.30.1", "architecture": TINY_MAGVIT},
                    root / "magvitv2" / "config.json")
    data.save_state(weights, root / "magvitv2" / "pytorch_model.safetensors")
