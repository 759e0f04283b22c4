"""The benchmark at the released sizes (README: Benchmarks), not collected by pytest:

    python tests/bench.py --size real --device cuda            # every section, one JSON (outputs/bench-real.json)
    python tests/bench.py --size real --device cuda parm train  # some sections
    python tests/bench.py --size real --device cpu --smoke      # the same code at the tiny presets (a check)

Random weights in the released configs, built through the product's own classes: Show-o 1.3B
(`ShowoConfig.preset("show-o-256")`), MAGVIT-v2 (`MagvitConfig()`), LLaVA-OneVision-7B (`LlavaConfig` preset "7b",
its vocabulary cut to Qwen2's 151646 tokens as `load_verifier` cuts it). Each model is built on the meta device and
materialised once, in its target dtype, on the device (`materialise`). The sections:

    showo     20 paths x 18 steps batched with prefix reuse vs one by one with the full forward, bf16 and fp32:
              images/s, model FLOPs per image, the share of the device's bf16 peak
    verifier  the 7B in bf16 judging 20 images: batched vs one at a time, prefill tokens/s, and PARM's potential
              turn on the clarity turn's KV cache vs the whole two-turn prompt
    parm      PARM end to end (Show-o 1.3B + MAGVIT-v2 + the 7B verifier, 20 paths, bf16) vs the released loop's shape
    train     one DPO step on Show-o 1.3B and one SFT step on the 7B as train.py runs them (bf16 autocast, fp32 master
              weights, AdamW), next to `train.memory_estimate`; a job the estimate says does not fit is not started
    parity    tests/test_showo.py's and tests/test_verifiers.py's fixture comparisons on the device: fp32 with the
              CPU tests' tolerances, and bf16's drift from the same references

The fp32 numbers are true fp32 (TF32 off). After every section the JSON is rewritten, so a run cut short keeps
what it measured.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import bench  # noqa: E402
import bench_dpo  # noqa: E402
import bench_verifiers  # noqa: E402
import cotgen  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
import verifiers as V  # noqa: E402

PROMPT = bench.PROMPT
QWEN2_VOCAB = 151646        # len(tokenizer) of LLaVA-OneVision's Qwen2: the LM rows load_verifier keeps
# dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets); the first name contained in the device's name wins
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
FITS = 0.85                 # a training job starts only if memory_estimate's total is below this share of the device
FIXTURES = ROOT / "tests" / "fixtures"


class BadFlag(ValueError):
    """A flag that cannot work here (bench.py turns it into a usage error)."""


# ---- the device ------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def measured(device: torch.device, out: dict):
    """Time the block (synchronised) and put its seconds and peak memory (GiB; CUDA only) into `out`."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    yield out
    sync(device)
    out["seconds"] = time.perf_counter() - t0
    out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def environment(o) -> dict:
    d = o.device
    return {"device": torch.cuda.get_device_name(d) if d.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads)", "torch": torch.__version__, "cuda": torch.version.cuda,
            "bf16_peak_tflops": o.peak, "fp32_matmul": "ieee (no TF32)", "sizes": sizes(o),
            "paths": o.paths, "baseline_paths": o.baseline_paths, "steps": o.steps}


# ---- the models: released configs, random weights, built on the meta device ----------------------------------

