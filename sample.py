"""Generate images with Show-o by masked parallel decoding (Sec. 3.1).

    python sample.py --tiny --prompt "a photo of a red apple" --n 4 --out outputs/apple

Writes `image.png` (path 0), `path_XX.png` for every path, `paths.png` (all final images) and `steps.png`
(rows = paths, columns = the per-step x̂0 predictions).
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

DOWNLOAD_HELP = """no {what} found at {path}.
Download the released weights (about 6 GB) with the Hugging Face CLI:
  hf download showlab/show-o --local-dir weights/show-o
  hf download showlab/magvitv2 --local-dir weights/magvitv2
  hf download microsoft/phi-1_5 config.json tokenizer.json --local-dir weights/phi-1_5
then run with --showo weights/show-o --magvit weights/magvitv2 --phi weights/phi-1_5 (these are the defaults),
or try everything on built-in tiny random checkpoints with --tiny."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="text prompt to generate an image for")
    p.add_argument("--n", type=int, default=1, help="number of decoding paths decoded together (default 1)")
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


def check_common(args) -> None:
    if args.n < 1:
        fail(f"--n must be at least 1 (got {args.n})")
    if args.steps < 1:
        fail(f"--steps must be at least 1 (got {args.steps})")
    if not args.prompt.strip():
        fail("--prompt is empty: give the text to generate an image for")


class Progress:
    """One line per step on stderr: where the run is and how fast it goes."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.t0 = total, label, time.time()

    def __call__(self, done: int, extra: str = "") -> None:
        dt = time.time() - self.t0
        print(f"[{self.label}] step {done}/{self.total}  {extra}  {dt:.1f}s", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_common(args)
    model, tok, magvit = load_models(args)
    if tok.is_truncated(args.prompt):
        print(f"warning: the prompt is longer than Show-o's {model.config.max_seq_length} text tokens and is "
              "truncated, as the original does", file=sys.stderr)
    paths = cotgen.Paths(model, tok, args.prompt, args.n, steps=args.steps, cfg=args.cfg, seed=args.seed)
    progress = Progress(args.steps, "decode")
    per_step = []
    for step in paths:
        per_step.append(step.x0.clone())
        progress(step.step[0] + 1, f"{len(step.paths)} path(s)")
    finals = decode_images(magvit, paths.final_tokens())
    x0 = torch.stack(per_step, 1)                                                 # [n, S, N]
    step_imgs = decode_images(magvit, x0.flatten(0, 1))
    write_outputs(Path(args.out), {
        "image.png": finals[0],
        **{f"path_{i:02d}.png": finals[i] for i in range(args.n)},
        "paths.png": data.image_grid(finals, cols=min(args.n, 5)),
        "steps.png": data.image_grid(step_imgs, cols=args.steps),
    })
    print(f"wrote {args.out}/image.png, paths.png, steps.png", file=sys.stderr)
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
