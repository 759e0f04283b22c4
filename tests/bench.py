"""Benchmarks, printed side by side in one run (not collected by pytest).

    python tests/bench.py                             # --size small (default): every section, on the CPU
    python tests/bench.py showo                       # one section: showo | raster | prm | verifier | parm | dpo
    python tests/bench.py --size real --device cuda   # the released sizes on one GPU (tests/bench_real.py):
                                                      # showo | verifier | parm | train | parity, one JSON

Show-o: N paths of one prompt decoded as one batch with the text prefix reused and only the codebook logits
computed, against the same paths decoded one after another with the original full forward (full sequence,
full vocabulary), at the real sequence length (387 = 129 text + soi + 256 image + eoi) and real vocabulary,
with a small width. Each variant runs in a fresh process so its peak memory is its own.

Raster: a raster generator's paths (the shapes world's sizes: 36 tokens, 71 codes) decoded as one batch with
the text's and earlier tokens' keys/values cached, against the uncached loop: one full forward of the whole
sequence per token (cond and empty-prompt rows), paths one after another.

PRM: the re-branched paths' one forward a step against a forward per path (Show-o's share of the search).

PARM: the search as implemented here (paths batched, the clarity turn's KV cache reused for the potential
question, truncation) against the released loop's shape, on the tiny checkpoints.

--size real runs the same measurements (`decode`, `compare_parm`, bench_verifiers.measure, bench_dpo's
`dpo_trainer` and `timed_steps`) on the released models, in one process on the device: tests/bench_real.py.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


PROMPT = "a photo of a red apple on a wooden table"


def padded(tok, size: int):
    """`tok` with unused tokens added up to `size`, so that a tokenizer trained on a few sentences serves a model
    with a released vocabulary (full-vocabulary logits cost what they really cost; any greedy answer decodes)."""
    from tokenizers import AddedToken

    n = tok.get_vocab_size(with_added_tokens=True)
    tok.add_tokens([AddedToken(f"<unused{i}>", special=False) for i in range(size - n)])
    return tok


def bench_model(width: int, layers: int):
    """A Show-o with the released vocabulary and sequence layout, random weights, small width."""
    import torch

    import cotgen
    import data

    c = cotgen.ShowoConfig(n_layer=layers, n_head=width // 64, n_embd=width, intermediate_size=4 * width)
    tok = padded(cotgen.phi_style_tokenizer(data.tiny_corpus(), 400), c.llm_vocab_size)
    torch.manual_seed(0)
    model = cotgen.Showo(c).eval()
    return model, cotgen.ShowoTokenizer(tok, c)


def decode(model, tok, prompt: str, n: int, steps: int, batched: bool) -> int:
    """Decode `n` paths of `prompt` (Sec. 3.1): as one batch with the text prefix reused and only the codebook
    logits, or one after another with the original full forward. Returns the token positions run."""
    import cotgen

    if batched:
        paths = cotgen.Paths(model, tok, prompt, n, steps=steps, fast=True)
        for _ in paths:
            pass
        return paths.token_forwards
    forwards = 0
    for i in range(n):
        paths = cotgen.Paths(model, tok, prompt, 1, steps=steps, seed=i, fast=False)
        for _ in paths:
            pass
        forwards += paths.token_forwards
    return forwards


def _showo_worker(args, queue):
    import torch

    torch.set_num_threads(args["threads"])
    model, tok = bench_model(args["width"], args["layers"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    forwards = decode(model, tok, PROMPT, args["paths"], args["steps"], args["batched"])
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": dt, "images": args["paths"], "peak_mib": peak / 1024, "extra_mib": (peak - base) / 1024,
               "token_forwards": forwards})


def run_isolated(worker, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=worker, args=(args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def bench_showo(opts) -> dict:
    common = {"width": opts.width, "layers": opts.layers, "steps": opts.steps, "threads": opts.threads}
    fast = run_isolated(_showo_worker, {**common, "paths": opts.paths, "batched": True})
    slow = run_isolated(_showo_worker, {**common, "paths": opts.baseline_paths, "batched": False})
    rows = [("batched + prefix reuse", fast), ("one by one, full forward", slow)]
    print(f"\n== Show-o decoding: L=387, vocab 58498, width {opts.width}, {opts.layers} layers, {opts.steps} steps, "
          f"{opts.threads} thread(s) ==")
    print(f"{'variant':<28}{'paths':>6}{'seconds':>10}{'images/s':>10}{'token-fwd/img':>15}{'peak MiB':>10}"
          f"{'+MiB':>8}")
    for name, r in rows:
        print(f"{name:<28}{r['images']:>6}{r['seconds']:>10.2f}{r['images'] / r['seconds']:>10.3f}"
              f"{r['token_forwards'] / r['images']:>15.0f}{r['peak_mib']:>10.0f}{r['extra_mib']:>8.0f}")
    ratio = (fast["images"] / fast["seconds"]) / (slow["images"] / slow["seconds"])
    print(f"speed-up (images/s, batched+reuse vs one-by-one full): {ratio:.1f}x")
    return {"showo_speedup": ratio, "fast": fast, "slow": slow}


def uncached_raster_path(model, tok, prompt: str, seed: int, cfg: float = 1.75) -> int:
    """One raster path the plain way: each token from a full forward of the sequence so far. Returns forwards."""
    import torch

    import cotgen

    c, g, forwards = model.config, torch.Generator().manual_seed(seed), 0
    ids = tok.t2i_ids([prompt, ""])[:, :-(c.num_vq_tokens + 1)]           # text and <|soi|>
    with torch.inference_mode():
        for _ in range(c.num_vq_tokens):
            logits = model(ids, tok.attention_mask(ids))[:, -1, c.code_ids]
            forwards += ids.numel()
            probs = torch.softmax((1 + cfg) * logits[0] - cfg * logits[1], -1)
            code = torch.multinomial(probs, 1, generator=g) + c.image_offset
            ids = torch.cat([ids, code.expand(2, 1)], 1)
    return forwards


def bench_raster(opts) -> dict:
    import tempfile

    import torch

    import cotgen
    import data

    torch.set_num_threads(opts.threads)
    d = Path(tempfile.mkdtemp())
    c = cotgen.ShowoConfig(codebook_size=71, num_vq_tokens=36, max_seq_length=16, n_layer=4, n_head=4, n_embd=128,
                           intermediate_size=512, order="raster")
    cotgen.write_showo(d / "showo", d / "phi", cotgen.phi_style_tokenizer(data.tiny_corpus(), 300), c)
    model, tok = cotgen.load_showo(d / "showo")
    prompt, rows = "a photo of two red circles", []
    t0 = time.perf_counter()
    paths = cotgen.RasterPaths(model, tok, prompt, opts.paths, steps=18)
    for _ in paths:
        pass
    rows.append(("batched + KV cache", opts.paths, time.perf_counter() - t0, paths.token_forwards))
    t0 = time.perf_counter()
    forwards = sum(uncached_raster_path(model, tok, prompt, seed) for seed in range(opts.baseline_paths))
    rows.append(("one by one, full forward/token", opts.baseline_paths, time.perf_counter() - t0, forwards))
    print(f"\n== raster decoding: 36 tokens, 71 codes, width 128, 4 layers, {opts.threads} thread(s) ==")
    print(f"{'variant':<32}{'paths':>6}{'seconds':>10}{'images/s':>10}{'token-fwd/img':>15}")
    for name, n, dt, fw in rows:
        print(f"{name:<32}{n:>6}{dt:>10.2f}{n / dt:>10.2f}{fw / n:>15.0f}")
    ratio = (rows[0][1] / rows[0][2]) / (rows[1][1] / rows[1][2])
    print(f"speed-up (images/s, batched+cache vs one-by-one full forwards): {ratio:.1f}x")
    return {"raster_speedup": ratio, "rows": rows}


class _FreeJudge:
    """A PRM that costs nothing: it prefers path (step mod paths), so the search re-branches every step."""
    tokens_processed = 0

    def prm(self, images, prompt, who):
        from types import SimpleNamespace

        return [SimpleNamespace(answer="yes", p_yes=float(i == t % len(who)), p_no=float(i != t % len(who)))
                for i, t in who]


class _NoImages:
    decode_code = staticmethod(lambda codes: codes.new_zeros(codes.shape[0], 3, 8, 8).float())


def bench_prm(opts) -> dict:
    """PRM's step-level best-of-N (Sec. 3.2): after each step every path re-branches from the best, so the N paths
    hold one state and Show-o runs it once; against a forward per path (torch.unique made to keep every row, as
    before), side by side. The verifier costs nothing here: this is Show-o's share of the search."""
    from contextlib import nullcontext
    from unittest import mock

    import torch

    import cotgen

    torch.set_num_threads(opts.threads)
    model, tok = bench_model(opts.width, opts.layers)
    every_row = lambda x, dim, return_inverse: (x, torch.arange(len(x)))  # noqa: E731
    rows, finals = [], []
    for name, patch in (("one forward per state", None), ("one forward per path", every_row)):
        with mock.patch.object(torch, "unique", patch) if patch else nullcontext():
            t0 = time.perf_counter()
            r = cotgen.prm_search(model, tok, _NoImages(), _FreeJudge(), PROMPT, opts.paths, steps=opts.steps)
            rows.append((name, time.perf_counter() - t0))
        finals.append(r.finals)
    print(f"\n== PRM decoding: L=387, vocab 58498, width {opts.width}, {opts.layers} layers, {opts.paths} paths x "
          f"{opts.steps} steps, {opts.threads} thread(s), a verifier that costs nothing ==")
    for name, seconds in rows:
        print(f"{name:<28}{seconds:>10.2f} s")
    speedup, same = rows[1][1] / rows[0][1], torch.equal(finals[0], finals[1])
    print(f"speed-up: {speedup:.1f}x; the same paths: {same}")
    return {"prm_speedup": speedup, "same_paths": same}


