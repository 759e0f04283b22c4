"""DPO training throughput (not collected by pytest).

    python tests/bench_dpo.py                 # or `run(print)` from tests/bench.py

One DPO step (Sec. 3.3) = the policy's forward and backward and the frozen reference's forward on B chosen +
B rejected sequences, then AdamW. Sequences have Show-o's real length (387 = 129 text + soi + 256 image + eoi)
and real vocabulary (58498, so the full-vocabulary log-softmax costs what it really costs), with a small width.
Variants: the released independent masks, one shared mask, and gradient checkpointing. Each runs in a fresh
process so that its peak memory is its own. On a GPU the policy runs under bf16 autocast, as `train.py` does.
"""
from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = (("independent masks (released)", {}), ("shared mask", {"shared_mask": True}),
            ("gradient checkpointing", {"gradient_checkpointing": True}))


def _worker(args, queue):
    import torch

    from bench import bench_model

    torch.set_num_threads(args["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, tok = bench_model(args["width"], args["layers"])
    trainer = dpo_trainer(policy.to(device), tok, args["pairs"], args["steps"], **args["variant"])
    queue.put({**timed_steps(trainer, args["steps"]), "device": str(device),
               "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def dpo_trainer(policy, tok, pairs: int, steps: int, **variant):
    """train.py's DPO trainer (Sec. 3.3) for `policy` against a frozen copy of it, on `pairs` random preference
    pairs a step, enough of them for one warm-up step and `steps` timed ones; bf16 autocast on a GPU, as
    train.py (`variant`: TrainConfig fields)."""
    import torch

    import dpo
    import train

    c, device = policy.config, next(policy.parameters()).device
    g = torch.Generator().manual_seed(0)
    n = pairs * (steps + 1)
    data = dpo.PairData(["a photo of a red apple on a wooden table"] * n,
                        torch.randint(0, c.codebook_size, (n, c.num_vq_tokens), generator=g),
                        torch.randint(0, c.codebook_size, (n, c.num_vq_tokens), generator=g), ["bench"] * n)
    cfg = train.TrainConfig(batch_size=pairs, warmup_ratio=0, bf16=device.type == "cuda", **variant)
    reference = copy.deepcopy(policy)
    return train.Trainer(policy, train.dpo_objective(policy, reference, tok, data, cfg), data.source, cfg)


def timed_steps(trainer, steps: int) -> dict:
    """One warm-up step (allocations, AdamW state), then `steps` timed ones: seconds, and on a GPU the peak
    memory of the timed steps."""
    import torch

    cuda = trainer.device.type == "cuda"
    trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "steps": steps,
            "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def run(report=print, width: int = 256, layers: int = 4, pairs: int = 2, steps: int = 3, threads: int = 2) -> dict:
    """Run every variant and report DPO steps per second and peak memory; returns the numbers."""
    from bench import run_isolated

    common = {"width": width, "layers": layers, "pairs": pairs, "steps": steps, "threads": threads}
    results = {name: run_isolated(_worker, {**common, "variant": v}) for name, v in VARIANTS}
    device = next(iter(results.values()))["device"]
    report(f"\n== DPO step: L=387, vocab 58498, width {width}, {layers} layers, {pairs} pairs/step "
           f"({2 * pairs} sequences through policy and reference), {device}, {threads} thread(s) ==")
    report(f"{'variant':<32}{'steps/s':>10}{'s/step':>10}{'pairs/s':>10}{'peak RSS MiB':>14}{'GPU peak MiB':>14}")
    for name, r in results.items():
        rate = r["steps"] / r["seconds"]
        gpu = f"{r['gpu_peak_mib']:.0f}" if r["gpu_peak_mib"] is not None else "-"
        report(f"{name:<32}{rate:>10.3f}{1 / rate:>10.2f}{rate * pairs:>10.2f}{r['peak_mib']:>14.0f}{gpu:>14}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256, help="Show-o hidden width (default 256)")
    p.add_argument("--layers", type=int, default=4, help="Show-o layers (default 4)")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (default 2; the paper uses 10)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    a = p.parse_args(argv)
    run(print, a.width, a.layers, a.pairs, a.steps, a.threads)


if __name__ == "__main__":
    main()
