"""The released sizes without the memory they need: `train.memory_estimate` against arithmetic done by hand, the
README's "Many GPUs" figures against it, and the real-size benchmark's code (tests/bench_real.py) run at the tiny
presets. (The parameter counts of the released configs are checked in test_showo.py and test_verifiers.py.)"""
import json
from pathlib import Path

import pytest
import torch

import cotgen
import train
import verifiers as V

ROOT = Path(__file__).resolve().parent.parent


def meta(make):
    with torch.device("meta"):
        return make()


# ---- the arithmetic ---------------------------------------------------------------------------------------


def test_memory_estimate_by_hand():
    c = cotgen.ShowoConfig(vocab_size=100, llm_vocab_size=10, codebook_size=79, num_vq_tokens=16,
                           max_seq_length=8, n_layer=3, n_head=2, n_embd=8, intermediate_size=32)
    model = meta(lambda: cotgen.Showo(c))
    d, i, hd, V_, L = 8, 32, 4, 100, 9 + 1 + 16 + 1
    layer = 4 * (d * d + d) + 2 * 2 * hd + (d * i + i) + (i * d + d) + 2 * d
    root = V_ * d + (V_ * d + V_) + 2 * d
    params = 3 * layer + root
    per_sequence = 3 * 2 * L * (10 * d + 4 * i) + 2 * L * V_ * 4
    e = train.memory_estimate(model, 5, per_example=2, processes=2, fsdp=True, reference=True)
    assert (e.params, e.root, e.layer) == (params, root, layer)
    assert e.state == pytest.approx(16 * params / 2 / 1e9)
    assert e.reference == pytest.approx(4 * params / 1e9)
    assert e.gathered == pytest.approx((8 * root + 4 * layer) / 1e9)
    assert e.activations == pytest.approx(3 * 2 * per_sequence / 1e9)          # ceil(5 / 2) = 3 pairs
    assert e.total == pytest.approx(e.state + e.reference + e.gathered + e.activations)
    one = train.memory_estimate(model, 5, checkpointing=True)
    assert (one.state, one.reference, one.gathered) == (pytest.approx(16 * params / 1e9), 0.0, 0.0)
    assert one.activations == pytest.approx(5 * (3 * 2 * L * d + 2 * L * (10 * d + 4 * i) + 2 * L * V_ * 4) / 1e9)
    # replicated: nothing is sharded or gathered, only the batch is split
    ddp = train.memory_estimate(model, 5, processes=2)
    assert (ddp.state, ddp.gathered) == (one.state, 0.0) and ddp.activations == pytest.approx(3 * per_sequence / 1e9)


def test_verifier_activations_by_hand():
    cfg = V.LlavaConfig.from_preset("tiny")
    e = train.memory_estimate(meta(lambda: V.LlavaOneVision(cfg)), 1)
    H, I, kv = 64, 128, 2 * 16                   # Qwen2: width, MLP width, key/value width (2 heads of 16)
    assert e.layer == (H * H + H) + 2 * (kv * H + kv) + H * H + 3 * H * I + 2 * H     # larger than a SigLIP layer
    L = 730 + train.QUESTION_TOKENS
    lm, tower = 2 * L * (10 * H + 4 * I), 2 * 729 * (10 * 32 + 4 * 64)
    assert e.activations == pytest.approx((2 * lm + 2 * tower) / 1e9)


# ---- the README's figures are the estimate's ----------------------------------------------------------------