def released_parm_loop(model, tok, magvit, verifier, prompt: str, n: int, steps: int, seed: int) -> int:
    """The shape of the released parm.py loop, for comparison: paths one after another with the full forward,
    one verifier call per clarity check, the potential question re-encoding the whole two-turn conversation
    with the image, no truncation, then one ORM call per path with potential. Returns the winner."""
    import torch

    import cotgen
    import verifiers

    potential, p_no, finals = {}, [1.0] * n, []
    with torch.inference_mode():
        for i in range(n):
            paths = cotgen.Paths(model, tok, prompt, 1, steps=steps, seed=seed + i, fast=False)
            for step in paths:
                if i in potential:
                    continue
                image = magvit.decode_code(step.x0)
                if verifier.judge(image, [verifiers.clarity_question(prompt)])[0].is_yes:
                    j = verifier.judge(image, [verifiers.potential_question(prompt)])[0]
                    potential[i], p_no[i] = j.is_yes, j.p_no
            finals.append(paths.final_tokens())
        keep = [i for i in range(n) if potential.get(i)]
        if not keep:
            return min(range(n), key=lambda i: p_no[i])
        scores = [verifier.judge(magvit.decode_code(finals[i]), [verifiers.orm_question(prompt)])[0].p_yes
                  for i in keep]
    return keep[cotgen.best_of(scores)]


