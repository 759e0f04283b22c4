"""Tiny random models built with `transformers` (a test-only dependency), as independent oracles for verifiers.py.

The product never imports transformers. These helpers build the reference modules, save them the way users
meet them (plain Qwen2 / SigLIP folders, and llava-hf LLaVA-OneVision folders in each key layout), and compute
the reference outputs with transformers' own modules.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TEXT = dict(vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=384,
              patch_size=14, vision_use_head=False)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """HF initialises norms to 1 and biases to 0, which would hide a missing bias or norm weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0) * 0.5)
    return model.eval()


def qwen2(path: Path, seed: int = 1):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = randomize(Qwen2ForCausalLM(Qwen2Config(**TEXT)), seed)
    model.save_pretrained(path)
    return model


def siglip(path: Path, seed: int = 2):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = randomize(SiglipVisionModel(SiglipVisionConfig(**VISION)), seed)
    model.save_pretrained(path)
    return model


def _rename(key: str, layout: str) -> str:
    """transformers 5 writes language_model.model.* and vision_tower.* (no vision_model level); the hub
    layouts differ from it by these renames."""
    if layout == "llava-hf-5":
        return key
    if key.startswith("vision_tower."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    if layout == "llava-hf":
        return key
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector."), ("image_newline", "model.image_newline")):
        if key.startswith(old):
            return new + key[len(old):]
    raise AssertionError(key)


def llava_hf(root: Path, tokenizer_json: Path, seed: int = 3) -> tuple[object, dict[str, Path]]:
    """A tiny LlavaOnevisionForConditionalGeneration saved in the three llava-hf key layouts.

    The tokenizer gets the converter's <image>/<video> tokens appended, as llava-hf tokenizers have them."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.add_special_tokens(["<image>", "<video>"])
    cfg = LlavaOnevisionConfig(text_config={"model_type": "qwen2", **TEXT}, vision_config=VISION,
                               image_token_index=tok.token_to_id("<image>"),
                               video_token_index=tok.token_to_id("<video>"))
    model = randomize(LlavaOnevisionForConditionalGeneration(cfg), seed)
    saved = root / "saved"
    model.save_pretrained(saved)
    tok.save(str(saved / "tokenizer.json"))
    state = load_file(str(saved / "model.safetensors"))
    dirs = {}
    for layout in ("llava-hf", "llava-hf-4.52", "llava-hf-5"):
        d = root / layout
        d.mkdir()
        for f in ("config.json", "tokenizer.json"):
            shutil.copy(saved / f, d / f)
        save_file({_rename(k, layout): v for k, v in state.items()}, str(d / "model.safetensors"))
        dirs[layout] = d
    assert json.loads((saved / "config.json").read_text())["model_type"] == "llava_onevision"
    return model, dirs


@torch.no_grad()
def llava_hf_answer_logits(model, pixels: torch.Tensor, ids: list[int], placeholder: int) -> torch.Tensor:
    """Reference logits at the last position, glued from transformers' own LLaVA-OneVision parts the way the
    "pad" path runs them: tower hidden_states[-1] -> projector -> + image_newline, spliced at the placeholder."""
    inner = model.model
    feats = inner.vision_tower(pixels[None], output_hidden_states=True).hidden_states[-1][0]
    image = torch.cat((inner.multi_modal_projector(feats), inner.image_newline[None]))
    p = ids.index(placeholder)
    emb = inner.language_model.embed_tokens
    x = torch.cat((emb(torch.tensor(ids[:p])), image, emb(torch.tensor(ids[p + 1:]))))[None]
    h = inner.language_model(inputs_embeds=x).last_hidden_state[0, -1]
    return model.lm_head(h)