def materialise(make, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """`make()` built on the meta device (no memory), then each tensor allocated once, on `device` in `dtype`, and
    filled there: norm weights 1, biases 0, other weights N(0, 0.02)."""
    with torch.device("meta"):
        model = make()
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def showo_parts(smoke: bool, layers: int | None = None) -> tuple[cotgen.ShowoConfig, cotgen.ShowoTokenizer]:
    """The released 256 px Show-o config (or the tiny preset), `layers` of its layers if given, and a phi-style
    tokenizer of its vocabulary size."""
    c = cotgen.ShowoConfig.preset("tiny" if smoke else "show-o-256")
    c.n_layer = layers or c.n_layer
    tok = cotgen.phi_style_tokenizer(data.tiny_corpus(), 400)
    if smoke:       # the tiny preset takes its vocabulary from the tokenizer, as cotgen.write_showo sets it
        c.llm_vocab_size = tok.get_vocab_size(with_added_tokens=True)
        c.vocab_size = c.image_offset + c.codebook_size + 1
    return c, cotgen.ShowoTokenizer(bench.padded(tok, c.llm_vocab_size), c)


def build_showo(o, dtype) -> tuple[cotgen.Showo, cotgen.ShowoTokenizer]:
    c, tok = showo_parts(o.smoke, o.layers)
    return materialise(lambda: cotgen.Showo(c), o.device, dtype), tok


def build_magvit(o, dtype) -> cotgen.MAGVITv2:
    c = cotgen.MagvitConfig.from_json({"architecture": cotgen.TINY_MAGVIT} if o.smoke else {})
    model = materialise(lambda: cotgen.MAGVITv2(c), o.device, dtype, seed=1)
    signs, power = cotgen.LFQ.tables(c.z_channels)          # fp32 ±1 table, as load_magvit keeps it
    model.quantize.embedding, model.quantize.power_vals = signs.to(o.device), power.to(o.device)
    return model


def verifier_tokenizer(smoke: bool):
    """Trained on the questions, large enough that every word is one token (about as Qwen2 splits this English)."""
    return V.chat_tokenizer(V.question_texts([PROMPT]), 400 if smoke else 1000, "the benchmark tokenizer")


def llava_config(o, tok) -> V.LlavaConfig:
    """LLaVA-OneVision-7B's config with the rows load_verifier keeps (or the tiny preset, the tokenizer's rows),
    `o.layers` of each tower's layers if given."""
    cfg = V.LlavaConfig.from_preset("tiny" if o.smoke else "7b")
    cfg = replace(cfg, n_vocab=tok.get_vocab_size(with_added_tokens=True) if o.smoke else QWEN2_VOCAB)
    if o.layers:
        cfg = replace(cfg, n_layer=o.layers, vision=replace(cfg.vision, n_layer=o.layers))
    return cfg


def build_verifier(o, dtype) -> V.Verifier:
    """The 7B (or tiny) verifier with random weights, its tokenizer padded to the vocabulary."""
    tok = verifier_tokenizer(o.smoke)
    cfg = llava_config(o, tok)
    model = materialise(lambda: V.LlavaOneVision(cfg), o.device, dtype, seed=2)
    return V.Verifier(model, bench.padded(tok, cfg.n_vocab), {"top_k": 20, "top_p": 0.8})


# ---- showo: decoding 20 paths x 18 steps ---------------------------------------------------------------------

def decode_flops(c: cotgen.ShowoConfig, batched: bool, n: int, steps: int) -> float:
    """Model FLOPs per image of decoding `n` paths for `steps` steps with CFG (a cond and an uncond row each): 2 per
    multiply-add of every weight a position passes, 4·d per key a query attends to in each layer (SDPA computes
    masked keys too), and the logit columns computed: the K codes at the N image slots (batched, after the text
    prefix run once for all paths), or the whole vocabulary at every position (the original full forward)."""
    d, L, N = c.n_embd, c.seq_len, c.num_vq_tokens
    block = 2 * (4 * d * d + 2 * d * c.intermediate_size)

    def rows(positions: int, keys: int, logit_positions: int, columns: int) -> float:
        return 2 * (positions * c.n_layer * (block + 4 * d * keys) + logit_positions * 2 * d * columns)

    if batched:
        text = L - N - 2
        return rows(text, text, 0, 0) / n + steps * rows(N + 2, L, N, c.codebook_size)
    return steps * rows(L, L, L, c.vocab_size)


def bench_showo(o) -> dict:
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        model, tok = build_showo(o, dtype)
        bench.decode(model, tok, PROMPT, 2, 2, batched=True)          # warm-up: kernels, allocator
        bench.decode(model, tok, PROMPT, 1, 2, batched=False)
        variants = {}
        for name, n, batched in (("batched + prefix reuse", o.paths, True),
                                 ("one by one, full forward", o.baseline_paths, False)):
            r = {"paths": n}
            with measured(o.device, r):
                r["token_forwards_per_image"] = bench.decode(model, tok, PROMPT, n, o.steps, batched) / n
            r["images_per_s"] = n / r["seconds"]
            r["flops_per_image"] = decode_flops(model.config, batched, n, o.steps)
            r["tflops_per_s"] = r["flops_per_image"] * r["images_per_s"] / 1e12
            r["share_of_bf16_peak"] = r["tflops_per_s"] / o.peak if o.peak else None
            variants[name] = r
        out[str(dtype).removeprefix("torch.")] = variants
        del model
        free(o.device)
    print(f"\n== Show-o decoding at {sizes(o)}: {o.paths} paths x {o.steps} steps, {o.device} ==")
    print(f"{'dtype':<10}{'variant':<28}{'paths':>6}{'images/s':>10}{'TFLOP/img':>11}{'TFLOP/s':>9}{'of peak':>9}"
          f"{'peak GiB':>10}")
    for dtype, variants in out.items():
        for name, r in variants.items():
            print(f"{dtype:<10}{name:<28}{r['paths']:>6}{r['images_per_s']:>10.3f}{r['flops_per_image'] / 1e12:>11.2f}"
                  f"{r['tflops_per_s']:>9.1f}{fmt(r['share_of_bf16_peak'], '.1%'):>9}{fmt(r['peak_gib'], '.1f'):>10}")
    for dtype, variants in out.items():
        fast, slow = variants.values()
        print(f"{dtype}: batched + prefix reuse is {fast['images_per_s'] / slow['images_per_s']:.1f}x the images/s")
    return out


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def sizes(o) -> str:
    return ("the tiny presets" if o.smoke else f"the released widths, {o.layers} layer(s)" if o.layers
            else "the released sizes")


# ---- verifier and parm -----------------------------------------------------------------------------------------

def bench_verifier(o) -> dict:
    v = build_verifier(o, torch.bfloat16)
    r = {}
    with measured(o.device, r):
        r.update(bench_verifiers.measure(v, f"LLaVA-OneVision-7B at {sizes(o)}, random weights",
                                         o.paths, o.reps))
    print(f"prefill: {r['prefill_tokens_per_s_batched']:.0f} LM tokens/s batched ({r['orm_tokens']:.0f} per ORM "
          f"judgment); peak {fmt(r['peak_gib'], '.1f')} GiB")
    del v
    free(o.device)
    return r


def bench_parm(o) -> dict:
    """PARM end to end in bf16. With random weights the verifier's greedy answer is almost never "yes" (one token of
    151646), so no path is judged clear: every path is judged at every step and none is truncated (PARM's largest
    verifier work)."""
    dtype = torch.bfloat16
    model, tok = build_showo(o, dtype)
    magvit = build_magvit(o, dtype)
    verifier = build_verifier(o, dtype)
    r = {}
    title = f"PARM at {sizes(o)}, random weights: {o.paths} paths x {o.steps} steps, bf16, {o.device}"
    with measured(o.device, r):
        rows = bench.compare_parm(model, tok, magvit, verifier, PROMPT, o.paths, o.steps, title)["rows"]
    r["variants"] = {name: {"seconds_per_image": s, "verifier_tokens_per_image": t, "pruned": p, "winner": w}
                     for name, s, t, p, w in rows}
    print(f"peak {fmt(r['peak_gib'], '.1f')} GiB with all three models resident")
    del model, magvit, verifier
    free(o.device)
    return r


# ---- train: one DPO step, one SFT step ------------------------------------------------------------------------

def attempt(o, estimate: train.MemoryEstimate, run) -> dict:
    """`run()` if `estimate` fits the device, its numbers next to the estimate; a job that does not fit is not
    started, one that runs out of memory anyway says so."""
    out = {"estimate_gb": round(estimate.total, 2), "device_gb": round(device_memory(o.device) / 1e9, 1)}
    if estimate.total * 1e9 > FITS * device_memory(o.device):
        return {**out, "fits": False}
    try:
        out.update(run(), fits=True)
    except torch.cuda.OutOfMemoryError as e:
        out.update(fits=True, error=f"out of memory: {str(e).splitlines()[0]}")
    free(o.device)
    return out


def dpo_step(o, pairs: int) -> dict:
    policy, tok = build_showo(o, torch.float32)       # fp32 master weights, as train.py keeps them
    trainer = bench_dpo.dpo_trainer(policy, tok, pairs, o.train_steps)
    return bench_dpo.timed_steps(trainer, o.train_steps)


def sft_step(o) -> dict:
    """One step of train.py's reward-model fine-tune (Sec. 3.2, 4) on one ORM conversation about a random image,
    with gradient checkpointing, as the released run."""
    v = build_verifier(o, torch.float32)                 # fp32 master weights
    ids, labels = V.sft_tokens(v.tokenizer, [V.orm_question(PROMPT), "yes"])
    cfg = train.TrainConfig.preset("sft", batch_size=1, warmup_ratio=0.0, gradient_checkpointing=True,
                                   bf16=o.device.type == "cuda")
    n = o.train_steps + 1
    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "image.png"
        data.save_png(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8), image)
        examples = V.SFTData([ids] * n, [labels] * n, [image] * n, ["bench"] * n)
        return bench_dpo.timed_steps(train.sft_trainer(v, examples, cfg), o.train_steps)


