"""Generate images with Show-o (Sec. 3.1), optionally searching over the decoding paths with a verifier:
ORM best-of-N and PRM step search (Sec. 3.2), PARM (Sec. 4) and PARM++ (Sec. 5).

    python sample.py --tiny --prompt "a photo of a red apple" --n 4 --out outputs/apple
    python sample.py --tiny --prompt "a photo of a red apple" --parm --out outputs/apple-parm
    python sample.py --tiny --metadata evaluation_metadata.jsonl --parm --out outputs/geneval

One prompt writes `image.png` (the chosen image), `paths.png` (every path; red frame = truncated),
`path_XX.png`, and `steps.png` (plain generation: rows = paths, columns = per-step x̂0) or `trace.json`
(searches: every judgment, why each path ended, the winner and the work done). `--prompts` / `--metadata`
write GenEval's folder layout (`<out>/<00000>/metadata.jsonl`, `samples/0000.png ...`) instead.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cotgen
import data

VERIFIER_HELP = """no verifier found at {path}.
The searches need a LLaVA-OneVision reward model. Download one of:
  hf download ZiyuG/Image-Generation-CoT --include "parm/*" --local-dir weights       # PARM (the paper's)
  hf download ZiyuG/Image-Generation-CoT --include "orm_ft/*" --local-dir weights     # fine-tuned ORM
  hf download lmms-lab/llava-onevision-qwen2-7b-ov --local-dir weights/llava-ov-7b    # zero-shot ORM/PRM
and pass it with --verifier (default weights/parm), or use --tiny."""

DOWNLOAD_HELP = """no {what} found at {path}.
Download the released weights (about 6 GB) with the Hugging Face CLI:
  hf download showlab/show-o --local-dir weights/show-o
  hf download showlab/magvitv2 --local-dir weights/magvitv2
  hf download microsoft/phi-1_5 config.json tokenizer.json --local-dir weights/phi-1_5
then run with --showo weights/show-o --magvit weights/magvitv2 --phi weights/phi-1_5 (these are the defaults),
or try everything on built-in tiny random checkpoints with --tiny."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt to generate an image for")
    src.add_argument("--prompts", help="file with one prompt per line (writes GenEval's folder layout)")
    src.add_argument("--metadata", help="GenEval's evaluation_metadata.jsonl: prompts and metadata per line")
    p.add_argument("--check-prompts", default=None,
                   help="with --metadata: a prompts file (GenEval's generation_prompts.txt) that must match it "
                        "line by line, as the paper's evaluation script checks")
    strategy = p.add_mutually_exclusive_group()
    strategy.add_argument("--orm", action="store_true", help="ORM best-of-N on the final images (Sec. 3.2)")
    strategy.add_argument("--prm", action="store_true", help="PRM step-level best-of-N (Sec. 3.2)")
    strategy.add_argument("--parm", action="store_true", help="PARM: clarity, potential, best-of-N' (Sec. 4)")
    strategy.add_argument("--parm++", "--reflect", dest="parmpp", action="store_true",
                          help="PARM++: PARM, then up to --rounds reflection rounds (Sec. 5)")
    p.add_argument("--n", type=int, default=None,
                   help="decoding paths per image (default 20 with a search, as the paper; 1 without)")
    p.add_argument("--samples", type=int, default=None,
                   help="images per prompt with --prompts/--metadata (default 4, as GenEval); 1 with --prompt")
    p.add_argument("--steps", type=int, default=18, help="masked decoding steps (default 18, as the paper)")
    p.add_argument("--cfg", type=float, default=1.75, help="classifier-free guidance scale g (default 1.75)")
    p.add_argument("--seed", type=int, default=0, help="path i uses a generator seeded with seed + i (default 0)")
    p.add_argument("--out", default="outputs/sample", help="output folder (default outputs/sample)")
    p.add_argument("--dtype", default="float32", help="float32 (the original), bfloat16 or float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--showo", default="weights/show-o", help="Show-o checkpoint folder (showlab/show-o)")
    p.add_argument("--phi", default=None,
                   help="folder with phi-1.5's tokenizer.json + config.json (default: the checkpoint's "
                        "llm_model_path if it is a folder, else weights/phi-1_5)")
    p.add_argument("--magvit", default="weights/magvitv2", help="MAGVIT-v2 checkpoint folder (showlab/magvitv2)")
    p.add_argument("--verifier", default="weights/parm",
                   help="LLaVA-OneVision reward model folder for the searches (default weights/parm)")
    p.add_argument("--judge", choices=("greedy", "sample"), default="greedy",
                   help="yes/no decisions: greedy (default, deterministic) or sampled as the released code does")
    p.add_argument("--released-scores", action="store_true",
                   help="read p(yes)/p(no) after the checkpoint's top-k/top-p filter, as the released code "
                        "(saturates at 1.0); default: the full softmax")
    p.add_argument("--no-truncate", action="store_true",
                   help="PARM: decode paths judged without potential to the end, as the released code does")
    p.add_argument("--released-temperature", action="store_true",
                   help="start every path after the first at temperature 0, as the released scripts do (they "
                        "never reset the annealed temperature); default: each path starts at 1")
    p.add_argument("--rounds", type=int, default=3, help="PARM++: maximum reflection rounds (default 3)")
    p.add_argument("--tiny", action="store_true", help="use built-in tiny random checkpoints (no download)")
    p.add_argument("--cache", default=None, help="where --tiny writes its checkpoints (default ~/.cache/cotgen)")
    return p


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def resolve_weights(args) -> tuple[Path, Path | None, Path]:
    if args.tiny:
        t = data.tiny_checkpoints(args.cache)
        return t["showo"], t["phi"], t["magvit"]
    showo, magvit = Path(args.showo), Path(args.magvit)
    for what, path in (("Show-o checkpoint", showo), ("MAGVIT-v2 checkpoint", magvit)):
        if not path.is_dir():
            fail(DOWNLOAD_HELP.format(what=what, path=path))
    phi = Path(args.phi) if args.phi else None
    if phi is None and not (showo / data.read_config(showo).get("llm_model_path", "")).is_dir():
        phi = Path("weights/phi-1_5")
        if not phi.is_dir():
            fail(DOWNLOAD_HELP.format(what="phi-1.5 tokenizer", path=phi))
    return showo, phi, magvit


