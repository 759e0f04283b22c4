"""Verifier benchmark (not collected by pytest): batched judgments vs one at a time, and PARM's potential turn
with the clarity turn's KV cache vs re-running the whole two-turn prompt.

    python tests/bench_verifiers.py                       # the tiny checkpoint on CPU
    python tests/bench_verifiers.py --ckpt DIR --device cuda --dtype bf16    # real weights

`run(report)` is what tests/bench.py calls: `report` receives one printable line at a time; the numbers come
back as a dict. `measure(verifier, ...)` makes the table for a verifier already built (tests/bench_real.py: the
7B with random weights).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _best_time(fn, reps: int, sync) -> float:
    """Best wall time of `reps` calls after one warm-up call (best-of filters out noise from other processes)."""
    fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def run(report=print, ckpt: str | None = None, device: str = "cpu", dtype: str = "float32", n: int = 8,
        reps: int = 3, threads: int | None = 1) -> dict:
    """`threads` (default 1, restored afterwards): the tiny model's ops are too small to gain from more CPU
    threads, and on a shared machine spinning OpenMP threads make small ops erratic; None leaves torch as is."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(report, ckpt, device, dtype, n, reps)
    finally:
        torch.set_num_threads(before)


def _run(report, ckpt, device, dtype, n, reps) -> dict:
    import verifiers as V

    if ckpt is None:
        ckpt = V.write_tiny_llava(Path(tempfile.mkdtemp()) / "llava", seed=0)
        what = "tiny LLaVA-OneVision checkpoint"
    else:
        what = str(ckpt)
    return measure(V.load_verifier(ckpt, dtype=dtype, device=device), what, n, reps, report)


def measure(v, what: str, n: int = 8, reps: int = 3, report=print) -> dict:
    """The side-by-side table for verifier `v` (`what` names it) on `n` random 256x256 images; the numbers."""
    import numpy as np
    import torch

    import verifiers as V

    sync = torch.cuda.synchronize if v.device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(n)]
    prompts = [f"a photo of {k + 1} {obj}" for k, obj in zip(range(n), ["dogs", "red apples", "cats", "cups"] * n)]
    orm = [V.orm_question(p) for p in prompts]

    batched = _best_time(lambda: v.judge(images, orm), reps, sync)
    single = _best_time(lambda: [v.judge([im], [q]) for im, q in zip(images, orm)], reps, sync)

    _, handles = v.judge_clarity(images, prompts)

    def counted(fn):
        before = v.tokens_processed
        fn()
        return (v.tokens_processed - before) / n

    cached = _best_time(lambda: v.judge_potential(handles, prompts), reps, sync)
    full = _best_time(lambda: v.judge(images, [V.potential_question(p) for p in prompts]), reps, sync)
    cached_tokens = counted(lambda: v.judge_potential(handles, prompts))
    full_tokens = counted(lambda: v.judge(images, [V.potential_question(p) for p in prompts]))
    orm_tokens = counted(lambda: v.judge(images, orm))

    report(f"\n== verifier: {what}, {v.device.type} {str(v.dtype).replace('torch.', '')}, "
           f"{n} images of 256x256, {torch.get_num_threads()} thread(s) ==")
    report(f"{'variant':<44}{'judgments/s':>12}{'ms/judgment':>13}{'LM tokens/judgment':>20}")
    rows = [("ORM, batched (one forward for all)", batched, None),
            ("ORM, one at a time", single, None),
            ("PARM potential turn, clarity KV cache reused", cached, cached_tokens),
            ("PARM potential turn, whole two-turn prompt", full, full_tokens)]
    for name, seconds, tokens in rows:
        report(f"{name:<44}{n / seconds:>12.1f}{1000 * seconds / n:>13.1f}"
               f"{'' if tokens is None else f'{tokens:.0f}':>20}")
    report(f"batched vs one at a time: {single / batched:.1f}x; cached follow-up vs full prompt: "
           f"{full / cached:.1f}x time, {full_tokens / cached_tokens:.0f}x fewer LM tokens")
    return {"judgments_per_s_batched": n / batched, "judgments_per_s_single": n / single,
            "prefill_tokens_per_s_batched": orm_tokens * n / batched, "orm_tokens": orm_tokens,
            "potential_ms_cached": 1000 * cached / n, "potential_ms_full": 1000 * full / n,
            "potential_tokens_cached": cached_tokens, "potential_tokens_full": full_tokens}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a LLaVA-OneVision folder (default: write the tiny checkpoint)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n", type=int, default=8, help="image/question pairs (default 8)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions, best kept (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = leave as is)")
    opts = p.parse_args(argv)
    run(print, opts.ckpt, opts.device, opts.dtype, opts.n, opts.reps, opts.threads)


if __name__ == "__main__":
    main()