def bench_train(o) -> dict:
    """DPO with 2 pairs a step (a GPU's share of the paper's batch of 10 on 8 GPUs) and with 10 (all of it on one),
    the 7B's SFT with one conversation a step; each next to `train.memory_estimate`, the 7B's with --fsdp too."""
    c, _ = showo_parts(o.smoke, o.layers)
    with torch.device("meta"):
        showo, llava = cotgen.Showo(c), V.LlavaOneVision(llava_config(o, verifier_tokenizer(o.smoke)))
    out = {}
    for pairs in (2, 10):
        estimate = train.memory_estimate(showo, pairs, per_example=2, reference=True)
        out[f"DPO, {pairs} pairs"] = attempt(o, estimate, lambda: dpo_step(o, pairs))
    estimate = train.memory_estimate(llava, 1, checkpointing=True)
    out["SFT, 1 conversation, checkpointing"] = attempt(o, estimate, lambda: sft_step(o))
    out["SFT with --fsdp on 8 GPUs (estimate)"] = {
        "estimate_gb": round(train.memory_estimate(llava, 8, processes=8, fsdp=True).total, 2),
        "with_checkpointing_gb": round(train.memory_estimate(llava, 8, processes=8, fsdp=True,
                                                             checkpointing=True).total, 2)}
    print(f"\n== Show-o 1.3B and LLaVA-OV-7B training steps as train.py runs them, at {sizes(o)}, {o.device}, "
          f"{o.train_steps} timed step(s) after one warm-up ==")
    print(f"{'job':<38}{'s/step':>9}{'peak GiB':>10}{'estimate GB':>13}  note")
    for name, r in out.items():
        seconds = r["seconds"] / r["steps"] if "seconds" in r else None
        peak = r["gpu_peak_mib"] / 1024 if r.get("gpu_peak_mib") else None
        note = r.get("error") or ("does not fit: not started" if r.get("fits") is False else "")
        if "with_checkpointing_gb" in r:
            note = f"{r['with_checkpointing_gb']:.1f} GB with --gradient-checkpointing"
        print(f"{name:<38}{fmt(seconds, '.2f'):>9}{fmt(peak, '.1f'):>10}{r['estimate_gb']:>13.1f}  {note}")
    return out