def bench_parm(opts) -> dict:
    import tempfile

    import torch

    import cotgen
    import sample
    import verifiers

    torch.set_num_threads(opts.threads)
    t = sample.tiny_checkpoints(Path(tempfile.mkdtemp()))
    model, tok = cotgen.load_showo(t["showo"])
    magvit = cotgen.load_magvit(t["magvit"])
    verifier = verifiers.load_verifier(t["llava"])
    title = (f"PARM at tiny size: {opts.paths} paths x {opts.steps} steps, tiny Show-o + tiny LLaVA-OneVision, "
             f"{opts.threads} thread(s)")
    return compare_parm(model, tok, magvit, verifier, "a photo of a red apple", opts.paths, opts.steps, title)


def compare_parm(model, tok, magvit, verifier, prompt: str, n: int, steps: int, title: str, report=print) -> dict:
    """PARM (Sec. 4) as implemented here, with and without truncation, against the released loop's shape, side by
    side: seconds per image (one search makes one image), verifier LM tokens, paths pruned, the winner."""
    import torch

    import cotgen

    sync = torch.cuda.synchronize if verifier.device.type == "cuda" else (lambda: None)
    cotgen.parm_search(model, tok, magvit, cotgen.Judge(verifier), prompt, 2, steps=2)  # warm-up, untimed
    rows = []
    for name, truncate in (("batched + cache + truncation", True), ("batched + cache, no truncation", False)):
        sync()
        tokens0, t0 = verifier.tokens_processed, time.perf_counter()
        r = cotgen.parm_search(model, tok, magvit, cotgen.Judge(verifier), prompt, n, steps=steps, truncate=truncate)
        sync()
        rows.append((name, time.perf_counter() - t0, verifier.tokens_processed - tokens0, sum(r.pruned), r.winner))
    tokens0, t0 = verifier.tokens_processed, time.perf_counter()
    winner = released_parm_loop(model, tok, magvit, verifier, prompt, n, steps, seed=0)
    sync()
    rows.append(("released loop shape", time.perf_counter() - t0, verifier.tokens_processed - tokens0, 0, winner))
    report(f"\n== {title} ==")
    report(f"{'variant':<34}{'s/image':>9}{'verifier tokens':>17}{'pruned':>8}{'winner':>8}")
    for name, dt, tokens, pruned, w in rows:
        report(f"{name:<34}{dt:>9.2f}{tokens:>17}{pruned:>8}{w:>8}")
    report(f"speed-up vs released loop shape: {rows[2][1] / rows[0][1]:.1f}x time, "
           f"{rows[2][2] / max(rows[0][2], 1):.2f}x verifier tokens")
    return {"rows": rows}


