"""Generate images with Show-o (Sec. 3.1), optionally searching over the decoding paths with a verifier:
ORM best-of-N and PRM step search (Sec. 3.2), PARM (Sec. 4) and PARM++ (Sec. 5).

    python sample.py --tiny --prompt "a photo of a red apple" --paths 4 --out outputs/apple
    python sample.py --tiny --prompt "a photo of a red apple" --parm --out outputs/apple-parm
    python sample.py --tiny --metadata evaluation_metadata.jsonl --parm --out outputs/geneval
    python sample.py --world shapes --eval --showo runs/shapes/showo --out runs/shapes/eval/baseline

One prompt writes `image.png` (the chosen image), `paths.png` (every path; red frame = truncated),
`path_XX.png`, and `steps.png` (plain generation: rows = paths, columns = per-step x̂0) or `trace.json`
(searches: every judgment, why each path ended, the winner and the work done). `--prompts` / `--metadata`
write GenEval's folder layout (`<out>/<00000>/metadata.jsonl`, `samples/0000.png ...`) instead; `--world shapes
--eval` does so for the shapes world's evaluation prompts and scores the images (scores.md, grid.png).
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import torch
import torch.distributed as dist

import cotgen
import data
import verifiers

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

WORLDS = ("shapes",)

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt to generate an image for")
    src.add_argument("--prompts", help="file with one prompt per line (writes GenEval's folder layout)")
    src.add_argument("--metadata", help="GenEval's evaluation_metadata.jsonl: prompts and metadata per line")
    src.add_argument("--eval", action="store_true",
                     help="with --world: generate the world's held-out evaluation prompts in GenEval's layout and "
                          "score them with the world's evaluator (scores.json, scores.md, grid.png)")
    p.add_argument("--limit", type=int, default=None, metavar="K",
                   help="with --eval: only the first K evaluation prompts (a quick look: not GenEval's balance)")
    p.add_argument("--check-prompts", default=None,
                   help="with --metadata: a prompts file (GenEval's generation_prompts.txt) that must match it "
                        "line by line, as the paper's evaluation script checks")
    strategy = p.add_mutually_exclusive_group()
    strategy.add_argument("--orm", action="store_true", help="ORM best-of-N on the final images (Sec. 3.2)")
    strategy.add_argument("--prm", action="store_true", help="PRM step-level best-of-N (Sec. 3.2)")
    strategy.add_argument("--parm", action="store_true", help="PARM: clarity, potential, best-of-N' (Sec. 4)")
    strategy.add_argument("--parm++", "--reflect", dest="parmpp", action="store_true",
                          help="PARM++: PARM, then up to --rounds reflection rounds (Sec. 5)")
    p.add_argument("--paths", "--n", dest="n", type=int, default=None, metavar="N",
                   help="N, the decoding paths per image (default 20 with a search, as the paper; 1 without). "
                        "--n is the same flag, but torchrun takes it for its own --nnodes: use --paths there")
    p.add_argument("--samples", type=int, default=None,
                   help="images per prompt with --prompts/--metadata (default 4, as GenEval); 1 with --prompt; "
                        "with --eval, each evaluation prompt's own number (data.eval_specs) unless given")
    p.add_argument("--steps", type=int, default=18, help="masked decoding steps (default 18, as the paper)")
    p.add_argument("--cfg", type=float, default=1.75, help="classifier-free guidance scale g (default 1.75)")
    p.add_argument("--seed", type=int, default=0, help="path i uses a generator seeded with seed + i (default 0)")
    p.add_argument("--out", default="outputs/sample", help="output folder (default outputs/sample); it is written "
                                                            "whole, so an existing non-empty one needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--resume", action="store_true",
                   help="with --prompts/--metadata/--eval: keep the prompts an interrupted run with the same flags "
                        "finished (in .OUT.parts beside --out) and make only the others")
    p.add_argument("--dtype", default="float32", help="float32 (the original), bfloat16 or float16")
    add_model_args(p, verifier="weights/parm")
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
    return p

# ---- command-line helpers shared with train.py -----------------------------------------------------------

def fail(msg: str, status: int = 2) -> NoReturn:
    """The one way a user's mistake ends a command: one line on stderr, exit status 2, no traceback (status 1: the
    machine failed, not the user, as with a full disk)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(status)

class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler's stop), raised like Ctrl-C so every atomic writer removes its temporary."""

def _terminate(signum, frame) -> NoReturn:
    raise Terminated

