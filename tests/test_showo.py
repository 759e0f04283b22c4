"""Show-o + MAGVIT-v2 parity with the original code (fixtures), decoding semantics, loaders and bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cotgen
import data
from data import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def showo(fixtures):
    _, _, fx = fixtures
    return cotgen.load_showo(fx / "showo")


@pytest.fixture(scope="module")
def magvit(fixtures):
    return cotgen.load_magvit(fixtures[2] / "magvitv2")


def additive_mask(allowed):
    """The numeric form the original code passes to SDPA: 0 where allowed, float32(int64 min) where blocked."""
    return torch.where(allowed, 0.0, float(torch.iinfo(torch.int64).min)).to(torch.float32)


def image_slots(ids, c):
    return ids[:, c.text_len + 1: c.text_len + 1 + c.num_vq_tokens]


# ---- parity with the fixtures --------------------------------------------------------------------------


def test_special_token_ids(showo, fixtures):
    _, J, _ = fixtures
    _, tok = showo
    for name, i in J["showo"]["special_token_ids"].items():
        assert {"<|pad|>": tok.pad_id, "<|sot|>": tok.bos_id, "<|eot|>": tok.eos_id}.get(name, tok.tok.token_to_id(name)) == i
    assert tok.text_ids(J["showo"]["prompt"])[1:] == J["showo"]["prompt_text_token_ids"]
    assert tok.text_ids(J["showo"]["long_prompt"])[1:] == J["showo"]["long_prompt_text_token_ids"]


def test_t2i_layout_and_masks(showo, fixtures):
    E, J, _ = fixtures
    _, tok = showo
    ids = tok.t2i_ids([J["showo"]["prompt"], J["showo"]["uncond_prompt"]])
    assert torch.equal(ids, E["showo.t2i_input_ids"])
    assert torch.equal(tok.t2i_ids([J["showo"]["long_prompt"]]), E["showo.t2i_long_prompt_input_ids"])
    assert tok.is_truncated(J["showo"]["long_prompt"]) and not tok.is_truncated(J["showo"]["prompt"])
    allowed = cotgen.omni_attention_mask(ids, tok.pad_id, tok.soi_id, tok.eoi_id)
    assert torch.equal(allowed, E["showo.attention_allowed"])
    assert torch.equal(additive_mask(allowed), E["showo.attention_mask"])


def test_forward_logits_and_hidden_states(showo, fixtures):
    E, _, _ = fixtures
    model, tok = showo
    ids = E["showo.partial.input_ids"]
    with torch.inference_mode():
        logits, hidden = model(ids, cotgen.omni_attention_mask(ids, tok.pad_id, tok.soi_id, tok.eoi_id),
                               output_hidden_states=True)
    torch.testing.assert_close(logits, E["showo.partial.logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(hidden), E["showo.partial.hidden_states"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fast", [True, False])
def test_guided_probs_of_partial_state(showo, fixtures, fast):
    E, J, _ = fixtures
    model, tok = showo
    paths = cotgen.Paths(model, tok, J["showo"]["prompt"], 1, cfg=J["showo"]["guidance_scale"], fast=fast)
    probs = paths.probs(image_slots(E["showo.partial.input_ids"][:1], model.config))
    torch.testing.assert_close(probs, torch.softmax(E["showo.partial.cfg_logits"], -1), atol=1e-5, rtol=0)


def test_cosine_schedule_is_float32(fixtures):
    E, J, _ = fixtures
    S = J["showo"]["timesteps"]
    sched = torch.stack([cotgen.cosine_schedule((s + 1) / S) for s in range(S)])
    assert sched.dtype == torch.float32 and torch.equal(sched, E["showo.cosine_schedule"])


@pytest.mark.parametrize("run", ["gen", "gen_short"])
@pytest.mark.parametrize("fast", [True, False])
def test_generation_reproduces_original_runs(showo, fixtures, run, fast):
    E, J, _ = fixtures
    model, tok = showo
    rec = J["showo"][run]
    gen = torch.Generator(device="cpu").manual_seed(rec["generator_seed"])
    paths = cotgen.Paths(model, tok, J["showo"]["prompt"], 1, steps=rec["timesteps"], cfg=rec["guidance_scale"],
                         generators=[gen], fast=fast, keep_probs=True)
    steps = list(paths)
    assert len(steps) == rec["timesteps"]
    assert [s.mask_len[0] for s in steps] == E[f"showo.{run}.step_mask_len"].tolist()
    assert [s.temperature[0] for s in steps] == E[f"showo.{run}.step_temperature"].tolist()
    assert torch.equal(torch.cat([s.masking for s in steps]), E[f"showo.{run}.step_masking"])
    torch.testing.assert_close(torch.cat([s.probs for s in steps]), E[f"showo.{run}.step_probs"], atol=1e-5, rtol=0)
    assert torch.equal(paths.final_tokens(), E[f"showo.{run}.final_tokens"])


@pytest.mark.parametrize("run", ["gen", "gen_short"])
def test_teacher_forced_step_probs(showo, fixtures, run):
    E, J, _ = fixtures
    model, tok = showo
    paths = cotgen.Paths(model, tok, J["showo"]["prompt"], 1, cfg=J["showo"]["guidance_scale"])
    probs = paths.probs(E[f"showo.{run}.step_image_tokens_in"])
    torch.testing.assert_close(probs, E[f"showo.{run}.step_probs"], atol=1e-5, rtol=0)


def test_path_result_does_not_depend_on_batch(showo, fixtures):
    """The recorded run, decoded as path 1 of 3 with other paths around it, gives the same tokens."""
    E, J, _ = fixtures
    model, tok = showo
    gens = [torch.Generator().manual_seed(s) for s in (1, J["showo"]["gen"]["generator_seed"], 2)]
    paths = cotgen.Paths(model, tok, J["showo"]["prompt"], 3, steps=18, generators=gens)
    for _ in paths:
        pass
    assert torch.equal(paths.final_tokens()[1:2], E["showo.gen.final_tokens"])


def test_stopped_path_resumes_to_the_same_image(showo, fixtures):
    E, J, _ = fixtures
    model, tok = showo
    gens = [torch.Generator().manual_seed(s) for s in (J["showo"]["gen"]["generator_seed"], 5, 6)]
    paths = cotgen.Paths(model, tok, J["showo"]["prompt"], 3, steps=18, generators=gens)
    advanced = []
    for step in paths:
        advanced.append(list(step.paths))
        if step.step[0] == 7:
            paths.stop(0)
    assert advanced[8] == [1, 2] and paths.step_of[0] == 8 and paths.live() == []
    paths.resume(0)
    for step in paths:
        assert step.paths == [0]
    assert torch.equal(paths.final_tokens()[0:1], E["showo.gen.final_tokens"])


def test_magvit_decode_and_encode(magvit, fixtures):
    E, _, _ = fixtures
    codes = E["magvit.decode_codes"]
    with torch.inference_mode():
        assert torch.equal(magvit.quantize.codes_to_z(codes, (4, 4)), E["magvit.decode_zq"])
        torch.testing.assert_close(magvit.decode_code(codes), E["magvit.decoded"], atol=1e-4, rtol=1e-4)
        assert torch.equal(magvit.get_code(E["magvit.encode_pixels"]), E["magvit.encode_codes"])
        for run in ("gen", "gen_short"):
            img = magvit.decode_code(E[f"showo.{run}.final_tokens"])
            torch.testing.assert_close(img, E[f"showo.{run}.decoded"], atol=1e-4, rtol=1e-4)
            assert (data.to_uint8_image(img) == E[f"showo.{run}.decoded_uint8"].numpy()).all()


def test_lfq_bit_order_by_hand():
    signs, power = cotgen.LFQ.tables(3)
    assert power.tolist() == [4, 2, 1]
    assert signs[6].tolist() == [1.0, 1.0, -1.0]  # 6 = 0b110, channel 0 is the MSB


def test_omni_mask_by_hand():
    # ids: pad pad t2i x eos soi img img eoi  (pad=0, soi=5, eoi=6)
    ids = torch.tensor([[0, 0, 9, 9, 9, 5, 7, 7, 6]])
    a = cotgen.omni_attention_mask(ids, 0, 5, 6)[0, 0]
    assert a[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0]          # pad: causal among pads
    assert a[3].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0]          # text: causal, no pads
    for q in (5, 6, 8):                                          # soi, image, eoi: all non-pad keys
        assert a[q].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]


# ---- fast path agrees with the full forward at another shape ------------------------------------------------


def test_fast_path_matches_full_forward_on_tiny(tiny):
    model, tok = cotgen.load_showo(tiny["showo"])
    tokens = torch.full((3, model.config.num_vq_tokens), model.config.mask_token_id)
    g = torch.Generator().manual_seed(0)
    known = torch.rand(tokens.shape, generator=g) < 0.5
    tokens[known] = torch.randint(0, 64, tokens.shape, generator=g)[known] + model.config.image_offset
    probs = [cotgen.Paths(model, tok, "a red dog", 3, fast=f).probs(tokens) for f in (True, False)]
    torch.testing.assert_close(probs[0], probs[1], atol=1e-6, rtol=0)


# ---- loading: layouts, dtype, and every kind of bad checkpoint -----------------------------------------------


def copy_showo(fx: Path, tmp: Path) -> Path:
    d = tmp / "showo"
    shutil.copytree(fx / "showo", d)
    shutil.copytree(fx / "phi", tmp / "phi")
    return d


def test_released_file_name_and_sharded_layout(fixtures, showo, tmp_path):
    _, _, fx = fixtures
    d = copy_showo(fx, tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.safetensors")
    m1, _ = cotgen.load_showo(d)
    sd = load_file(d / "pytorch_model.safetensors")
    (d / "pytorch_model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:20], "model-00002-of-00002.safetensors": keys[20:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, d / name)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    m2, _ = cotgen.load_showo(d, dtype="bfloat16")
    ref = showo[0].state_dict()
    for k, v in m1.state_dict().items():
        assert torch.equal(v, ref[k])
        assert m2.state_dict()[k].dtype == torch.bfloat16
        assert torch.equal(m2.state_dict()[k], ref[k].bfloat16())


def test_bf16_generation_runs(tiny):
    model, tok = cotgen.load_showo(tiny["showo"], dtype=torch.bfloat16)
    codes = cotgen.generate(model, tok, "a photo of a cat", n=2, steps=4)
    assert codes.shape == (2, model.config.num_vq_tokens) and codes.max() < model.config.codebook_size


def expect_error(match, fn, *a, **kw):
    with pytest.raises((CheckpointError, ValueError, FileNotFoundError)) as e:
        fn(*a, **kw)
    assert match in str(e.value), str(e.value)
    return str(e.value)


def test_bad_checkpoints(fixtures, tmp_path):
    _, _, fx = fixtures
    expect_error("does not exist", cotgen.load_showo, tmp_path / "nope")
    d = copy_showo(fx, tmp_path)
    sd = load_file(d / "model.safetensors")

    bad = dict(sd)
    bad.pop("showo.lm_head.bias")
    bad["showo.extra.weight"] = torch.zeros(2)
    bad["showo.model.final_layernorm.weight"] = torch.zeros(3)
    save_file(bad, d / "model.safetensors")
    msg = expect_error("missing keys (1): showo.lm_head.bias", cotgen.load_showo, d)
    assert "unexpected keys (1): showo.extra.weight" in msg
    assert "showo.model.final_layernorm.weight: checkpoint [3] vs model [64]" in msg

    # truncated file
    save_file(sd, d / "model.safetensors")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    expect_error("truncated", cotgen.load_showo, d)

    # pickle only
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    expect_error("never loads", cotgen.load_showo, d)

    # a sharded index naming a shard that is not there
    (d / "pytorch_model.bin").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    expect_error("model-00001-of-00002.safetensors", cotgen.load_showo, d)


def test_config_that_contradicts_the_weights(fixtures, tmp_path):
    _, _, fx = fixtures
    d = copy_showo(fx, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "codebook_size": 128, "vocab_size": cfg["vocab_size"] + 64}))
    msg = expect_error("shape mismatches", cotgen.load_showo, d)
    assert "showo.lm_head.weight: checkpoint [498, 64] vs model [562, 64]" in msg and "config.json" in msg
    (d / "config.json").write_text(json.dumps({**cfg, "codebook_size": 128}))
    expect_error("vocab_size 498 != llm_vocab_size", cotgen.load_showo, d)
    (d / "config.json").write_text(json.dumps(cfg))
    phi = json.loads((tmp_path / "phi" / "config.json").read_text())
    (tmp_path / "phi" / "config.json").write_text(json.dumps({**phi, "num_hidden_layers": 3}))
    expect_error("missing keys (18)", cotgen.load_showo, d)


def test_missing_or_wrong_tokenizer(fixtures, tmp_path):
    _, _, fx = fixtures
    d = copy_showo(fx, tmp_path)
    expect_error("nowhere/tokenizer.json not found", cotgen.load_showo, d, tmp_path / "nowhere")
    (tmp_path / "phi" / "tokenizer.json").unlink()
    expect_error("hf download microsoft/phi-1_5", cotgen.load_showo, d)
    # Show-o's own tokenizer copy already has the special tokens: refused with the fix named
    shutil.copy(fx / "showo" / "tokenizer" / "tokenizer.json", tmp_path / "phi" / "tokenizer.json")
    expect_error("llm_vocab_size = 423", cotgen.load_showo, d)


def test_magvit_config_and_tables(fixtures, tmp_path):
    _, _, fx = fixtures
    d = tmp_path / "magvit"
    shutil.copytree(fx / "magvitv2", d)
    sd = load_file(d / "model.safetensors")
    save_file({**sd, "quantize.power_vals": sd["quantize.power_vals"].flip(0)}, d / "model.safetensors")
    expect_error("MSB-first", cotgen.load_magvit, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["oracle_arch"]  # the released config: official full-size defaults, which these weights do not fit
    (d / "config.json").write_text(json.dumps(cfg))
    expect_error("shape mismatches", cotgen.load_magvit, d)
    full = cotgen.MagvitConfig.from_json(cfg)
    assert (full.enc_ch_mult, full.dec_ch_mult, full.dec_num_res_blocks) == ((1, 2, 2, 4, 4), (1, 1, 2, 2, 4), (4, 4, 3, 4, 3))


def test_full_size_magvit_key_set_matches_the_reference():
    with torch.device("meta"):
        m = cotgen.MAGVITv2(cotgen.MagvitConfig())
    params = dict(m.named_parameters())
    assert sum(1 for k in params if k.startswith("encoder.")) == 190
    assert sum(1 for k in params if k.startswith("decoder.")) == 190
    assert sum(p.numel() for p in params.values()) == 95_387_004
    assert params["decoder.up.3.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)


def test_full_size_showo_parameter_count():
    with torch.device("meta"):
        m = cotgen.Showo(cotgen.ShowoConfig.preset("show-o-256"))
    assert len(cotgen.showo_key_map(m.config)) == 437
    assert sum(p.numel() for p in m.parameters()) == 1_448_176_770
    assert cotgen.ShowoConfig.preset("show-o-512").seq_len == 1155 and m.config.seq_len == 387


def test_bad_arguments(showo):
    model, tok = showo
    expect_error("at least 1", cotgen.Paths, model, tok, "x", 0)
    expect_error("at least 1", cotgen.Paths, model, tok, "x", 1, steps=0)
    expect_error("unknown dtype 'float8'", data.parse_dtype, "float8")
    expect_error("unknown device", data.parse_device, "tpu:0")
    expect_error("unknown Show-o preset", cotgen.ShowoConfig.preset, "huge")


# ---- sample.py -------------------------------------------------------------------------------------------


def run_sample(*args, cache):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args, "--cache", str(cache)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_sample_tiny_end_to_end(tiny, tmp_path):
    cache = tiny["showo"].parent.parent.parent
    out = tmp_path / "out"
    r = run_sample("--tiny", "--prompt", "a photo of a red apple", "--n", "2", "--steps", "5", "--out", str(out),
                   cache=cache)
    assert r.returncode == 0, r.stderr
    assert "step 5/5" in r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["image.png", "path_00.png", "path_01.png", "paths.png", "steps.png"]
    from PIL import Image
    assert Image.open(out / "steps.png").size[0] > 5 * 64  # five x̂0 columns


@pytest.mark.parametrize("args,message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--dtype", "int3"], "unknown dtype"),
    (["--device", "gpu7"], "unknown device"),
])
def test_sample_bad_flags_write_nothing(tiny, tmp_path, args, message):
    out = tmp_path / "out"
    r = run_sample("--tiny", "--prompt", "a cat", "--out", str(out), *args, cache=tiny["showo"].parent.parent.parent)
    assert r.returncode == 2 and message in r.stderr and not out.exists()


def test_sample_without_weights_says_what_to_download(tmp_path):
    r = run_sample("--prompt", "a cat", "--showo", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                   cache=tmp_path)
    assert r.returncode == 2
    assert "hf download showlab/show-o" in r.stderr and "--showo" in r.stderr and "--tiny" in r.stderr
    assert not (tmp_path / "o").exists()


def test_sample_empty_prompt(tiny, tmp_path):
    r = run_sample("--tiny", "--prompt", " ", "--out", str(tmp_path / "o"), cache=tiny["showo"].parent.parent.parent)
    assert r.returncode == 2 and "--prompt is empty" in r.stderr