# ---- parity: the fixture comparisons of the CPU tests, on the device ------------------------------------------

def compare(rows: list, check: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    """One fixture comparison as torch.testing.assert_close makes it (|got - want| <= atol + rtol·|want|): the
    largest difference and how many elements are outside the tolerance."""
    got, want = got.detach().float().cpu(), want.float()
    outside = int((~torch.isclose(got, want, atol=atol, rtol=rtol)).sum())
    rows.append({"check": check, "max_abs_diff": float((got - want).abs().max()), "atol": atol, "rtol": rtol,
                 "outside": outside, "within": outside == 0})


@torch.inference_mode()
def showo_parity(rows: list, device, dtype, E: dict, J: dict) -> None:
    """tests/test_showo.py's comparisons: forward, guided probabilities (both paths), teacher-forced step
    probabilities, MAGVIT-v2's decode, and on the CPU the recorded runs token for token."""
    model, tok = cotgen.load_showo(FIXTURES / "showo", dtype=dtype, device=device)
    magvit = cotgen.load_magvit(FIXTURES / "magvitv2", dtype=dtype, device=device)
    c, prompt, g = model.config, J["showo"]["prompt"], J["showo"]["guidance_scale"]
    ids = E["showo.partial.input_ids"].to(device)
    logits, hidden = model(ids, cotgen.omni_attention_mask(ids, tok.pad_id, tok.soi_id, tok.eoi_id),
                           output_hidden_states=True)
    compare(rows, "Show-o logits", logits, E["showo.partial.logits"], 1e-4, 1e-4)
    compare(rows, "Show-o hidden states", torch.stack(hidden), E["showo.partial.hidden_states"], 1e-4, 1e-4)
    image = E["showo.partial.input_ids"][:1, c.text_len + 1: c.text_len + 1 + c.num_vq_tokens].to(device)
    for fast in (True, False):
        probs = cotgen.Paths(model, tok, prompt, 1, cfg=g, fast=fast).probs(image)
        compare(rows, f"guided probs, {'prefix reuse' if fast else 'full forward'}", probs,
                torch.softmax(E["showo.partial.cfg_logits"], -1), 1e-5, 0.0)
    for run in ("gen", "gen_short"):
        probs = cotgen.Paths(model, tok, prompt, 1, cfg=g).probs(E[f"showo.{run}.step_image_tokens_in"].to(device))
        compare(rows, f"step probs, teacher-forced ({run})", probs, E[f"showo.{run}.step_probs"], 1e-5, 0.0)
        if device.type == "cpu":        # the recorded runs drew from a CPU generator; CUDA's draws other numbers
            rec = J["showo"][run]
            paths = cotgen.Paths(model, tok, prompt, 1, steps=rec["timesteps"], cfg=rec["guidance_scale"],
                                 generators=[torch.Generator().manual_seed(rec["generator_seed"])])
            for _ in paths:
                pass
            compare(rows, f"generation token for token ({run})", paths.final_tokens(),
                    E[f"showo.{run}.final_tokens"], 0.0, 0.0)
    compare(rows, "MAGVIT-v2 decode", magvit.decode_code(E["magvit.decode_codes"].to(device)), E["magvit.decoded"],
            1e-4, 1e-4)


def verifier_parity(rows: list, device, dtype, E: dict, J: dict) -> None:
    """tests/test_verifiers.py's comparisons: SigLIP features, image rows, answer logits, p(yes)/p(no) of the
    full softmax and of the released filter, the greedy answer."""
    v = V.load_verifier(FIXTURES / "llava", dtype=dtype, device=device)
    image = data.load_image(FIXTURES / json.loads((FIXTURES / "inputs.json").read_text())["llava"]["image"])
    px = V.preprocess(image)[None].to(device, dtype)
    with torch.inference_mode():
        compare(rows, "SigLIP features", v.model.vision(px)[0], E["llava.vision_features"], 1e-4, 1e-4)
        compare(rows, "image rows", v.model.encode_images(px)[0], E["llava.image_embeds"], 1e-4, 1e-4)
    questions = {"orm": V.orm_question, "clarity": V.clarity_question, "potential": V.potential_question}
    for task, question in questions.items():
        e, q = J["llava"]["tasks"][task], question(J["llava"]["reward_prompt"])
        compare(rows, f"answer logits ({task})", v.answer_logits([image], [q])[0], E[f"llava.{task}.logits"],
                1e-4, 1e-4)
        full, released = v.judge([image], [q])[0], v.judge([image], [q], released_scores=True)[0]
        for name, got, want in (("p(yes)", full.p_yes, e["p_yes_raw_full_softmax"]),
                                ("p(no)", full.p_no, e["p_no_raw_full_softmax"]),
                                ("released p(yes)", released.p_yes, e["p_yes_selector"]),
                                ("greedy answer id", full.token_id, e["greedy_first_token_id"])):
            tol = 0.0 if name == "greedy answer id" else 1e-5
            compare(rows, f"{name} ({task})", torch.tensor(float(got)), torch.tensor(float(want)), tol, 0.0)


def bench_parity(o) -> dict:
    from safetensors.torch import load_file

    E, J = load_file(FIXTURES / "expected.safetensors"), json.loads((FIXTURES / "expected.json").read_text())
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        rows = []
        showo_parity(rows, o.device, dtype, E, J)
        verifier_parity(rows, o.device, dtype, E, J)
        out[str(dtype).removeprefix("torch.")] = rows
        free(o.device)
    fp32, bf16 = out["float32"], {r["check"]: r for r in out["bfloat16"]}
    print(f"\n== parity with the fixtures on {o.device}: fp32 at the CPU tests' tolerances, bf16's drift ==")
    print(f"{'check':<36}{'tolerance':>16}{'fp32 max|d|':>13}{'outside':>9}{'bf16 max|d|':>13}{'outside':>9}")
    for r in fp32:
        tol, b = f"{r['atol']:g} + {r['rtol']:g}|x|" if r["rtol"] else f"{r['atol']:g}", bf16[r["check"]]
        print(f"{r['check']:<36}{tol:>16}{r['max_abs_diff']:>13.2e}{r['outside']:>9}{b['max_abs_diff']:>13.2e}"
              f"{b['outside']:>9}")
    out["fp32_all_within"] = all(r["within"] for r in fp32)
    out["bf16_drift"] = {what: max(r["max_abs_diff"] for r in out["bfloat16"] if r["check"].startswith(what))
                         for what in ("p(yes)", "p(no)", "guided probs", "step probs")}
    print(f"fp32 within the tolerances: {'all' if out['fp32_all_within'] else 'NOT all'}; bf16 drift: " +
          ", ".join(f"{k} {v:.1e}" for k, v in out["bf16_drift"].items()))
    return out


# ---- the run ------------------------------------------------------------------------------------------------

SECTIONS = {"showo": bench_showo, "verifier": bench_verifier, "parm": bench_parm, "train": bench_train,
            "parity": bench_parity}


def run(opts) -> dict:
    """Every chosen section in turn; the JSON (opts.json) rewritten after each; the summary table at the end."""
    try:
        opts.device = data.parse_device(opts.device)
    except ValueError as e:
        raise BadFlag(f"--device: {e}") from e
    if opts.device.type == "mps":
        raise BadFlag("--device mps: the benchmark measures cpu or cuda")
    opts.peak = peak_tflops(opts.device, opts.peak_tflops)
    opts.reps, opts.train_steps = (1, 1) if opts.smoke else (3, 3)
    opts.json = opts.json or "outputs/bench-real.json"
    if opts.device.type == "cpu":
        torch.set_num_threads(opts.threads)
    no_tf32()
    results = {"environment": environment(opts), "section_seconds": {}}
    for name in opts.sections:
        t0 = time.perf_counter()
        try:
            results[name] = SECTIONS[name](opts)
        except Exception as e:      # a failure on the device is a finding too: the other sections still run
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            free(opts.device)
        results["section_seconds"][name] = time.perf_counter() - t0
        data.write_json(results, opts.json)
    summary(results)
    return results


def no_tf32() -> None:
    """fp32 means fp32 here: no TF32 in matmuls or convolutions."""
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    except AttributeError:          # torch before 2.9: the legacy switches
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def summary(results: dict) -> None:
    """The short table: the headline number of each section that ran."""
    env = results["environment"]
    lines = [(name, f"FAILED: {r['error']}") for name, r in results.items() if "error" in r]
    results = {name: r for name, r in results.items() if "error" not in r}       # the sections that ran
    for dtype, variants in results.get("showo", {}).items():
        if "batched + prefix reuse" in variants:
            fast, slow = variants["batched + prefix reuse"], variants["one by one, full forward"]
            lines.append((f"Show-o decoding, {dtype}", f"{fast['images_per_s']:.2f} images/s batched "
                          f"({fast['images_per_s'] / slow['images_per_s']:.1f}x one by one), "
                          f"{fmt(fast['share_of_bf16_peak'], '.1%')} of bf16 peak"))
    if "judgments_per_s_batched" in results.get("verifier", {}):
        r = results["verifier"]
        lines.append(("verifier, bf16", f"{r['judgments_per_s_batched']:.1f} judgments/s batched, "
                      f"{r['prefill_tokens_per_s_batched']:.0f} prefill tokens/s; potential turn "
                      f"{r['potential_ms_full'] / r['potential_ms_cached']:.1f}x faster on the clarity KV cache"))
    if "variants" in results.get("parm", {}):
        v = results["parm"]["variants"]
        ours, released = v["batched + cache + truncation"], v["released loop shape"]
        lines.append(("PARM end to end, bf16", f"{ours['seconds_per_image']:.1f} s/image "
                      f"(released shape {released['seconds_per_image']:.1f}), {ours['verifier_tokens_per_image']} "
                      f"verifier tokens/image (released {released['verifier_tokens_per_image']}), peak "
                      f"{fmt(results['parm']['peak_gib'], '.1f')} GiB"))
    for name, r in results.get("train", {}).items():
        if "seconds" in r:
            peak = None if r["gpu_peak_mib"] is None else r["gpu_peak_mib"] / 1024
            lines.append((name, f"{r['seconds'] / r['steps']:.2f} s/step, peak {fmt(peak, '.1f')} GiB "
                          f"(estimate {r['estimate_gb']:.1f} GB)"))
        elif r.get("fits") is False:
            lines.append((name, f"does not fit: {r['estimate_gb']:.1f} GB estimated, {r['device_gb']:.0f} GB here"))
        elif "error" in r:
            lines.append((name, f"{r['error']} (estimate {r['estimate_gb']:.1f} GB)"))
        elif "with_checkpointing_gb" in r:
            lines.append((name, f"{r['estimate_gb']:.1f} GB per GPU, {r['with_checkpointing_gb']:.1f} GB with "
                          "checkpointing"))
    if "fp32_all_within" in results.get("parity", {}):
        p = results["parity"]
        lines.append(("parity", f"fp32 {'within' if p['fp32_all_within'] else 'NOT within'} the CPU tolerances; "
                      f"bf16 drift p(yes) {p['bf16_drift']['p(yes)']:.1e}, guided probs "
                      f"{p['bf16_drift']['guided probs']:.1e}"))
    print(f"\n== summary at {env['sizes']}: {env['device']}, torch {env['torch']}, CUDA {env['cuda']} ==")
    for what, text in lines:
        print(f"{what:<40}{text}")