@dataclass(frozen=True)
class Pipeline:
    """A command that runs others as its stages, in its own process (`train.py shapes`): `line` is the command the
    user typed, which continues the pipeline, and `stages` names the stage that makes each folder (folder -> its
    command), so that a stage's messages name the pipeline's command and the stage to redo, not the stage's flags."""
    line: str
    stages: dict[Path, str]

    def stage_of(self, path: Path) -> tuple[Path, str] | None:
        """(folder, command) of the stage whose folder holds `path`."""
        where = Path(os.path.abspath(path)).parents
        return next(((Path(f), s) for f, s in self.stages.items() if Path(os.path.abspath(f)) in where), None)

def damaged(e: data.Unreadable, pipeline: Pipeline | None) -> str:
    """The line for an unreadable weights file: one a stage of `pipeline` made names that stage and how to make it
    again, one in the folder of a run of this project (run.json, at most two folders up: a run writes its weights
    in OUT, OUT/ckpt-*, OUT/round_R/model) names that run; a downloaded one keeps the download advice."""
    stage = pipeline.stage_of(e.path) if pipeline else None
    if stage:
        return (f"{e.problem}; the pipeline's stage `{stage[1]}` made it in {stage[0]}: remove that folder and run "
                f"`{pipeline.line}` to make it again")
    run = next((d for d in Path(os.path.abspath(e.path)).parents[:3] if (d / "run.json").is_file()), None)
    if run:
        return f"{e.problem}; the run in {run} made it: remove {run} and run the command that made it again"
    return str(e)

_claims: list[ExitStack] = []      # the --out locks of the commands running in this process (innermost last)

def command(run: Callable[[], int], kept: str, again: str = "run the same command",
            pipeline: Pipeline | None = None) -> int:
    """How every command line here runs `run()`: a DataError or CheckpointError from anywhere (a user's file or
    folder) ends in `fail`'s one line (an unreadable file a run made: `damaged`); a WriteError (a full disk) in one
    line with exit status 1 that says how to continue (`again`), its temporaries gone; Ctrl-C or SIGTERM, once the
    temporaries are gone, in one line saying what was kept (`kept`) and exit status 130 (143 for SIGTERM). The
    --out lock `claim` takes is held until `run()` ends."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:          # not the main thread (an embedding program): SIGTERM keeps its own handler
        previous = None
    with ExitStack() as claims:
        _claims.append(claims)
        try:
            return run()
        except data.Unreadable as e:
            fail(damaged(e, pipeline))
        except (data.DataError, data.CheckpointError) as e:
            fail(str(e))
        except data.WriteError as e:
            fail(f"{e}; {'free space' if e.full else 'fix that'} and {again}", status=1)
        except KeyboardInterrupt as e:
            print(f"interrupted: {kept}", file=sys.stderr)
            return 143 if isinstance(e, Terminated) else 130
        finally:
            _claims.pop()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

# ---- many processes: `torchrun --nproc_per_node K sample.py | train.py ...` (README: Many GPUs) -------------

# How long a process waits for the others at a collective: the first process alone curates DPO's pairs, writes
# checkpoints and publishes results while the others wait at a barrier, and that can take hours at full scale.
PROCESS_TIMEOUT = timedelta(hours=12)

def world() -> tuple[int, int]:
    """(this process's rank, the number of processes) of a torchrun job; (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

def first_process() -> bool:
    """The process that prints progress and writes shared files (every process in a single-process run)."""
    return world()[0] == 0

def sync() -> None:
    """Wait until every process gets here (a no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()

def join_processes(args) -> None:
    """Join the process group of a torchrun job, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), once per process (it is left at exit); nothing happens in a single process. Each
    process owns GPU LOCAL_RANK, so `--device cuda` means that one, and the group sends CPU tensors through gloo
    and CUDA tensors through NCCL (no backend is named). With --tiny the first process writes the tiny
    checkpoints before the others read them (the others would race to publish the same folder)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if not dist.is_available():
        fail("this torch build has no torch.distributed: run one process (without torchrun)")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(timeout=PROCESS_TIMEOUT)
        atexit.register(dist.destroy_process_group)
    if getattr(args, "tiny", False):
        if first_process():
            tiny_checkpoints(args.cache)
        sync()

# ---- flags, models and progress, shared with train.py -------------------------------------------------------

