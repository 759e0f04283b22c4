"""Tests of verifiers.py: parity with the original code's fixtures, transformers oracles, the KV-cached PARM
follow-up, batching, reflection and the error messages. Everything runs on CPU in float32."""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import verifiers as V  # noqa: E402
from data import CheckpointError  # noqa: E402

from conftest import FIXTURES as FX  # noqa: E402
TASKS = ("orm", "clarity", "potential")


# ----------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def expected():
    from safetensors.torch import load_file

    meta = json.loads((FX / "expected.json").read_text())
    return meta, load_file(str(FX / "expected.safetensors"))


@pytest.fixture(scope="module")
def fx_verifier():
    return V.load_verifier(FX / "llava")


@pytest.fixture(scope="module")
def reward_image():
    return data.load_image(FX / json.loads((FX / "inputs.json").read_text())["llava"]["image"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return V.write_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return V.load_verifier(tiny_dir)


def question_for(task: str, prompt: str):
    return {"orm": V.orm_question, "clarity": V.clarity_question, "potential": V.potential_question}[task](prompt)


def images_of_every_kind(n: int, seed: int = 0) -> list:
    """PIL images (square and not), float tensors in [-1, 1] and uint8 arrays of various sizes."""
    from PIL import Image

    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = [(256, 256), (200, 300), (320, 180), (64, 64)][i % 4]
        arr = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append([Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1, arr][i % 3])
    return out


# ----------------------------------------------------------------------------------------------------------
# parity with the original code (fixtures)


def test_pixels_match_fixture(expected, reward_image):
    _, t = expected
    assert reward_image.size != (reward_image.size[1], reward_image.size[0])  # exercises expand2square
    torch.testing.assert_close(V.preprocess(reward_image), t["llava.pixel_values"], atol=1e-6, rtol=0)


def test_vision_features_and_image_embeddings_match_fixture(expected, fx_verifier, reward_image):
    _, t = expected
    px = V.preprocess(reward_image)[None]
    with torch.inference_mode():
        torch.testing.assert_close(fx_verifier.model.vision.embed(px)[0], t["llava.vision_embeddings"],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fx_verifier.model.vision(px)[0], t["llava.vision_features"], atol=1e-4, rtol=1e-4)
        image = fx_verifier.model.encode_images(px)[0]
    assert image.shape[0] == 730 == fx_verifier.model.cfg.n_image_tokens
    torch.testing.assert_close(image, t["llava.image_embeds"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_prompt_rendering_and_token_ids_are_exact(expected, fx_verifier, task):
    meta, t = expected
    e = meta["llava"]["tasks"][task]
    q = question_for(task, meta["llava"]["reward_prompt"])
    assert V.render_chat(q) == e["prompt"]
    ids = fx_verifier.tokenize(q)
    assert ids == t[f"llava.{task}.input_ids"].tolist()
    assert ids.index(V.IMAGE_PLACEHOLDER) == e["image_placeholder_index"]


@pytest.mark.parametrize("task", TASKS)
def test_answer_logits_and_hidden_states_match_fixture(expected, fx_verifier, reward_image, task):
    meta, t = expected
    q = question_for(task, meta["llava"]["reward_prompt"])
    trace = []
    logits = fx_verifier.answer_logits([reward_image], [q], trace)[0]
    assert logits.shape == (meta["llava"]["len_tokenizer"],)
    torch.testing.assert_close(logits, t[f"llava.{task}.logits"], atol=1e-4, rtol=1e-4)
    assert trace[0].shape[1] == meta["llava"]["tasks"][task]["embedded_seq_len"]
    torch.testing.assert_close(torch.stack([h[0, -1] for h in trace]), t[f"llava.{task}.hidden_last"],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack([h[0].mean(0) for h in trace]), t[f"llava.{task}.hidden_mean"],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_yes_no_probabilities_both_ways_match_fixture(expected, fx_verifier, reward_image, task):
    meta, t = expected
    e = meta["llava"]["tasks"][task]
    q = question_for(task, meta["llava"]["reward_prompt"])
    full = fx_verifier.judge([reward_image], [q])[0]
    released = fx_verifier.judge([reward_image], [q], released_scores=True)[0]
    assert abs(full.p_yes - e["p_yes_raw_full_softmax"]) < 1e-5
    assert abs(full.p_no - e["p_no_raw_full_softmax"]) < 1e-5
    assert abs(released.p_yes - e["p_yes_selector"]) < 1e-5
    assert abs(released.p_no - e["p_no_selector"]) < 1e-5
    assert full.token_id == e["greedy_first_token_id"] and full.answer == "yes"
    # the filtered scores themselves: same survivors, same values
    scores = V.released_filter(t[f"llava.{task}.logits"], fx_verifier.top_k, fx_verifier.top_p)
    ref = t[f"llava.{task}.scores"]
    assert torch.equal(torch.isfinite(scores), torch.isfinite(ref))
    assert int(torch.isfinite(ref).sum()) == e["n_finite_scores_after_warpers"]
    torch.testing.assert_close(scores[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_sampled_decision_replays_the_released_draw(expected, fx_verifier, reward_image, task):
    meta, _ = expected
    e = meta["llava"]["tasks"][task]
    q = question_for(task, meta["llava"]["reward_prompt"])
    g = torch.Generator().manual_seed(e["torch_manual_seed_before_call"])
    j = fx_verifier.judge([reward_image], [q], decide="sample", generator=g)[0]
    assert j.token_id == e["sampled_first_token_id"] and j.answer == e["sampled_first_token"]


def test_loader_truncates_vocabulary_and_drops_the_last_vision_layer(expected, fx_verifier):
    meta, _ = expected
    load, llava = meta["llava_load"], meta["llava"]
    cfg = fx_verifier.model.cfg
    assert cfg.vocab_size == load["checkpoint_vocab_rows"] and cfg.n_vocab == load["rows_after_resize_to_len_tokenizer"]
    assert len(fx_verifier.model.vision.encoder.layers) == load["vision_layers_in_checkpoint"]
    assert cfg.vision.n_layer == load["vision_layers_in_hub_config"] - 1
    dropped = (cfg.vocab_size - cfg.n_vocab) * cfg.hidden_size * 2  # embed_tokens + lm_head rows cut
    assert sum(p.numel() for p in fx_verifier.model.parameters()) + dropped == load["n_params"]
    assert (fx_verifier.yes_id, fx_verifier.no_id) == (llava["yes_token_id"], llava["no_token_id"])
    assert (fx_verifier.top_k, fx_verifier.top_p) == (llava["generation_config"]["top_k"],
                                                      llava["generation_config"]["top_p"])


# ----------------------------------------------------------------------------------------------------------
# hand-computed values


def test_presets_have_the_released_parameter_counts():
    # counts from the fact sheet's Sec. 8: stored, and after truncating the vocabulary to 151646 rows
    counts = {"0.5b": (893_618_208, 893_358_368), "7b": (8_030_348_832, 8_027_352_608)}
    for name, (stored, truncated) in counts.items():
        cfg = V.LlavaConfig.from_preset(name)
        for c, want in ((cfg, stored), (replace(cfg, n_vocab=151646), truncated)):
            with torch.device("meta"):
                model = V.LlavaOneVision(c)
            assert sum(p.numel() for p in model.parameters()) == want, name
    assert set(V.LlavaConfig.presets()) >= {"0.5b", "7b", "tiny"}


def test_lmms_lab_key_names_of_the_05b():
    with torch.device("meta"):
        model = V.LlavaOneVision(V.LlavaConfig.from_preset("0.5b"))
    keys = V.key_map(model, V.LAYOUTS["lmms-lab"])
    tower = "model.vision_tower.vision_tower.vision_model."
    assert "lm_head.weight" not in keys  # tied: the 0.5B stores no lm_head
    assert tower + "encoder.layers.25.mlp.fc2.bias" in keys and tower + "encoder.layers.26.mlp.fc2.bias" not in keys
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.image_newline",
            tower + "post_layernorm.weight", "model.layers.23.self_attn.q_proj.bias"} <= set(keys)
    assert "model.layers.0.self_attn.o_proj.bias" not in keys


def test_released_filter_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    # top-2 keeps 3.0 and 2.0
    assert torch.isfinite(V.released_filter(logits, 2, 1.0)).tolist() == [[True, False, False, False, True]]
    # softmax of the full row: [.2369, .0871, .0321, .0118, .6439]; ascending cumsum .0118 .0439 .1311 .3680;
    # top_p 0.8 drops the tokens whose cumsum <= 0.2, i.e. -1, 0 and 1
    assert torch.isfinite(V.released_filter(logits, 0, 0.8)).tolist() == [[True, False, False, False, True]]
    assert torch.isfinite(V.released_filter(logits, 0, 0.6)).tolist() == [[False, False, False, False, True]]
    assert torch.isfinite(V.released_filter(logits, 0, 0.0)).tolist() == [[False, False, False, False, True]]
    # the survivors renormalise: p(3.0) = 1 / (1 + e^-1)
    p = V.released_filter(logits, 50, 0.8).softmax(-1)[0, 4]
    assert abs(float(p) - 1 / (1 + np.exp(-1))) < 1e-6


def test_chat_rendering_by_hand():
    assert V.render_chat(["<image> Q?", "yes", "More?"]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image> Q?<|im_end|>\n"
        "<|im_start|>assistant\nyes<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n")
    assert V.prm_question("a dog") == ("<image> This is an intermediate image in the generation process by a prompt: "
                                       "a dog. Does this intermediate image accurately represent the prompt? Please "
                                       "answer yes or no without explanation.")


def test_in_memory_images_equal_the_png_path(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 40, 56, generator=g) * 2.2 - 1.1  # a MAGVIT decode may leave [-1, 1] slightly
    u8 = data.to_uint8_image(x[None])[0]
    data.save_png(u8, tmp_path / "x.png")
    ref = V.preprocess(data.load_image(tmp_path / "x.png"))
    torch.testing.assert_close(V.preprocess(x), ref, atol=0, rtol=0)
    torch.testing.assert_close(V.preprocess(u8), ref, atol=0, rtol=0)
    torch.testing.assert_close(V.preprocess(torch.from_numpy(u8)), ref, atol=0, rtol=0)
    # grey padding: a 1-pixel-tall image is mostly pad, which maps to 127/255 -> 2 * 127 / 255 - 1
    wide = V.preprocess(Image.new("RGB", (30, 2), (255, 0, 0)))
    assert abs(float(wide[0, 0, 0]) - (127 / 255 - 0.5) / 0.5) < 1e-6


# ----------------------------------------------------------------------------------------------------------
# transformers oracles


@pytest.fixture(scope="module")
def hf_qwen(tmp_path_factory):
    """A random transformers Qwen2ForCausalLM and the same weights loaded into our Qwen2LM."""
    import _tiny_hf

    path = tmp_path_factory.mktemp("hf_qwen2")
    ref = _tiny_hf.qwen2(path)
    cfg = replace(V.LlavaConfig.from_preset("tiny"), n_vocab=_tiny_hf.TEXT["vocab_size"])
    with torch.device("meta"):
        lm = V.Qwen2LM(cfg)
    data.load_state(lm, path, V.key_map(lm, (("lm_head.", "lm_head."), ("", "model."))))
    return ref, lm


def _right_padded(lm, seqs):
    x = torch.zeros(len(seqs), max(len(s) for s in seqs), lm.cfg.hidden_size)
    for b, s in enumerate(seqs):
        x[b, :len(s)] = lm.embed_tokens(s)
    return x, torch.tensor([len(s) for s in seqs])


def test_qwen2_matches_transformers(hf_qwen):
    ref, lm = hf_qwen
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 448, (n,), generator=g) for n in (11, 7)]
    with torch.inference_mode():
        trace = []
        ours = lm.logits(lm(*_right_padded(lm, seqs), trace=trace))
        for b, s in enumerate(seqs):  # ragged batch vs each sequence alone in transformers
            out = ref(s[None], output_hidden_states=True)
            torch.testing.assert_close(ours[b], out.logits[0, -1], atol=1e-4, rtol=1e-4)
        for h_ours, h_ref in zip(trace, out.hidden_states):
            torch.testing.assert_close(h_ours[1, :7], h_ref[0], atol=1e-4, rtol=1e-4)


def test_kv_cache_extensions_match_transformers(hf_qwen):
    """Ragged prefill, then two ragged extensions, with garbage in every cache slot no row owns: the masks and
    per-row positions must make each row equal transformers on its concatenated tokens."""
    ref, lm = hf_qwen
    g = torch.Generator().manual_seed(1)
    parts = [[torch.randint(0, 448, (n,), generator=g) for n in lens] for lens in ((9, 3, 1), (4, 6, 2))]
    cache = lm.new_cache(2, 9 + 6 + 2)
    with torch.inference_mode():
        for step in range(3):
            if step:
                cache.k.masked_fill_(~cache.valid[None, :, None, :, None], 1e3)
                cache.v.masked_fill_(~cache.valid[None, :, None, :, None], -1e3)
            ours = lm.logits(lm(*_right_padded(lm, [p[step] for p in parts]), cache))
            for b, p in enumerate(parts):
                want = ref(torch.cat(p[:step + 1])[None]).logits[0, -1]
                torch.testing.assert_close(ours[b], want, atol=1e-4, rtol=1e-4)


def test_siglip_matches_transformers(tmp_path):
    import _tiny_hf

    ref = _tiny_hf.siglip(tmp_path)
    with torch.device("meta"):
        tower = V.SiglipTower(V.LlavaConfig.from_preset("tiny").vision)
    data.load_state(tower, tmp_path, V.key_map(tower, ()))
    px = torch.rand(2, 3, 384, 384, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        out = ref(px, output_hidden_states=True)
        ours = tower(px)
    torch.testing.assert_close(ours, out.hidden_states[-1], atol=1e-4, rtol=1e-4)
    assert (ours - out.last_hidden_state).abs().max() > 1e-2  # post_layernorm is not applied


def test_llava_hf_layouts_load_and_match_transformers(tmp_path, tiny_dir, reward_image):
    import _tiny_hf

    ref, dirs = _tiny_hf.llava_hf(tmp_path, tiny_dir / "tokenizer.json")
    q = V.orm_question("a photo of a red apple")
    want = None
    for layout, d in dirs.items():
        keys = data.find_weight_files(d)
        assert V.detect_layout(keys) == layout
        v = V.load_verifier(d)
        assert v.model.cfg.n_vocab == v.tokenizer.get_vocab_size() - 2  # <image>, <video> are not LM rows
        ids = v.tokenize(q)
        if want is None:
            want = _tiny_hf.llava_hf_answer_logits(ref, V.preprocess(reward_image), ids, V.IMAGE_PLACEHOLDER)
        torch.testing.assert_close(v.answer_logits([reward_image], [q])[0], want[:v.model.cfg.n_vocab],
                                   atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# the tiny checkpoint, batching, the KV cache, reflection


def test_tiny_checkpoint_is_in_the_lmms_lab_format(tiny_dir, tiny):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert V.detect_layout(index["weight_map"]) == "lmms-lab"
    assert data.read_config(tiny_dir)["model_type"] == "llava_qwen"
    assert tiny.model.cfg.vision.n_patches == 729 and tiny.model.cfg.n_vocab < tiny.model.cfg.vocab_size
    from safetensors import safe_open

    with safe_open(tiny_dir / shards[0], "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    j = tiny.judge(images_of_every_kind(1), [V.orm_question("a photo of a dog")])[0]
    assert j.p_yes + j.p_no > 0.5 and j.answer in ("yes", "no")  # the nudge makes yes/no dominate


def test_tied_lm_head_like_the_05b(tmp_path, tiny_dir):
    """The 0.5B stores no lm_head (tied to embed_tokens); lmms-lab's 7B config says model_type "llava"."""
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_dir, tmp_path / "tied")
    shard = d / "model-00001-of-00002.safetensors"
    save_file({k: v for k, v in load_file(str(shard)).items() if k != "lm_head.weight"}, str(shard))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["lm_head.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing keys.*lm_head.weight"):
        V.load_verifier(d)  # untied by config, so the absent lm_head is an error
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True, "model_type": "llava"}))
    tied = V.load_verifier(d)
    assert tied.model.lm.lm_head is None
    untied = V.load_verifier(tiny_dir)
    with torch.no_grad():
        untied.model.lm.lm_head.weight.copy_(untied.model.lm.embed_tokens.weight)
    images, qs = images_of_every_kind(2), [V.orm_question("a dog"), V.prm_question("a cat")]
    torch.testing.assert_close(tied.answer_logits(images, qs), untied.answer_logits(images, qs), atol=1e-5, rtol=0)


def test_tiny_checkpoint_is_deterministic(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    again = V.write_tiny_llava(tmp_path / "again", seed=0)
    other = V.write_tiny_llava(tmp_path / "other", seed=1)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        a, b, c = (load_file(str(d / shard)) for d in (tiny_dir, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tiny_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_batch_of_8_matches_one_by_one(tiny):
    images = images_of_every_kind(8)
    prompts = ["a photo of a dog", "a photo of a red apple and a blue cup", "a cat", "two giraffes",
               "a photo of a purple clock left of a bench", "a bowl", "a photo of three sheep", "a pizza"]
    builders = [V.orm_question, V.prm_question, V.clarity_question, V.potential_question]
    questions = [builders[i % 4](p) for i, p in enumerate(prompts)]
    forwards = tiny.forwards
    batched = tiny.judge(images, questions)
    assert tiny.forwards == forwards + 1  # one forward for the whole batch
    assert len({j.tokens_processed for j in batched}) > 1  # the rows really have different lengths
    for img, q, b in zip(images, questions, batched):
        one = tiny.judge([img], [q])[0]
        assert abs(one.p_yes - b.p_yes) < 1e-5 and abs(one.p_no - b.p_no) < 1e-5
        assert one.answer == b.answer and one.tokens_processed == b.tokens_processed
    released = tiny.judge(images, questions, released_scores=True)
    for img, q, b in zip(images, questions, released):
        one = tiny.judge([img], [q], released_scores=True)[0]
        assert abs(one.p_yes - b.p_yes) < 1e-5 and abs(one.p_no - b.p_no) < 1e-5


def test_cached_potential_turn_equals_the_full_two_turn_prompt(tiny):
    images = images_of_every_kind(3, seed=1)
    prompts = ["a photo of a dog", "a photo of a red apple and a blue cup on a wooden table next to a green chair "
               "and a white horse in the kitchen", "a cat"]
    clarity, handles = tiny.judge_clarity(images, prompts)
    full = tiny.judge(images, [V.potential_question(p) for p in prompts])
    # only some paths pass clarity in PARM: follow up on a reordered subset of very different lengths
    pick = [2, 1]
    before = tiny.tokens_processed
    cached = tiny.judge_potential([handles[i] for i in pick], [prompts[i] for i in pick])
    new_tokens = [len(tiny.tokenize(V.potential_question(prompts[i]))) - len(tiny.tokenize(V.clarity_question(
        prompts[i]))) for i in pick]
    assert tiny.tokens_processed - before == sum(new_tokens)
    for i, j in zip(pick, cached):
        assert j.tokens_processed == new_tokens[pick.index(i)]
        assert abs(j.p_no - full[i].p_no) < 1e-5 and abs(j.p_yes - full[i].p_yes) < 1e-5
        assert full[i].tokens_processed > 700 + j.tokens_processed  # the uncached run redoes the image
    assert [c.p_yes for c in clarity] == [c.p_yes for c in tiny.judge(images, [V.clarity_question(p) for p in prompts])]


def test_any_question_about_a_cached_image_reuses_the_image(tiny):
    images = images_of_every_kind(2, seed=3)
    _, handles = tiny.judge_clarity(images, ["a dog", "a cat"])
    orm = [V.orm_question("a dog"), V.orm_question("a cat")]
    cached, full = tiny.judge_followup(handles, orm), tiny.judge(images, orm)
    for c, f in zip(cached, full):
        assert abs(c.p_yes - f.p_yes) < 1e-5 and c.tokens_processed < f.tokens_processed - 700
    # asking the cached conversation again re-runs only its answer position
    clarity = [V.clarity_question("a dog"), V.clarity_question("a cat")]
    again, first = tiny.judge_followup(handles, clarity), tiny.judge(images, clarity)
    for a, f in zip(again, first):
        assert a.tokens_processed == 1 and abs(a.p_yes - f.p_yes) < 1e-5


@pytest.fixture(scope="module")
def chatty(tiny_dir):
    """The tiny model with a random, un-nudged lm_head: its greedy text varies instead of repeating "yes"."""
    v = V.load_verifier(tiny_dir)
    with torch.no_grad():
        w = v.model.lm.lm_head.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    return v


def test_reflect_is_greedy_bounded_and_stops(chatty):
    tiny = chatty
    images = images_of_every_kind(2, seed=2)
    prompts = ["a photo of a dog", "a photo of a red apple and a blue cup"]
    # reference: greedy decoding without a cache, re-running the whole sequence for every token
    want = []
    with torch.inference_mode():
        for img, p in zip(images, prompts):
            ids = tiny.tokenize(V.reflection_question(p))
            image = tiny.model.encode_images(tiny.pixels([img]))
            out = []
            for _ in range(6):
                x, n = tiny.model.splice([ids + out], image)
                out.append(int(tiny.model.lm.logits(tiny.model.lm(x, n)).argmax()))
            want.append(out)
    texts = tiny.reflect(images, prompts, max_new_tokens=6, stop_tokens=())
    assert texts == [tiny.tokenizer.decode(w, skip_special_tokens=True).strip() for w in want]
    # a stop token ends the text before it: stop on each row's last token that had not appeared before
    for b in range(2):
        k = max(i for i, tok in enumerate(want[b]) if tok not in want[b][:i])
        stop = tiny.tokenizer.id_to_token(want[b][k])
        got = tiny.reflect([images[b]], [prompts[b]], max_new_tokens=6, stop_tokens=[stop])[0]
        assert got == tiny.tokenizer.decode(want[b][:k], skip_special_tokens=True).strip()
    assert min(len(set(w)) for w in want) > 3  # the reference really generates varied text
    assert V.reflection_question("a dog").startswith("<image> ")


def test_tiny_judgment_of_a_256px_image_is_fast(tiny):
    img = images_of_every_kind(1)[0]
    tiny.judge([img], [V.orm_question("a dog")])  # warm-up
    t = time.perf_counter()
    tiny.judge([img], [V.orm_question("a dog")])
    assert time.perf_counter() - t < 5.0  # typically ~0.05 s; generous for loaded CI machines


# ----------------------------------------------------------------------------------------------------------
# bad input: one clear error each


@pytest.mark.parametrize("question, match", [
    ("Is this a dog? Answer yes or no.", "has 0 <image>"),
    ("<image> <image> Are these the same?", "has 2 <image>"),
    (("<image> Q?", "yes"), "odd count"),
])
def test_bad_questions(tiny, question, match):
    with pytest.raises(ValueError, match=match):
        tiny.judge(images_of_every_kind(1), [question])


@pytest.mark.parametrize("image, error, match", [
    ("cat.png", TypeError, "str, not an image"),
    (None, TypeError, "NoneType, not an image"),
    (np.zeros((32, 32, 3), np.float32), ValueError, r"dtype float32.*uint8 \[H, W, 3\]"),
    (torch.zeros(32, 32, 3), ValueError, r"float tensor of shape \[32, 32, 3\]"),
])
def test_bad_images(tiny, image, error, match):
    with pytest.raises(error, match=match):
        tiny.judge([image], [V.orm_question("a dog")])


def test_bad_call_arguments(tiny):
    img = images_of_every_kind(2)
    with pytest.raises(ValueError, match="2 images and 1 questions"):
        tiny.judge(img, [V.orm_question("a dog")])
    with pytest.raises(TypeError, match="must be a list"):
        tiny.judge(img[0], V.orm_question("a dog"))
    with pytest.raises(ValueError, match="decide='best'"):
        tiny.judge(img[:1], [V.orm_question("a dog")], decide="best")
    _, handles = tiny.judge_clarity(img[:1], ["a dog"])
    other = replace(handles[0], ids=(handles[0].ids[0] + 1,) + handles[0].ids[1:])  # differs before the image
    with pytest.raises(ValueError, match="does not extend the cached one"):
        tiny.judge_followup([other], [V.potential_question("a dog")])
    with pytest.raises(TypeError, match="TurnCache"):
        tiny.judge_potential(["not a handle"], ["a dog"])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def test_missing_shard_is_named(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "ckpt")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        V.load_verifier(d)


def test_wrong_layout_and_wrong_model(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_dir, tmp_path / "renamed")
    for shard in d.glob("model-*.safetensors"):
        save_file({"transformer." + k: v for k, v in load_file(str(shard)).items()}, str(shard))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {"transformer." + k: f for k, f in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no LLaVA-OneVision layout"):
        V.load_verifier(d)
    with pytest.raises(CheckpointError, match="model_type None: this is not a LLaVA-OneVision"):
        V.load_verifier(FX / "showo")
    # the right layout but a config that does not belong to the weights
    d = _copy(tiny_dir, tmp_path / "mismatch")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="missing keys.*model.layers.2"):
        V.load_verifier(d)


def test_tokenizer_without_chat_tokens(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "ckpt")
    data.train_tiny_bpe(data.tiny_corpus() + ["yes", "no"] * 20, 400, qwen_style=True).save(str(d / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"lacks <\|endoftext\|>, <\|im_start\|>, <\|im_end\|>"):
        V.load_verifier(d)