SECTIONS = {"small": ("showo", "raster", "prm", "verifier", "parm", "dpo"),
            "real": ("showo", "verifier", "parm", "train", "parity")}


def run_small(opts) -> dict:
    results = {}
    for s in opts.sections:
        if s == "showo":
            results["showo"] = bench_showo(opts)
        elif s == "raster":
            results["raster"] = bench_raster(opts)
        elif s == "prm":
            results["prm"] = bench_prm(opts)
        elif s == "parm":
            results["parm"] = bench_parm(opts)
        elif s == "verifier":
            import bench_verifiers

            results["verifier"] = bench_verifiers.run(print)
        elif s == "dpo":
            import bench_dpo

            results["dpo"] = bench_dpo.run(print, width=opts.width, layers=opts.layers, threads=opts.threads)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*",
                   help="sections to run (default all): --size small: showo, raster, prm, verifier, parm, dpo; "
                        "--size real: showo, verifier, parm, train, parity")
    p.add_argument("--size", choices=tuple(SECTIONS), default="small",
                   help="small (default): side-by-side ratios on the CPU at a small width; real: the released "
                        "models (random weights) on --device, every number in one JSON")
    p.add_argument("--device", default="cpu", help="--size real: cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--paths", type=int, default=20, help="paths decoded as one batch (default 20)")
    p.add_argument("--baseline-paths", type=int, default=4,
                   help="paths decoded one by one for the baseline; images/s is per image (default 4)")
    p.add_argument("--steps", type=int, default=18, help="decoding steps (default 18)")
    p.add_argument("--width", type=int, default=256, help="--size small: Show-o hidden width (default 256)")
    p.add_argument("--layers", type=int, default=None,
                   help="--size small: Show-o layers (default 4); --size real: keep only this many layers of each "
                        "transformer (a check of the released widths on a small machine; default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="--size real: the device's dense bf16 peak in TFLOP/s (default: looked up by its name: "
                        "H100, H200, A100)")
    p.add_argument("--smoke", action="store_true",
                   help="--size real: run its code at the tiny presets instead (a check of the code on the CPU; "
                        "the numbers mean nothing)")
    p.add_argument("--json", default=None,
                   help="write the numbers to this JSON file (--size real: default outputs/bench-real.json)")
    opts = p.parse_args(argv)
    opts.sections = opts.sections or list(SECTIONS[opts.size])
    unknown = [s for s in opts.sections if s not in SECTIONS[opts.size]]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)} for --size {opts.size}: use "
                f"{', '.join(SECTIONS[opts.size])}")
    if opts.size == "small" and (opts.device != "cpu" or opts.smoke or opts.peak_tflops):
        p.error("--device, --smoke and --peak-tflops are for --size real: --size small compares variants side by "
                "side on the CPU")
    if min(opts.paths, opts.baseline_paths, opts.steps, 1 if opts.layers is None else opts.layers) < 1:
        p.error("--paths, --baseline-paths, --steps and --layers must be at least 1")
    if opts.size == "small":
        opts.layers = opts.layers or 4
    return p, opts


def main(argv=None):
    p, opts = parse_args(argv)
    if opts.size == "real":             # writes its JSON itself, after every section
        import bench_real

        try:
            return bench_real.run(opts)
        except bench_real.BadFlag as e:
            p.error(str(e))
    results = run_small(opts)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