def load_models(args):
    """Validate flags, then load Show-o, its tokenizer and MAGVIT-v2 (one clear error for each problem)."""
    try:
        dtype, device = data.parse_dtype(args.dtype), data.parse_device(args.device)
    except ValueError as e:
        fail(str(e))
    showo_dir, phi_dir, magvit_dir = resolve_weights(args)
    try:
        model, tok = cotgen.load_showo(showo_dir, phi_dir, dtype=dtype, device=device)
        magvit = cotgen.load_magvit(magvit_dir, dtype=dtype, device=device)
    except data.CheckpointError as e:
        fail(str(e))
    return model, tok, magvit


def decode_images(magvit, codes: torch.Tensor, batch: int = 16) -> np.ndarray:
    """Codes [k, N] -> uint8 images [k, H, W, 3], decoded in batches."""
    with torch.inference_mode():
        return np.concatenate([data.to_uint8_image(magvit.decode_code(codes[i:i + batch]))
                               for i in range(0, codes.shape[0], batch)])


def strategy_of(args) -> str:
    return "orm" if args.orm else "prm" if args.prm else "parm" if args.parm else "parm++" if args.parmpp else "none"


def check_common(args) -> None:
    """Flag checks that need no model, so that a bad flag fails before anything is loaded or written."""
    search = strategy_of(args) != "none"
    args.n = args.n if args.n is not None else (20 if search else 1)
    args.samples = args.samples if args.samples is not None else (1 if args.prompt is not None else 4)
    if args.n < 1:
        fail(f"--n must be at least 1 (got {args.n})")
    if args.steps < 1:
        fail(f"--steps must be at least 1 (got {args.steps})")
    if args.samples < 1:
        fail(f"--samples must be at least 1 (got {args.samples})")
    if args.rounds < 0:
        fail(f"--rounds must be 0 or more (got {args.rounds})")
    if args.no_truncate and strategy_of(args) not in ("parm", "parm++"):
        fail("--no-truncate only applies to --parm and --parm++")
    if args.check_prompts and not args.metadata:
        fail("--check-prompts needs --metadata")
    if args.prompt is not None and not args.prompt.strip():
        fail("--prompt is empty: give the text to generate an image for")
    if search and not args.tiny and not Path(args.verifier).is_dir():
        fail(VERIFIER_HELP.format(path=args.verifier))


def read_jobs(args) -> list[tuple[str, dict]]:
    """(prompt, GenEval metadata) pairs from --prompt, --prompts or --metadata, checked before any work."""
    import json

    if args.prompt is not None:
        return [(args.prompt, {"prompt": args.prompt})]
    path = Path(args.prompts or args.metadata)
    if not path.is_file():
        fail(f"{path} not found")
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    if not lines:
        fail(f"{path} has no prompts")
    if args.prompts:
        return [(l.strip(), {"prompt": l.strip()}) for l in lines]
    jobs = []
    for k, line in enumerate(lines):
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path} line {k + 1} is not JSON ({e})")
        if not isinstance(meta, dict) or not str(meta.get("prompt", "")).strip():
            fail(f"{path} line {k + 1} has no \"prompt\"")
        jobs.append((meta["prompt"], meta))
    if args.check_prompts:
        check = Path(args.check_prompts)
        if not check.is_file():
            fail(f"{check} not found")
        prompts = [l.strip() for l in check.read_text().splitlines() if l.strip()]
        if len(prompts) != len(jobs):
            fail(f"{check} has {len(prompts)} prompts but {path} has {len(jobs)}: they must match line by line")
        for k, (p, (q, _)) in enumerate(zip(prompts, jobs)):
            if p != q:
                fail(f"prompt {k + 1} differs: {check} says {p!r} but {path} says {q!r}")
    return jobs