def claim(out: Path) -> None:
    """Hold --out's lock (data.folder_lock: `.NAME.lock` beside it) until the command ends, so that a second run on
    --out stops here, before any work. Under torchrun the first process holds it and tells the others whether it
    got it, so that every process stops with the same line."""
    refused = None
    if first_process() and _claims:
        try:
            if _claims[-1].enter_context(data.folder_lock(out)) is None:
                print(f"warning: the file system of {out} has no locks: nothing stops a second run on it",
                      file=sys.stderr)
        except data.DataError as e:
            refused = str(e)
    if world()[1] > 1:
        told = [refused]
        dist.broadcast_object_list(told)
        refused = told[0]
    if refused:
        fail(refused)

def check_out(flag: str, overwrite: bool | None = None) -> Path:
    """--out, checked before any work: named, not a file, under folders only, writable (its parent too: a
    folder is published by a rename there), and no other run's (`claim` locks it for the command's run); with
    `overwrite` given (sample.py writes --out whole), an existing non-empty folder needs it. Temporaries a killed
    run left for it are removed."""
    out = Path(flag)
    if not flag.strip():
        fail("--out is empty: name a folder")
    if out.is_file():
        fail(f"--out {flag!r} is a file: name a folder")
    above = next((p for p in out.parents if p.exists()), Path("."))
    for folder in [above, out] if out.is_dir() else [above]:
        if not folder.is_dir():
            fail(f"--out {flag!r} is inside {folder}, which is a file: name a folder under a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            fail(f"--out {flag!r}: {folder} is not writable: choose another --out, or fix its permissions")
    claim(out)
    data.remove_stale_temporaries(above)
    if out.is_dir():
        data.remove_stale_temporaries(out)
        if overwrite is False and any(out.iterdir()):
            fail(f"--out {flag!r} already holds files: pass --overwrite to replace it, or choose another --out")
    return out

class Progress:
    """One progress line on stderr: "[label] step 3/18  text  0.12s/step  eta 0.1min". It prints every
    `every` units and at most every `seconds` (the last one always), so long runs show where they are."""

    def __init__(self, label: str, total: int, *, unit: str = "step", every: int = 1, seconds: float = 0.0):
        self.label, self.total, self.unit, self.every, self.seconds = label, total, unit, max(1, every), seconds
        self.t0, self.shown, self.calls = time.time(), 0.0, 0

    def __call__(self, done: int, text: str = "") -> None:
        self.calls += 1
        now = time.time()
        if not first_process() or done < self.total and (done % self.every or now - self.shown < self.seconds):
            return
        self.shown, rate = now, (now - self.t0) / self.calls
        print(f"[{self.label}] {self.unit} {done}/{self.total}  {text}  {rate:.2f}s/{self.unit}  "
              f"eta {rate * (self.total - done) / 60:.1f}min", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A free line, throttled like the progress lines."""
        if first_process() and time.time() - self.shown >= self.seconds:
            self.shown = time.time()
            print(f"[{self.label}] {text}", file=sys.stderr, flush=True)

def add_model_args(p: argparse.ArgumentParser, *, verifier: str | None = None, generator: bool = True):
    """The model-folder flags every command shares. With --tiny, a folder given explicitly wins over the
    built-in tiny one (so a tiny model fine-tuned by train.py can be sampled with --tiny --showo OUT)."""
    g = p.add_argument_group("models")
    if generator:
        g.add_argument("--showo", default=None, help="Show-o checkpoint folder (default weights/show-o)")
        g.add_argument("--phi", default=None, help="folder with phi-1.5's tokenizer.json + config.json (default: "
                                                   "the checkpoint's llm_model_path if a folder, else weights/phi-1_5)")
        g.add_argument("--magvit", default=None, help="MAGVIT-v2 folder (default weights/magvitv2: showlab/magvitv2)")
        g.add_argument("--world", choices=WORLDS, default=None,
                       help="a miniature world (the shapes world of README's 'The paper in miniature'): images are "
                            "tokenized by its quadrant codec (data.QuadrantCodec) instead of MAGVIT-v2, and --showo is "
                            "the generator `train.py pretrain --world shapes` wrote")
    if verifier is not None:
        g.add_argument("--verifier", default=None,
                       help=f"LLaVA-OneVision yes/no reward model folder (default {verifier or 'none'})")
        p.set_defaults(verifier_default=verifier)
    g.add_argument("--tiny", action="store_true", help="use the built-in tiny random checkpoints (no download)")
    g.add_argument("--cache", default=None, help="where --tiny writes its checkpoints (default ~/.cache/cotgen)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    return g

def at_least(args, minimum: float, *names: str, above: bool = False) -> None:
    """Each flag named must be a finite number of at least `minimum` (`above`: more than it) when given (NaN and
    inf fail too)."""
    for name in names:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and (v > minimum if above else v >= minimum)):
            want = ("positive" if minimum == 0 else f"above {minimum}") if above else f"at least {minimum}"
            fail(f"--{name.replace('_', '-')} must be {want} (got {v})")

def device_of(args) -> torch.device:
    try:
        device = data.parse_device(args.device)
    except ValueError as e:
        fail(str(e))
    if device.index is not None and world()[1] > 1:
        fail(f"--device {args.device}: under torchrun each process takes GPU LOCAL_RANK; pass --device cuda or auto")
    return device

TINY_VERSION = "tiny-v1"  # bump when a writer changes, so stale caches are rebuilt

def tiny_checkpoints(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write (once) and return the tiny random checkpoints, in the official formats, so that `--tiny` goes
    through exactly the loaders real weights go through. Keys: showo, phi, magvit, llava."""
    root = Path(cache_dir or os.environ.get("COTGEN_CACHE", Path.home() / ".cache" / "cotgen")) / TINY_VERSION
    for name, writer in {"generator": cotgen.write_tiny_showo, "llava": verifiers.write_tiny_llava}.items():
        if not (root / name / "complete").is_file():
            with data.atomic_path(root / name, directory=True) as tmp:
                writer(tmp)
                (tmp / "complete").write_text("ok\n")
    gen = root / "generator"
    return {"showo": gen / "showo", "phi": gen / "phi", "magvit": gen / "magvitv2", "llava": root / "llava"}

def resolve_weights(args) -> tuple[Path, Path | None, Path]:
    """The Show-o, phi and MAGVIT-v2 folders the flags name (explicit folders win over --tiny's)."""
    tiny = tiny_checkpoints(args.cache) if args.tiny else {}
    showo = Path(args.showo or tiny.get("showo") or "weights/show-o")
    magvit = Path(args.magvit or tiny.get("magvit") or "weights/magvitv2")
    for what, path in (("Show-o checkpoint", showo), ("MAGVIT-v2 checkpoint", magvit)):
        if not path.is_dir():
            fail(DOWNLOAD_HELP.format(what=what, path=path))
    phi = Path(args.phi) if args.phi else (tiny["phi"] if args.tiny and not args.showo else None)
    if phi is None and not (showo / cotgen.llm_model_path(showo)).is_dir():
        phi = Path("weights/phi-1_5")
        if not phi.is_dir():
            fail(DOWNLOAD_HELP.format(what="phi-1.5 tokenizer", path=phi))
    return showo, phi, magvit

def verifier_dir(args) -> Path | None:
    """The reward model folder: --verifier, else the tiny one with --tiny, else the command's default."""
    if args.verifier:
        return Path(args.verifier)
    if args.tiny:
        return tiny_checkpoints(args.cache)["llava"]
    return Path(args.verifier_default) if args.verifier_default else None

def load_models(args):
    """Validate flags, then load Show-o, its tokenizer and MAGVIT-v2 (one clear error for each problem)."""
    try:
        dtype = data.parse_dtype(args.dtype)
    except ValueError as e:
        fail(str(e))
    device = device_of(args)
    if args.world:
        showo_dir, phi_dir, magvit_dir = Path(args.showo), Path(args.phi) if args.phi else None, None
    else:
        showo_dir, phi_dir, magvit_dir = resolve_weights(args)
    model, tok = cotgen.load_showo(showo_dir, phi_dir, dtype=dtype, device=device)
    if model.config.order == "raster":
        check_raster(args, model.config, showo_dir)
    magvit = image_tokenizer(args, magvit_dir, dtype, device)
    if args.world and model.config.num_vq_tokens != magvit.tokens:
        fail(f"{showo_dir} makes {model.config.num_vq_tokens} image tokens, not the {args.world} world's "
             f"{magvit.tokens}: pass a generator that `train.py pretrain --world {args.world}` wrote")
    return model, tok, magvit

def check_raster(args, config: cotgen.ShowoConfig, showo_dir: Path) -> None:
    """What a raster generator (config.json's order) cannot do, before any work: PARM++'s self-correction, and a
    step of no token."""
    if args.parmpp:
        fail(f"{showo_dir} is a raster generator: PARM++ regenerates from a previous image, which only Show-o's "
             "masked generator is trained for; use --parm")
    if args.steps > config.num_vq_tokens:
        fail(f"--steps {args.steps}: {showo_dir} is a raster generator of {config.num_vq_tokens} image tokens, and "
             "each step makes at least one: use at most that many steps")

def image_tokenizer(args, magvit_dir: Path | None, dtype=torch.float32, device="cpu"):
    """MAGVIT-v2 from its folder, or the world's codec (data.QuadrantCodec) with --world."""
    return data.QuadrantCodec() if args.world else cotgen.load_magvit(magvit_dir, dtype=dtype, device=device)

def decode_images(magvit, codes: torch.Tensor, batch: int = 16) -> np.ndarray:
    """Codes [k, N] -> uint8 images [k, H, W, 3], decoded in batches."""
    with torch.inference_mode():
        return np.concatenate([data.to_uint8_image(magvit.decode_code(codes[i:i + batch]))
                               for i in range(0, codes.shape[0], batch)])

# ---- the generation command: one prompt, or a prompt file in GenEval's layout (--eval: scored) -------------

def strategy_of(args) -> str:
    return "orm" if args.orm else "prm" if args.prm else "parm" if args.parm else "parm++" if args.parmpp else "none"

def check_common(args) -> None:
    """Flag checks that need no model, so that a bad flag fails before anything is loaded or written."""
    search = strategy_of(args) != "none"
    args.n = args.n if args.n is not None else (20 if search else 1)
    if args.samples is None and not args.eval:          # --eval: each evaluation prompt's own number of images
        args.samples = 1 if args.prompt is not None else 4
    if args.samples is not None and args.samples > IMAGES_PER_PROMPT:
        fail(f"--samples must be at most {IMAGES_PER_PROMPT} (got {args.samples}): each prompt has "
             f"{IMAGES_PER_PROMPT} image seeds")
    if args.n < 1:
        fail(f"--paths/--n must be at least 1 (got {args.n})")
    if args.n > PATHS_PER_IMAGE:
        fail(f"--paths/--n must be at most {PATHS_PER_IMAGE} (got {args.n}): each image has {PATHS_PER_IMAGE} path "
             "seeds")
    at_least(args, 1, "steps", "samples")
    at_least(args, 0, "cfg")            # g = 0 is plain conditional decoding; a negative or NaN g is a typo
    if args.rounds < 0:
        fail(f"--rounds must be 0 or more (got {args.rounds})")
    if args.no_truncate and strategy_of(args) not in ("parm", "parm++"):
        fail("--no-truncate only applies to --parm and --parm++")
    if args.check_prompts and not args.metadata:
        fail("--check-prompts needs --metadata")
    if args.prompt is not None and (args.resume or world()[1] > 1):
        fail("--resume and torchrun apply to prompt sets (--prompts, --metadata, --eval), whose prompts are made one "
             "by one and split across the processes; --prompt runs in one process")
    if args.eval and not args.world:
        fail("--eval scores a world's evaluation prompts: add --world shapes")
    if args.limit is not None and not args.eval:
        fail("--limit applies to --eval only")
    at_least(args, 1, "limit")
    if args.world and not args.showo:
        fail(f"--world {args.world} needs its generator: --showo DIR, as written by `python train.py pretrain "
             f"--world {args.world} --out DIR`")
    if args.prompt is not None and not args.prompt.strip():
        fail("--prompt is empty: give the text to generate an image for")
    if search and not (found := verifier_dir(args)).is_dir():
        fail(VERIFIER_HELP.format(path=found))
    if not 0 <= args.seed < 2 ** 62:
        fail(f"--seed must be in [0, 2^62) (got {args.seed})")
    check_out(args.out, args.overwrite)

def read_jobs(args) -> list[tuple[str, dict]]:
    """(prompt, GenEval metadata) pairs from --prompt, --prompts or --metadata, checked before any work."""
    if args.prompt is not None:
        return [(args.prompt, {"prompt": args.prompt})]
    if args.eval:
        return [(spec["prompt"], spec) for spec in data.eval_specs()][:args.limit]
    if args.prompts:
        return [(p, {"prompt": p}) for p in data.read_prompts(args.prompts)]
    path = args.metadata
    records, problems = data.read_records(path, "metadata file", '{"prompt": "...", ...} (GenEval\'s metadata)')
    problems += [f'{where}: "prompt" must be non-empty text' for _, where, meta in records
                 if not isinstance(meta.get("prompt"), str) or not meta["prompt"].strip()]
    if problems:
        fail(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    jobs = [(meta["prompt"], meta) for _, _, meta in records]
    if args.check_prompts:
        check = args.check_prompts
        prompts = data.read_prompts(check)
        if len(prompts) != len(jobs):
            fail(f"{check} has {len(prompts)} prompts but {path} has {len(jobs)}: they must match line by line")
        for k, (p, (q, _)) in enumerate(zip(prompts, jobs)):
            if p != q:
                fail(f"prompt {k + 1} differs: {check} says {p!r} but {path} says {q!r}")
    return jobs

def load_judge(args):
    """The verifier for the searches, wrapped with the decision settings (None for plain generation)."""
    if strategy_of(args) == "none":
        return None
    verifier = verifiers.load_verifier(verifier_dir(args), dtype=data.parse_dtype(args.dtype), device=device_of(args))
    gen = torch.Generator(device=verifier.device).manual_seed(args.seed)
    return cotgen.Judge(verifier, decide=args.judge, generator=gen, released_scores=args.released_scores)

def run_one(args, model, tok, magvit, judge, prompt: str, seed: int, progress=None) -> cotgen.SearchResult:
    """One prompt's args.n decoding paths, searched as the flags say (progress: a line per step by default)."""
    strategy = strategy_of(args)
    kw = dict(steps=args.steps, cfg=args.cfg, seed=seed, released_temperature=args.released_temperature,
              progress=progress or Progress(strategy.replace("none", "decode"), args.steps), record=args.record)
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

def main(argv=None, pipeline: Pipeline | None = None, record: cotgen.PathRecord | None = None) -> int:
    """The command line; `pipeline`: the pipeline running it as a stage, whose command continues it; `record`: the
    decoding steps of --showo's generator that earlier runs in this process made (shared, not recomputed)."""
    args = build_parser().parse_args(argv)
    args.record = record
    kept, again = f"nothing was written to {args.out}", "run the same command"
    if pipeline is not None:
        kept, again = f"{kept}; `{pipeline.line}` continues the pipeline", f"run `{pipeline.line}`"
    elif args.prompt is None:
        kept += "; the prompts finished so far are kept for --resume"
        again += " with --resume: it continues from the prompts finished so far"
    join_processes(args)
    return command(lambda: run(args), kept, again, pipeline)

def run(args) -> int:
    """The sample.py command: check every flag and input, load the models, generate, write --out whole."""
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
        result = run_one(args, model, tok, magvit, judge, args.prompt, args.seed)
        write_outputs(out, result_files(args, magvit, result))
        print(f"wrote {out}/: image.png (path {result.winner}: {result.trace['why']})", file=sys.stderr)
        return 0
    return run_prompts(args, jobs, model, tok, magvit, judge, out)

def prompt_parts(args, out: Path) -> Path:
    """The folder that keeps each finished prompt until the whole set is published (.OUT.parts beside --out),
    with the run's flags in run.json: --resume keeps what an interrupted run with the same flags finished,
    otherwise it starts empty. Every process reads it before the first one changes it."""
    parts = out.parent / f".{out.name}.parts"
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "record")}  # record: a cache
    if args.resume and (parts / "run.json").is_file() and data.read_config(parts, "run.json") != settings:
        fail(f"--resume: {parts} was made with other flags: use the same flags, or leave out --resume to start again")
    sync()
    if first_process():
        if not args.resume:
            shutil.rmtree(parts, ignore_errors=True)
        data.write_json(settings, parts / "run.json")
    sync()
    return parts

def images_of(args, meta: dict) -> int:
    """Images of one prompt: --samples, else (--eval) the evaluation prompt's own number."""
    return args.samples or meta["images"]

PATHS_PER_IMAGE = 1000     # seeds reserved per image: the most paths one image's search may decode
IMAGES_PER_PROMPT = 1000   # images reserved per prompt

def image_seed(seed: int, k: int, j: int) -> int:
    """The seed of path 0 of image j of prompt k (path i: + i), whatever the search, N and images per prompt: so
    every search sees the same paths (the baseline's image is path 0 of each search's), the paths of N are the
    first N of any larger N's, and --samples 1 makes each prompt's first image of a longer run."""
    return seed + PATHS_PER_IMAGE * (IMAGES_PER_PROMPT * k + j)

def run_prompts(args, jobs: list[tuple[str, dict]], model, tok, magvit, judge, out: Path) -> int:
    """A prompt set in GenEval's layout. Prompt k is made by process k mod K (its seeds depend on k and the
    sample, not on the process: the judge's generator too restarts at each image's seed) and kept in its own
    folder of `prompt_parts` as soon as it is done; then the first process publishes them all as --out."""
    parts = prompt_parts(args, out)
    rank, size = world()
    mine = [k for k in range(rank, len(jobs), size) if not (parts / f"{k:05d}").is_dir()]
    count = [images_of(args, meta) for _, meta in jobs]
    progress = Progress(strategy_of(args).replace("none", "generate"), sum(count[k] for k in mine), unit="image",
                        seconds=2.0)
    done = 0
    for k in mine:
        prompt, meta = jobs[k]
        files = {"metadata.jsonl": json.dumps(meta, indent=4) + "\n"}
        for j in range(count[k]):
            seed = image_seed(args.seed, k, j)
            if judge is not None:
                judge.kw["generator"].manual_seed(seed)
            result = run_one(args, model, tok, magvit, judge, prompt, seed, lambda *_: None)
            done += 1
            progress(done, f"prompt {k + 1}/{len(jobs)}")
            files[f"samples/{j:04d}.png"] = decode_images(magvit, result.codes[None])[0]
            if strategy_of(args) != "none":
                files[f"traces/{j:04d}.json"] = json.dumps(result.trace, indent=2) + "\n"
        write_outputs(parts / f"{k:05d}", files)
    sync()
    if first_process():
        publish_parts(args, jobs, parts, out)
    return 0

def publish_parts(args, jobs: list[tuple[str, dict]], parts: Path, out: Path) -> None:
    """Every prompt's folder copied into --out, which is published in one rename (with --eval scored from the
    PNGs, which hold the generated pixels exactly); then the parts are removed."""
    with data.atomic_path(out, directory=True) as tmp:
        for k in range(len(jobs)):
            shutil.copytree(parts / f"{k:05d}", tmp / f"{k:05d}")
        scores = score_files(tmp, jobs, [images_of(args, meta) for _, meta in jobs],
                             f"{args.world} world, {strategy_of(args)}") if args.eval else {}
        write_files(tmp, scores)
    shutil.rmtree(parts)
    print(f"wrote {len(jobs)} prompt folder(s) under {out}/ in GenEval's layout", file=sys.stderr)
    if args.eval:
        print(scores["scores.md"], file=sys.stderr)

def score_files(folder: Path, jobs: list[tuple[str, dict]], samples: list[int], name: str) -> dict:
    """GenEval's scoring of the world's images in `folder`, from their pixels (data.evaluate): results.jsonl (one
    row per image, as GenEval's evaluate_images.py writes), scores.json and scores.md (six tasks and overall, with
    95% intervals) and grid.png (the first image of each prompt with its verdict)."""
    rows, firsts = [], []
    for k, (prompt, spec) in enumerate(jobs):
        for j in range(samples[k]):
            name_j = f"{k:05d}/samples/{j:04d}.png"
            image = np.asarray(data.load_image(folder / name_j))
            correct, reason = data.evaluate(image, spec)
            rows.append({"filename": name_j, "tag": spec["tag"], "prompt": prompt, "correct": correct,
                         "reason": reason})
            if j == 0:
                firsts.append((image, prompt, correct, reason))
    table = data.geneval_table((r["tag"], r["correct"]) for r in rows)
    return {"results.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
            "scores.json": json.dumps({k: vars(v) for k, v in table.items()}, indent=1) + "\n",
            "scores.md": data.markdown_table({name: table}) + "\n",
            "grid.png": data.verdict_grid(firsts)}

def write_outputs(out: Path, files: dict) -> None:
    """Write every output into a temporary folder, then publish it as `out` in one rename, so a failure or an
    interrupt leaves nothing half written and no file of an earlier run. Values are uint8 images or text."""
    with data.atomic_path(out, directory=True) as tmp:
        write_files(tmp, files)

def write_files(folder: Path, files: dict) -> None:
    """Each of `files` (relative name: uint8 image or text) into `folder`."""
    for name, value in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, np.ndarray):
            data.save_png(value, folder / name)
        else:
            (folder / name).write_text(value)

if __name__ == "__main__":
    sys.exit(main())