def readme_memory(showo, llava) -> tuple[list[str], list[str]]:
    """(the table's lines, phrases of the text) of README: Many GPUs, from `train.memory_estimate` on the
    released configs: DPO on Show-o with batch 10 pairs, SFT of the 7B with batch 8; one GPU, 8 replicated, 8 FSDP."""
    columns = [{}, {"processes": 8}, {"processes": 8, "fsdp": True}]
    dpo = [train.memory_estimate(showo, 10, per_example=2, reference=True, **k) for k in columns]
    sft = [train.memory_estimate(llava, 8, **k) for k in columns]
    sft_ck = [train.memory_estimate(llava, 8, checkpointing=True, **k) for k in columns]
    row = lambda name, cells: f"| {name} | {' | '.join(cells)} |"  # noqa: E731
    gb = lambda x: f"{x:.1f}"  # noqa: E731
    gathered = lambda es: ["", "", gb(es[2].gathered)]  # noqa: E731
    table = ["| job, per GPU, GB | one GPU | 8 GPUs, replicated (DDP) | 8 GPUs, `--fsdp` |", "|---|---|---|---|",
             row("**DPO, Show-o 1.3B, batch 10 pairs**", ["", "", ""]),
             row("weights, gradients, AdamW: 16 B/param", [gb(e.state) for e in dpo]),
             row("frozen reference, fp32", [gb(e.reference) for e in dpo]),
             row("gathered in the step", gathered(dpo)),
             row("activations, 2 sequences a pair", [gb(e.activations) for e in dpo]),
             row("**total**", [f"**{gb(e.total)}**" for e in dpo]),
             row("**SFT, LLaVA-OV 7B, batch 8**", ["", "", ""]),
             row("weights, gradients, AdamW: 16 B/param", [gb(e.state) for e in sft]),
             row("gathered in the step", gathered(sft)),
             row("activations (with checkpointing)", [f"{gb(e.activations)} ({gb(k.activations)})"
                                                       for e, k in zip(sft, sft_ck)]),
             row("**total** (with checkpointing)", [f"**{gb(e.total)} ({gb(k.total)})**" for e, k in zip(sft, sft_ck)])]
    s, l = dpo[0], sft[0]
    text = [f"Show-o has {s.params / 1e9:.3f} B parameters ({showo.config.n_layer} layers of {s.layer / 1e6:.1f} M; "
            f"embeddings and head {s.root / 1e9:.2f} B)",
            f"LLaVA-OneVision-7B {l.params / 1e9:.2f} B ({llava.cfg.n_layer} Qwen2 layers of {l.layer / 1e6:.0f} M",
            f"{l.root / 1e9:.2f} B in embeddings, head and projector",
            f"{train.activation_bytes(showo) / 1e9:.2f} GB per sequence",
            f"L = {llava.cfg.n_image_tokens + train.QUESTION_TOKENS} ({llava.cfg.n_image_tokens} image rows and a "
            f"{train.QUESTION_TOKENS}-token question)",
            f"{train.activation_bytes(llava) / 1e9:.2f} GB per sequence, "
            f"{train.activation_bytes(llava, checkpointing=True) / 1e9:.2f} GB with `--gradient-checkpointing`"]
    return table, text


def test_readme_memory_figures_are_the_estimate():
    showo = meta(lambda: cotgen.Showo(cotgen.ShowoConfig.preset("show-o-256")))
    llava = meta(lambda: V.LlavaOneVision(V.LlavaConfig.from_preset("7b")))
    table, text = readme_memory(showo, llava)
    readme = (ROOT / "README.md").read_text()
    start = readme.index(table[0])
    got = readme[start:].split("\n\n")[0].splitlines()
    assert got == table, "README: Many GPUs, the memory table should read:\n" + "\n".join(table)
    flat = " ".join(readme.split())
    for phrase in text:
        assert phrase in flat, f"README: Many GPUs should say {phrase!r}"


# ---- the real-size benchmark's code, at the tiny presets --------------------------------------------------------


def test_real_size_benchmark_runs_at_the_tiny_presets(tmp_path, capsys):
    import bench

    out = tmp_path / "bench.json"
    bench.main(["--size", "real", "--device", "cpu", "--smoke", "--paths", "2", "--baseline-paths", "1",
                "--steps", "2", "--threads", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    assert set(r) == {"environment", "section_seconds", "showo", "verifier", "parm", "train", "parity"}
    assert r["environment"]["sizes"] == "the tiny presets" and r["environment"]["cuda"] == torch.version.cuda
    for dtype in ("bfloat16", "float32"):
        fast, slow = r["showo"][dtype].values()
        assert fast["flops_per_image"] < slow["flops_per_image"] and fast["images_per_s"] > 0
    assert r["verifier"]["potential_tokens_cached"] < r["verifier"]["potential_tokens_full"]
    parm = r["parm"]["variants"]
    assert len(parm) == 3 and all(v["verifier_tokens_per_image"] > 0 for v in parm.values())
    for job in ("DPO, 2 pairs", "DPO, 10 pairs", "SFT, 1 conversation, checkpointing"):
        assert r["train"][job]["fits"] and r["train"][job]["steps"] == 1 and r["train"][job]["seconds"] > 0
    # on the CPU in fp32 the parity checks are the test suite's, and pass; bf16 only drifts
    assert r["parity"]["fp32_all_within"] and len(r["parity"]["float32"]) == len(r["parity"]["bfloat16"]) == 26
    assert 0 < r["parity"]["bf16_drift"]["p(yes)"] < 0.05
    assert "== summary at the tiny presets" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--size", "real", "--device", "tpu"], "--device: unknown device"),
    (["--size", "small", "--device", "cuda"], "--device, --smoke and --peak-tflops are for --size real"),
    (["--size", "real", "dpo"], "unknown section(s) dpo for --size real"),
    (["--steps", "0"], "must be at least 1"),
    (["--size", "real", "--layers", "0"], "must be at least 1")])
def test_benchmark_flags_are_checked_before_any_work(argv, message, capsys):
    import bench

    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