class Progress:
    """One line per step on stderr: where the run is and how fast it goes."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.t0 = total, label, time.time()

    def __call__(self, done: int, extra: str = "") -> None:
        dt = time.time() - self.t0
        print(f"[{self.label}] step {done}/{self.total}  {extra}  {dt:.1f}s", file=sys.stderr, flush=True)


def load_judge(args):
    """The verifier for the searches, wrapped with the decision settings (None for plain generation)."""
    if strategy_of(args) == "none":
        return None
    import verifiers

    path = data.tiny_checkpoints(args.cache)["llava"] if args.tiny else Path(args.verifier)
    try:
        verifier = verifiers.load_verifier(path, dtype=data.parse_dtype(args.dtype), device=data.parse_device(args.device))
    except data.CheckpointError as e:
        fail(str(e))
    gen = torch.Generator(device=verifier.device).manual_seed(args.seed)
    return cotgen.Judge(verifier, decide=args.judge, generator=gen, released_scores=args.released_scores)


def run_one(args, model, tok, magvit, judge, prompt: str, seed: int, label: str) -> cotgen.SearchResult:
    progress = Progress(args.steps, label if label != "none" else "decode")
    kw = dict(steps=args.steps, cfg=args.cfg, seed=seed, progress=progress,
              released_temperature=args.released_temperature)
    strategy = strategy_of(args)
    if strategy == "none":
        return cotgen.decode_all(model, tok, magvit, prompt, args.n, **kw)
    search = {"orm": cotgen.orm_search, "prm": cotgen.prm_search, "parm": cotgen.parm_search,
              "parm++": cotgen.parm_plus_plus}[strategy]
    if strategy in ("parm", "parm++"):
        kw["truncate"] = not args.no_truncate
    if strategy == "parm++":
        kw["rounds"] = args.rounds
    return search(model, tok, magvit, judge, prompt, args.n, **kw)


def result_files(args, magvit, result: cotgen.SearchResult) -> dict:
    """The files of a one-prompt run: chosen image, every path's image and their grid, and the trace."""
    import json

    finished = result.finals.min(dim=1).values >= 0          # paths that never ran have no x̂0
    finals = decode_images(magvit, result.finals.clamp(min=0))
    finals[~finished.numpy()] = 255
    chosen = decode_images(magvit, result.codes[None])[0]
    files = {"image.png": chosen, "paths.png": data.image_grid(finals, cols=min(args.n, 5), marks=result.pruned),
             **{f"path_{i:02d}.png": finals[i] for i in range(args.n)}}
    if strategy_of(args) != "none":
        files["trace.json"] = json.dumps(result.trace, indent=2) + "\n"
    else:
        files["steps.png"] = data.image_grid(decode_images(magvit, result.history.flatten(0, 1)), cols=args.steps)
    return files


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_common(args)
    jobs = read_jobs(args)
    model, tok, magvit = load_models(args)
    judge = load_judge(args)
    out = Path(args.out)
    long = [p for p, _ in jobs if tok.is_truncated(p)]
    if long:
        print(f"warning: {len(long)} prompt(s) are longer than Show-o's {model.config.max_seq_length} text tokens "
              f"and are truncated, as the original does (first: {long[0]!r})", file=sys.stderr)
    if args.prompt is not None:
        result = run_one(args, model, tok, magvit, judge, args.prompt, args.seed, strategy_of(args))
        write_outputs(out, result_files(args, magvit, result))
        print(f"wrote {out}/: image.png (path {result.winner}: {result.trace['why']})", file=sys.stderr)
        return 0
    import json

    files = {}
    for k, (prompt, meta) in enumerate(jobs):
        folder = f"{k:05d}/"
        files[folder + "metadata.jsonl"] = json.dumps(meta, indent=4) + "\n"
        for j in range(args.samples):
            seed = args.seed + (k * args.samples + j) * args.n
            result = run_one(args, model, tok, magvit, judge, prompt, seed, f"prompt {k + 1}/{len(jobs)} sample {j}")
            chosen = decode_images(magvit, result.codes[None])[0]
            files[f"{folder}samples/{j:04d}.png"] = chosen
            if strategy_of(args) != "none":
                files[f"{folder}traces/{j:04d}.json"] = json.dumps(result.trace, indent=2) + "\n"
    write_outputs(out, files)
    print(f"wrote {len(jobs)} prompt folder(s) under {out}/ in GenEval's layout", file=sys.stderr)
    return 0


def write_outputs(out: Path, files: dict) -> None:
    """Write every output to a temporary folder first, then move them in, so a failure leaves nothing half
    written. Values are uint8 images (PNG) or text."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, value in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(value, np.ndarray):
                data.save_png(value, target)
            else:
                target.write_text(value)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                dest = out / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(f), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
