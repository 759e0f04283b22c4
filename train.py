"""Post-training commands of the paper. One subcommand per method:

    python train.py dpo --tiny --geneval 24 --out outputs/dpo             # curate pairs with the verifier, then DPO
    python train.py dpo --data pairs.jsonl --out outputs/dpo              # DPO on given pairs (Sec. 3.3)
    python train.py dpo --data pairs.jsonl --rounds 2 --verifier DIR ...  # iterative DPO (Sec. 3.3)
    python train.py dpo --data pairs.jsonl --reward-coef 0.1 --verifier DIR ...   # reward-model guidance (Sec. 3.4)
    python train.py selfcorrect --reflect reflect.json --out outputs/sc   # PARM++ self-correction fine-tune (Sec. 5)
    python train.py curate --task orm --num-prompts 13000 --out data/orm  # ranking data: orm|prm|parm|reflect
    python train.py orm --data data/orm/orm.json --out weights/orm_ft    # fine-tune a reward model (orm|parm)

The trained generator is written to --out in Show-o's own layout; `python sample.py --showo OUT` samples it.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import cotgen
import data
import dpo
import sample
import verifiers
from data import CheckpointError, DataError

fail = sample.fail


def throttled(seconds: float = 2.0):
    """A progress printer that prints at most every `seconds` (and always the final line)."""
    last = [0.0]

    def show(line: str, final: bool = False) -> None:
        if final or time.time() - last[0] >= seconds:
            last[0] = time.time()
            print(line, file=sys.stderr, flush=True)

    return show


show = throttled()


# ==========================================================================================================
# flags and checks that every Show-o fine-tune shares (dpo, selfcorrect)
# ==========================================================================================================


def add_generator_args(p: argparse.ArgumentParser):
    """The "models" group: the Show-o to fine-tune, its tokenizer, MAGVIT-v2, device and precision."""
    g = p.add_argument_group("models")
    g.add_argument("--showo", default="weights/show-o", help="Show-o checkpoint folder to start from (showlab/show-o)")
    g.add_argument("--phi", default=None, help="folder with phi-1.5's tokenizer.json + config.json (default: the "
                                               "checkpoint's llm_model_path if it is a folder, else weights/phi-1_5)")
    g.add_argument("--magvit", default="weights/magvitv2", help="MAGVIT-v2 folder, to encode and decode images")
    g.add_argument("--tiny", action="store_true", help="use the built-in tiny random checkpoints (runs in seconds)")
    g.add_argument("--cache", default=None, help="where --tiny writes its checkpoints (default ~/.cache/cotgen)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="bf16 = bf16 autocast with fp32 master weights; auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in the backward pass (less memory, same numbers)")
    return g


def add_optim_args(p: argparse.ArgumentParser, title: str):
    """AdamW, schedule, data order and seed (dpo.OptimConfig's defaults)."""
    d = dpo.OptimConfig()
    g = p.add_argument_group(title)
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"examples per step (default {d.batch_size})")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (per round for dpo --rounds; "
                                                                   f"default {d.epochs})")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help=f"linear warm-up over this fraction of the steps, then cosine to 0 (default {d.warmup_ratio})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay, biases excluded (default {d.weight_decay})")
    g.add_argument("--max-steps", type=int, default=None, help="cap the optimizer steps (per round for dpo; the "
                                                                "schedule spans the cap)")
    g.add_argument("--shuffle", action="store_true", help="shuffle the data every epoch (the released run keeps "
                                                          "file order)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of every random draw (default {d.seed})")
    return g


def add_output_args(p: argparse.ArgumentParser, out_help: str):
    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--out", required=True, help=out_help)
    g.add_argument("--save-every", type=int, default=100, help="write a resumable checkpoint every N steps (default 100)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop with a checkpoint after N steps of this invocation (split a long run into jobs)")
    g.add_argument("--log-every", type=int, default=1, help="progress line every N steps (default 1)")
    return g


def check_optim_args(a) -> None:
    """One clear error for each bad value of the shared flags."""
    for flag, v in {"--batch-size": a.batch_size, "--epochs": a.epochs, "--save-every": a.save_every,
                    "--log-every": a.log_every}.items():
        if v < 1:
            fail(f"{flag} must be at least 1 (got {v})")
    for flag, v in {"--max-steps": a.max_steps, "--stop-after": a.stop_after}.items():
        if v is not None and v < 1:
            fail(f"{flag} must be at least 1 (got {v})")
    if a.lr <= 0:
        fail(f"--lr must be positive (got {a.lr})")
    if not 0 <= a.warmup_ratio < 1 or not 0 <= a.cond_dropout <= 1:
        fail("--warmup-ratio must be in [0, 1) and --cond-dropout in [0, 1]")


def optim_config(a, device: torch.device) -> dict:
    """The dpo.OptimConfig fields from the shared flags (bf16 autocast on GPU unless --precision says)."""
    bf16 = a.precision == "bf16" or (a.precision == "auto" and device.type == "cuda")
    return dict(lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, warmup_ratio=a.warmup_ratio,
                weight_decay=a.weight_decay, max_steps=a.max_steps, shuffle=a.shuffle, seed=a.seed,
                cond_dropout=a.cond_dropout, bf16=bf16, gradient_checkpointing=a.gradient_checkpointing)


def stop_or_skip(problems: list[str], source, skip_bad: bool) -> None:
    """Every bad record of a data file in one error (training has not started), or, with --skip-bad, a count."""
    if problems and not skip_bad:
        listed = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise DataError(f"{len(problems)} unusable record(s) in {source}:\n  {listed}\n"
                        "Fix them, or pass --skip-bad to train on the others.")
    if problems:
        print(f"skipped {len(problems)} bad record(s) of {source} (--skip-bad); first: {problems[0]}",
              file=sys.stderr)


def resolve_run(a) -> tuple[torch.device, Path, Path, Path]:
    """The device and the Show-o, phi and MAGVIT-v2 folders the flags name (one clear error for each problem)."""
    try:
        device = data.parse_device(a.device)
    except ValueError as e:
        fail(str(e))
    showo, phi, magvit_dir = sample.resolve_weights(a)
    return device, showo, cotgen.resolve_phi_dir(showo, phi), magvit_dir


def guard_out(out: Path, settings: dict, resume: bool, what: str) -> None:
    """An --out that already holds a run is continued only with --resume and the same settings."""
    if (out / "run.json").is_file():
        if not resume:
            fail(f"{out} already holds a {what} run: pass --resume to continue it, or choose another --out")
        before = data.read_config(out, "run.json")
        diff = sorted(k for k in settings if settings[k] != before.get(k))
        if diff:
            fail(f"--resume with other settings than the run in {out} ({', '.join(diff)} differ): "
                 "use the same flags, or another --out")


# ==========================================================================================================
# dpo
# ==========================================================================================================


def add_dpo_parser(sub) -> argparse.ArgumentParser:
    d = dpo.TrainConfig()
    p = sub.add_parser("dpo", help="DPO, iterative DPO and DPO with reward-model guidance (Sec. 3.3, 3.4)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_generator_args(p)
    g.add_argument("--verifier", default=None,
                   help="LLaVA-OneVision yes/no reward model folder (the paper's fine-tuned ORM); needed to curate "
                        "pairs, for --rounds > 1 and for --reward-coef")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help='JSONL preference pairs, one {"prompt", "chosen", "rejected"} per line; chosen/rejected are '
                        "image paths (encoded with MAGVIT-v2, as released) or lists of image tokens")
    g.add_argument("--image-root", default=None, help="folder that relative image paths in --data start from "
                                                      "(default: the folder of the --data file)")
    g.add_argument("--prompts", default=None, help="prompt file (one per line) to curate pairs from; default: the "
                                                   "prompts of --data")
    g.add_argument("--geneval", type=int, default=None, metavar="N",
                   help="curate from N GenEval-template prompts (data.geneval_prompts) instead of a prompt file")
    g.add_argument("--curate-samples", type=int, default=4,
                   help="images generated per prompt when curating pairs (default 4)")
    g.add_argument("--judge", default="sample", choices=("sample", "greedy"),
                   help="how the verifier's yes/no label is decided when curating: sampled as the released code "
                        "does (default), or the most likely answer")
    g.add_argument("--skip-bad", action="store_true",
                   help="drop unusable records (and say how many) instead of stopping with the list of them")

    add_optim_args(p, "optimisation (defaults: Sec. 3.3 and the released dpo.yaml)")

    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=d.beta, help=f"DPO temperature β (default {d.beta})")
    g.add_argument("--sft-coef", type=float, default=d.sft_coef,
                   help=f"weight of a cross-entropy term on the chosen image (default {d.sft_coef}, as released)")
    g.add_argument("--shared-mask", action="store_true",
                   help="mask chosen and rejected with one shared ratio and positions (lower variance); by default "
                        "they are masked independently, as released")
    g.add_argument("--cond-dropout", type=float, default=d.cond_dropout,
                   help=f"probability of dropping the prompt of a training sequence (default {d.cond_dropout}, as released)")
    g.add_argument("--rounds", type=int, default=1,
                   help="DPO rounds; round r > 1 curates new pairs with round r-1's model and trains from it, with it "
                        "as the reference (iterative DPO; the paper uses 2)")

    g = p.add_argument_group("reward-model guidance (Sec. 3.4)")
    g.add_argument("--reward-coef", type=float, default=d.reward_coef,
                   help="weight of the online DPO term on the verifier's best vs worst sample of the current policy "
                        "(0 = off; the paper's guided run uses 0.1)")
    g.add_argument("--online-prompts", default=None,
                   help="prompt-only file for the online term (default: the prompts of the round's pairs)")
    g.add_argument("--online-per-step", type=int, default=d.online_per_step,
                   help=f"prompts sampled for the online term each step (default {d.online_per_step})")
    g.add_argument("--online-samples", type=int, default=d.online_samples,
                   help=f"images sampled per online prompt; best and worst make the pair (default {d.online_samples})")
    g.add_argument("--gen-steps", type=int, default=d.gen_steps,
                   help=f"decoding steps when the model generates (curation, online term; default {d.gen_steps})")
    g.add_argument("--gen-cfg", type=float, default=d.gen_cfg,
                   help=f"classifier-free guidance when the model generates (default {d.gen_cfg})")

    add_output_args(p, "output folder: the final model (Show-o layout), round_R/ with each round's pairs and "
                       "model, and the last checkpoint")
    return p


def check_dpo_args(a) -> None:
    check_optim_args(a)
    positive = {"--rounds": a.rounds, "--curate-samples": a.curate_samples, "--gen-steps": a.gen_steps,
                "--online-per-step": a.online_per_step}
    for flag, v in positive.items():
        if v < 1:
            fail(f"{flag} must be at least 1 (got {v})")
    if a.geneval is not None and a.geneval < 1:
        fail(f"--geneval must be at least 1 (got {a.geneval})")
    if a.beta <= 0:
        fail(f"--beta must be positive (got {a.beta})")
    if a.reward_coef < 0 or a.sft_coef < 0:
        fail("--reward-coef and --sft-coef must not be negative")
    if a.reward_coef and a.online_samples < 2:
        fail("--online-samples must be at least 2: the online pair is the best and the worst sample")
    if a.curate_samples < 2 and (a.data is None or a.rounds > 1):
        fail("--curate-samples must be at least 2 to find a 'yes' and a 'no' image")
    if a.data is None and a.prompts is None and a.geneval is None:
        fail("give the preference data: --data PAIRS.jsonl, or prompts to curate pairs from (--prompts FILE or "
             "--geneval N)")
    if a.prompts is not None and a.geneval is not None:
        fail("--prompts and --geneval both name the curation prompts: give one")


def train_config(a, device: torch.device) -> dpo.TrainConfig:
    return dpo.TrainConfig(**optim_config(a, device), beta=a.beta, sft_coef=a.sft_coef, shared_mask=a.shared_mask,
                           reward_coef=a.reward_coef, online_per_step=a.online_per_step,
                           online_samples=a.online_samples, gen_steps=a.gen_steps, gen_cfg=a.gen_cfg)


def run_settings(a, cfg: dpo.TrainConfig) -> dict:
    """What a resumed run must share with the interrupted one (compared before anything is trained)."""
    path = lambda p: str(Path(p).resolve()) if p else None
    return {"train": cfg.fingerprint(), "showo": path(a.showo) if not a.tiny else "tiny", "data": path(a.data),
            "prompts": path(a.prompts), "geneval": a.geneval, "rounds": a.rounds, "curate_samples": a.curate_samples,
            "judge": a.judge, "skip_bad": a.skip_bad, "online_prompts": path(a.online_prompts)}


class Run:
    """The models and folders of one `train.py dpo` invocation; the verifier is loaded only when needed."""

    def __init__(self, a):
        self.a = a
        self.device, self.showo, self.phi, self.magvit_dir = resolve_run(a)
        self.cfg = train_config(a, self.device)
        self.verifier_dir = data.tiny_checkpoints(a.cache).get("llava") if a.tiny else a.verifier
        self.out = Path(a.out)
        self.magvit = cotgen.load_magvit(self.magvit_dir, device=self.device)
        self._verifier = None

    def verifier(self):
        if self._verifier is None:
            if self.verifier_dir is None:
                raise CheckpointError("curating pairs, --rounds > 1 and --reward-coef need the yes/no reward model: "
                                      "pass --verifier DIR (a LLaVA-OneVision folder, e.g. the fine-tuned ORM)")
            import verifiers

            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self._verifier = verifiers.load_verifier(self.verifier_dir, dtype=dtype, device=self.device)
        return self._verifier

    def load_model(self, folder: Path) -> tuple[cotgen.Showo, cotgen.ShowoTokenizer]:
        return cotgen.load_showo(folder, self.phi, dtype=torch.float32, device=self.device)

    def round_dir(self, r: int) -> Path:
        return self.out / f"round_{r}"

    def curation_prompts(self) -> list[str]:
        a = self.a
        if a.prompts:
            return data.read_prompts(a.prompts)
        if a.geneval:
            return data.geneval_prompts(a.geneval)
        return list(dict.fromkeys(r.prompt for r in data.read_pair_records(a.data)[0]))

    def given_pairs(self, config: cotgen.ShowoConfig) -> list[dict]:
        """Round 1 from --data: every record checked and encoded before the first step, so a bad record stops
        the run here (or is skipped with --skip-bad), never mid-epoch."""
        a = self.a
        records, problems = data.read_pair_records(a.data)
        root = a.image_root or Path(a.data).parent
        pairs, more = dpo.encode_pairs(records, config, self.magvit, root, where=str(a.data),
                                       progress=lambda s: show(f"[data] {s}"))
        stop_or_skip(problems + more, a.data, a.skip_bad)
        if len(pairs) == 0:
            raise DataError(f"{a.data} has no usable preference pair")
        return pairs.records()

    def curated_pairs(self, r: int, model, tok) -> list[dict]:
        a = self.a
        prompts = self.curation_prompts()
        score = dpo.verifier_scorer(self.verifier(), a.judge, seed=dpo.derive_seed(a.seed, r, "judge"))
        records, stats = dpo.curate_pairs(model, tok, self.magvit, score, prompts, a.curate_samples,
                                          seed=dpo.derive_seed(a.seed, r), steps=a.gen_steps, cfg=a.gen_cfg,
                                          progress=lambda s: show(f"[round {r}] {s}"))
        print(f"[round {r}] curated {stats['pairs']} pairs from {stats['prompts']} prompts ({stats['dropped']} dropped: "
              "all images got the same label)", file=sys.stderr)
        if not records:
            raise DataError(f"curation gave no pair: for every prompt all {a.curate_samples} images got the same "
                            "label; use more --curate-samples or other prompts")
        return records

    def round_pairs(self, r: int, model, tok) -> dpo.PairData:
        """The round's pairs as token lists in round_R/pairs.jsonl: made once, read back on every (re)start."""
        path = self.round_dir(r) / "pairs.jsonl"
        if not path.is_file():
            records = self.given_pairs(model.config) if r == 1 and self.a.data else self.curated_pairs(r, model, tok)
            self.claim_out()
            data.write_jsonl(records, path)
        records, problems = data.read_pair_records(path)
        pairs, more = dpo.encode_pairs(records, model.config, None, path.parent, where=str(path))
        if problems or more:
            raise DataError(f"{path} was written by this run but no longer reads back ({(problems + more)[0]}): "
                            "delete it to make it again")
        return pairs

    def train_round(self, r: int, start: Path) -> bool:
        """Round r: pairs, policy and reference from `start`, training, the round's model. False = stopped."""
        a = self.a
        policy, tok = self.load_model(start)
        pairs = self.round_pairs(r, policy, tok)
        reference, _ = self.load_model(start)
        needs_scorer = self.cfg.reward_coef > 0
        online = data.read_prompts(a.online_prompts) if a.online_prompts else None
        trainer = dpo.Trainer(policy, reference, tok, pairs, self.cfg, round_index=r, magvit=self.magvit,
                              score=dpo.verifier_scorer(self.verifier()) if needs_scorer else None,
                              online_prompts=online)
        latest = dpo.latest_checkpoint(self.out)
        if latest is not None and latest["round"] == r:
            dpo.load_checkpoint_into(trainer, latest["dir"])
            print(f"[round {r}] resumed from {latest['dir']} at step {trainer.step}/{trainer.total}", file=sys.stderr)
        else:
            print(f"[round {r}] {len(pairs)} pairs, {trainer.total} steps of {self.cfg.batch_size}, from {start}",
                  file=sys.stderr)
        first = trainer.step
        budget = None if a.stop_after is None else a.stop_after - self.steps_run
        finished = budget is None or budget > 0
        if finished and not trainer.done():
            finished = dpo.train(trainer, save=lambda t: dpo.save_checkpoint(t, self.out, self.showo, self.phi),
                                 save_every=a.save_every, stop_after=budget, log_every=a.log_every,
                                 label=f"dpo round {r}/{a.rounds}")
        self.steps_run += trainer.step - first
        if not finished:   # dpo.train left a checkpoint when it stopped
            return False
        dpo.publish_dir(lambda d: dpo.write_showo_dir(policy, d, self.showo, self.phi), self.round_dir(r) / "model")
        for old in self.out.glob("ckpt-r*"):
            shutil.rmtree(old, ignore_errors=True)
        (self.out / dpo.LATEST).unlink(missing_ok=True)
        return True

    def claim_out(self) -> None:
        """Record the run's settings in --out before the first file of the run is written there."""
        if not (self.out / "run.json").is_file():
            data.write_json(run_settings(self.a, self.cfg), self.out / "run.json")

    def __call__(self) -> int:
        a = self.a
        guard_out(self.out, run_settings(a, self.cfg), a.resume, "DPO")
        self.steps_run = 0
        start = self.showo
        for r in range(1, a.rounds + 1):
            model_dir = self.round_dir(r) / "model"
            if not (model_dir / "pytorch_model.safetensors").is_file():
                if not self.train_round(r, start):
                    print(f"stopped after {self.steps_run} step(s) with a checkpoint in {self.out}: continue with "
                          "the same command and --resume", file=sys.stderr)
                    return 0
            start = model_dir
        for name in ("pytorch_model.safetensors", "config.json", "inference_config.yaml"):
            if (start / name).is_file():
                with data.atomic_path(self.out / name) as tmp:
                    shutil.copyfile(start / name, tmp)
        print(f"wrote {self.out} (Show-o layout): python sample.py --showo {self.out} --magvit {self.magvit_dir} "
              "--prompt ...", file=sys.stderr)
        return 0


def run_dpo(a) -> int:
    check_dpo_args(a)
    return Run(a)()


# ==========================================================================================================
# selfcorrect
# ==========================================================================================================

SELFCORRECT_DOC = """PARM++ self-correction fine-tuning of Show-o (Sec. 5).

    python train.py selfcorrect --reflect outputs/reflect/reflect.json --out outputs/selfcorrect
    python train.py selfcorrect --data groups.jsonl --out outputs/selfcorrect
    python sample.py --showo outputs/selfcorrect --parm++ --prompt "a photo of two dogs"

Show-o learns to produce the high-quality image from the prompt, the reflection reason and the low-quality
image, in PARM++'s input format: "{prompt}\\nCorrection: {reason}", then the low-quality image as a first image
segment, then the image being generated. The loss is Show-o's masked-prediction cross-entropy on that image."""


def add_selfcorrect_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("selfcorrect", help="PARM++ self-correction fine-tuning of Show-o (Sec. 5)",
                       description=SELFCORRECT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_args(p)
    g = p.add_argument_group("data (give --reflect or --data)")
    g.add_argument("--reflect", default=None,
                   help="reflect.json written by `train.py curate --task reflect` (images relative to its folder): "
                        "each 'no' image with its reason is paired with a 'yes' image of the same prompt")
    g.add_argument("--data", default=None,
                   help='JSONL self-correction groups, one {"prompt", "low", "reason", "high"} per line; low/high '
                        "are image paths (encoded with MAGVIT-v2) or lists of image tokens")
    g.add_argument("--image-root", default=None, help="folder that relative image paths in --data start from "
                                                      "(default: the folder of the --data file)")
    g.add_argument("--skip-bad", action="store_true",
                   help="drop unusable records (and say how many) instead of stopping with the list of them")
    g = add_optim_args(p, "optimisation (the paper gives none for Sec. 5: DPO's recipe, Sec. 3.3)")
    g.add_argument("--cond-dropout", type=float, default=dpo.OptimConfig.cond_dropout,
                   help="probability of dropping prompt and reason (the low-quality image stays), as Show-o's "
                        f"training drops the text (default {dpo.OptimConfig.cond_dropout})")
    add_output_args(p, "output folder: the fine-tuned Show-o (Show-o layout, for sample.py --showo OUT --parm++), "
                       "groups.jsonl (the training groups as image tokens) and the last checkpoint")
    return p


def check_selfcorrect_args(a) -> None:
    check_optim_args(a)
    if a.reflect is None and a.data is None:
        fail("give the self-correction data: --reflect REFLECT.json (written by `train.py curate --task reflect`, "
             "with --tiny too) or --data GROUPS.jsonl with {\"prompt\", \"low\", \"reason\", \"high\"} lines")
    if a.reflect is not None and a.data is not None:
        fail("--reflect and --data both name the training data: give one")
    if a.image_root is not None and a.reflect is not None:
        fail("--image-root applies to --data; the images of reflect.json are relative to its own folder")


class SelfCorrectRun:
    """One `train.py selfcorrect` invocation: groups (encoded once into OUT/groups.jsonl), training, model."""

    def __init__(self, a):
        self.a = a
        self.device, self.showo, self.phi, self.magvit_dir = resolve_run(a)
        self.cfg = dpo.OptimConfig(**optim_config(a, self.device))
        self.out = Path(a.out)

    def settings(self) -> dict:
        """What a resumed run must share with the interrupted one."""
        a, path = self.a, lambda p: str(Path(p).resolve()) if p else None
        return {"train": self.cfg.fingerprint(), "showo": path(a.showo) if not a.tiny else "tiny",
                "reflect": path(a.reflect), "data": path(a.data), "image_root": path(a.image_root),
                "skip_bad": a.skip_bad}

    def given_groups(self, config: cotgen.ShowoConfig) -> dpo.CorrectionData:
        """Read, check and encode every group before the first step (a bad record stops the run here)."""
        a = self.a
        source = a.reflect or a.data
        if a.reflect:
            reflected, problems = data.read_reflect_records(a.reflect)
            records, skipped = data.correction_groups(reflected)
            print(f"[data] {len(records)} groups from {len(reflected)} records of {a.reflect}; {len(skipped)} "
                  "prompt(s) skipped (no 'yes' or no 'no' image)", file=sys.stderr)
            root = Path(a.reflect).parent
        else:
            records, problems = data.read_correction_records(a.data)
            root = a.image_root or Path(a.data).parent
        magvit = cotgen.load_magvit(self.magvit_dir, device=self.device)
        groups, more = dpo.encode_groups(records, config, magvit, root, str(source),
                                         progress=lambda s: show(f"[data] {s}"))
        stop_or_skip(problems + more, source, a.skip_bad)
        if len(groups) == 0:
            raise DataError(f"{source} gives no self-correction group: it needs, for some prompt, a 'no' image with "
                            "its reason and a 'yes' image" if a.reflect else f"{source} has no usable group")
        return groups

    def groups(self, config: cotgen.ShowoConfig) -> dpo.CorrectionData:
        """The groups as token lists in OUT/groups.jsonl: made once, read back on every (re)start."""
        path = self.out / "groups.jsonl"
        if not path.is_file():
            groups = self.given_groups(config)
            if not (self.out / "run.json").is_file():
                data.write_json(self.settings(), self.out / "run.json")
            data.write_jsonl(groups.records(), path)
        records, problems = data.read_correction_records(path)
        groups, more = dpo.encode_groups(records, config, None, path.parent, str(path))
        if problems or more:
            raise DataError(f"{path} was written by this run but no longer reads back ({(problems + more)[0]}): "
                            "delete it to make it again")
        return groups

    def __call__(self) -> int:
        a, out = self.a, self.out
        guard_out(out, self.settings(), a.resume, "self-correction")
        if (out / "run.json").is_file() and (out / "config.json").is_file():   # config.json is written last
            print(f"{out} already holds the finished model", file=sys.stderr)
            return 0
        policy, tok = cotgen.load_showo(self.showo, self.phi, dtype=torch.float32, device=self.device)
        groups = self.groups(policy.config)
        trainer = dpo.SelfCorrectionTrainer(policy, tok, groups, self.cfg)
        latest = dpo.latest_checkpoint(out)
        if latest is not None:
            dpo.load_checkpoint_into(trainer, latest["dir"])
            print(f"[selfcorrect] resumed from {latest['dir']} at step {trainer.step}/{trainer.total}", file=sys.stderr)
        else:
            print(f"[selfcorrect] {len(groups)} groups, {trainer.total} steps of {self.cfg.batch_size}, from "
                  f"{self.showo}", file=sys.stderr)
        if not dpo.train(trainer, save=lambda t: dpo.save_checkpoint(t, out, self.showo, self.phi),
                         save_every=a.save_every, stop_after=a.stop_after, log_every=a.log_every,
                         label="selfcorrect"):
            print(f"stopped at step {trainer.step} with a checkpoint in {out}: continue with the same command and "
                  "--resume", file=sys.stderr)
            return 0
        dpo.write_showo_dir(policy, out, self.showo, self.phi)
        for old in out.glob("ckpt-r*"):
            shutil.rmtree(old, ignore_errors=True)
        (out / dpo.LATEST).unlink(missing_ok=True)
        print(f"wrote {out} (Show-o layout): python sample.py --showo {out} --magvit {self.magvit_dir} --parm++ "
              "--prompt ...", file=sys.stderr)
        return 0


def run_selfcorrect(a) -> int:
    check_selfcorrect_args(a)
    return SelfCorrectRun(a)()


# ==========================================================================================================
# curate: ranking data for the reward models (Sec. 3.2 ORM and PRM, Sec. 4 PARM, Sec. 5 PARM++)
# ==========================================================================================================

CURATE_DOC = """Ranking data for fine-tuning the reward models, in LLaVA's conversation format (Sec. 3.2, 4, 5).

    python train.py curate --task orm --num-prompts 13000 --exclude geneval/generation_prompts.txt --out data/orm
    python train.py curate --task prm --prompts data/prompts.txt --out data/prm
    python train.py curate --task parm --prompts data/prompts.txt --out data/parm
    python train.py curate --task reflect --prompts data/prompts.txt --out data/reflect [--reasons reasons.jsonl]
    python train.py curate --tiny --task orm --num-prompts 6 --samples 4 --out outputs/orm-data

Show-o generates --samples images per prompt at the start temperature --temperature, each path with its own
seed; the --verifier labels them. Writes OUT/TASK.json (a JSON list of {"id", "image", "conversations"}
records, plus prompt/label fields) and OUT/images/. Each prompt's work is saved as it finishes, so an
interrupted run continues with --resume.

  orm      each final image with the ORM question, answered by the verifier's ORM judgment.
  prm      each step's image of a path (steps 1..S) with the PRM question; label "yes" if any of --rollouts
           continuations from that step's state ends in a final image judged "yes" (Math-Shepherd style; the
           last step's label is the path's own final judgment).
  parm     clarity judgment by the paper's static rule (1-based steps of 18: steps 12-18 "yes", steps 1-9
           "no", steps 10-11 no record; other step counts scale the rule), potential assessment for steps
           12-18 as the two-turn conversation, answered by the path's final ORM label, and the ORM records of
           the final images, of which --orm-fraction (70%) is mixed in, as the released recipe mixes them.
  reflect  PARM++ reflection evaluation: "yes" images, and "no" images with the reason they fail, from the
           verifier's free text or from --reasons (JSONL {"id" or "image", "reason"})."""

CURATE_TASKS = ("orm", "prm", "parm", "reflect")
CURATE_SAMPLES = {"orm": 50, "prm": 1, "parm": 2, "reflect": 50}   # orm: the paper's ~50; prm: one path


def add_curate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("curate", help="ranking data for ORM / PRM / PARM / PARM++ (Sec. 3.2, 4, 5)",
                       description=CURATE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=CURATE_TASKS, help="which reward model's data to make")
    g = p.add_argument_group("models")
    g.add_argument("--showo", default="weights/show-o", help="Show-o checkpoint folder that generates the images")
    g.add_argument("--phi", default=None, help="folder with phi-1.5's tokenizer.json + config.json (default: the "
                                               "checkpoint's llm_model_path if it is a folder, else weights/phi-1_5)")
    g.add_argument("--magvit", default="weights/magvitv2", help="MAGVIT-v2 folder, to decode the images")
    g.add_argument("--verifier", default="weights/llava-onevision-qwen2-7b-ov",
                   help="LLaVA-OneVision folder that labels the images (default: the zero-shot 7B)")
    g.add_argument("--tiny", action="store_true", help="use the built-in tiny random checkpoints (runs in seconds)")
    g.add_argument("--cache", default=None, help="where --tiny writes its checkpoints (default ~/.cache/cotgen)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    g = p.add_argument_group("prompts (give --prompts or --num-prompts)")
    g.add_argument("--prompts", default=None, help="prompt file, one prompt per line")
    g.add_argument("--num-prompts", type=int, default=None, metavar="N",
                   help="generate N prompts from GenEval's six templates (data.training_prompts)")
    g.add_argument("--objects", default=None, help="object names for --num-prompts, one per line "
                                                   "(default: data.GENEVAL_OBJECTS)")
    g.add_argument("--colors", default=None, help="colour names for --num-prompts, one per line "
                                                  "(default: GenEval's ten colours)")
    g.add_argument("--exclude", action="append", default=[], metavar="FILE",
                   help="prompt file whose prompts are left out (GenEval's generation_prompts.txt, as the paper "
                        "filters its test prompts); may be repeated")
    g = p.add_argument_group("generation and labels")
    g.add_argument("--samples", type=int, default=None, help="paths per prompt (default: orm 50, as the paper; "
                                                             "prm 1; parm 2; reflect 50)")
    g.add_argument("--temperature", type=float, default=1.5,
                   help="start temperature of Show-o's annealed re-masking noise; higher gives more varied images "
                        "(default 1.5: the paper says 'high' and gives no value; Show-o's default is 1)")
    g.add_argument("--steps", type=int, default=18, help="decoding steps (default 18, as the paper)")
    g.add_argument("--cfg", type=float, default=1.75, help="classifier-free guidance scale (default 1.75)")
    g.add_argument("--rollouts", type=int, default=4, help="prm: continuations per step (default 4, as the paper)")
    g.add_argument("--judge", default="sample", choices=("sample", "greedy"),
                   help="how the verifier's yes/no is decided: sampled as the released code does (default), or "
                        "the most likely answer")
    g.add_argument("--judge-batch", type=int, default=16, help="images per verifier call (default 16)")
    g.add_argument("--orm-fraction", type=float, default=0.7,
                   help="parm: share of the ORM records mixed into parm.json (default 0.7, as released)")
    g.add_argument("--reasons", default=None,
                   help='reflect: JSONL {"id" or "image", "reason"} giving the reason of every "no" image, instead '
                        "of the verifier's free text")
    g.add_argument("--max-reason-tokens", type=int, default=64,
                   help="reflect: longest reason the verifier writes, in tokens (default 64)")
    g.add_argument("--seed", type=int, default=0, help="seed of every path, prompt order and mixing (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder: TASK.json, images/, and the per-prompt parts "
                                                "while the run is under way")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    return p


def check_curate_args(a) -> None:
    for flag, v in {"--samples": a.samples, "--num-prompts": a.num_prompts}.items():
        if v is not None and v < 1:
            fail(f"{flag} must be at least 1 (got {v})")
    for flag, v in {"--steps": a.steps, "--rollouts": a.rollouts, "--judge-batch": a.judge_batch,
                    "--max-reason-tokens": a.max_reason_tokens}.items():
        if v < 1:
            fail(f"{flag} must be at least 1 (got {v})")
    if a.temperature < 0:
        fail(f"--temperature must not be negative (got {a.temperature})")
    if not 0 <= a.orm_fraction <= 1:
        fail(f"--orm-fraction must be in [0, 1] (got {a.orm_fraction})")
    if (a.prompts is None) == (a.num_prompts is None):
        fail("give the prompts: --prompts FILE, or --num-prompts N to generate them from GenEval's templates "
             "(not both)")
    if a.prompts is not None and (a.objects or a.colors):
        fail("--objects and --colors build the --num-prompts prompts; with --prompts FILE leave them out")
    if a.reasons is not None and a.task != "reflect":
        fail("--reasons applies to --task reflect only")
    if a.task == "prm" and a.steps < 2:
        fail("--task prm needs --steps of at least 2: the rollouts continue from an intermediate step")


def curation_prompts(a) -> list[str]:
    """The prompts of a curate run: a file (test prompts left out) or the template generator."""
    exclude = [p for f in a.exclude for p in data.read_prompts(f)]
    if a.prompts:
        skip = {data.prompt_key(p) for p in exclude}
        prompts = [p for p in data.read_prompts(a.prompts) if data.prompt_key(p) not in skip]
        if not prompts:
            raise DataError(f"every prompt of {a.prompts} is in the --exclude list: nothing is left to curate")
        return prompts
    kw = {}
    if a.objects:
        kw["objects"] = data.read_prompts(a.objects)
    if a.colors:
        kw["colors"] = data.read_prompts(a.colors)
    return data.training_prompts(a.num_prompts, exclude=exclude, seed=a.seed, **kw)


def decode_history(model, tok, prompt: str, generators, *, steps: int, cfg: float,
                   temperature: float) -> torch.Tensor:
    """Sec. 3.1 decoding of one path per generator; returns every step's x̂0 [n, steps, N]."""
    paths = cotgen.Paths(model, tok, prompt, len(generators), steps=steps, cfg=cfg, temperature=temperature,
                         generators=generators)
    return torch.stack([step.x0 for step in paths], 1)


def prm_rollouts(model, tok, prompt: str, main_generator, rollout_generators, *, steps: int, cfg: float,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 3.2, PRM ranking data (Math-Shepherd style): decode one path, and after each step i < S branch R
    continuations from its state (`Paths.copy_state`), each with its own generator
    (`rollout_generators[i][r]`). Every continuation joins the same batch as it is made, so they all finish
    with the path. Returns the path's x̂0 at every step [S, N] and the continuations' final codes
    [S - 1, R, N] (row i: branched after step i + 1, 1-based)."""
    R = len(rollout_generators[0])
    flat = [g for per_step in rollout_generators for g in per_step]
    paths = cotgen.Paths(model, tok, prompt, 1 + len(flat), steps=steps, cfg=cfg, temperature=temperature,
                         generators=[main_generator, *flat])
    for j in range(1, paths.n):
        paths.stop(j)                                  # a continuation waits until its step is reached
    history = []
    for step in paths:
        history.append(step.x0[0])                     # path 0, the main path, is always live and first
        i = step.step[0]
        if i + 1 < steps:
            for r in range(R):
                paths.copy_state(0, 1 + i * R + r)     # copies "not stopped" too: it runs from the next step
    return torch.stack(history), paths.final_tokens()[1:].view(steps - 1, R, -1)


def prm_labels(rollout_yes: torch.Tensor, final_yes: torch.Tensor) -> torch.Tensor:
    """Sec. 3.2: step i is "yes" if any of its continuations ends in a "yes" image ([S-1, R] bool); the last
    step has no continuation, so its label is the path's own final judgment. Returns [S] bool."""
    return torch.cat((rollout_yes.any(dim=1), final_yes.reshape(1)))


def clarity_label(step: int, steps: int = 18) -> str | None:
    """Sec. 4, the static clarity rule for 1-based step `step` of `steps`: "yes" after step 11 of 18, "no"
    before step 10, no label for steps 10 and 11 (thresholds scaled by steps/18 for other step counts)."""
    if step * 18 > 11 * steps:
        return "yes"
    if step * 18 < 10 * steps:
        return "no"
    return None


def judge_codes(magvit, score, codes: torch.Tensor, prompt: str, batch: int):
    """Decode codes [k, N] and judge them with `score` (dpo.Scorer) in batches. Returns (uint8 images
    [k, H, W, 3], p_yes [k], yes [k])."""
    pics, p_yes, yes = [], [], []
    for s in range(0, codes.shape[0], batch):
        with torch.inference_mode():
            images = magvit.decode_code(codes[s:s + batch])
        p, y = score(images, [prompt] * images.shape[0])
        pics.append(data.to_uint8_image(images))
        p_yes.append(torch.as_tensor(p, dtype=torch.float32).cpu())
        yes.append(torch.as_tensor(y, dtype=torch.bool).cpu())
    return np.concatenate(pics), torch.cat(p_yes), torch.cat(yes)


def strip_no(text: str) -> str:
    """The reason in a reflection answer: a leading "no" (and the punctuation after it) is dropped."""
    return re.sub(r"^\s*no\b[\s.,:;!-]*", "", text, flags=re.IGNORECASE).strip()


class Curate:
    """One `train.py curate` invocation. Prompt j's records and images are made by `prompt_records` from seeds
    that depend only on (--seed, j), saved under OUT/.parts/, and gathered into OUT/TASK.json at the end."""

    def __init__(self, a, model, tok, magvit, verifier, score_for):
        self.a, self.model, self.tok, self.magvit, self.verifier = a, model, tok, magvit, verifier
        self.score_for = score_for          # prompt index -> dpo.Scorer (seeded per prompt)
        self.out = Path(a.out)
        self.samples = a.samples or CURATE_SAMPLES[a.task]
        self.device = model.embed_tokens.weight.device

    def gen(self, j: int, *parts) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(dpo.derive_seed(self.a.seed, j, *parts))

    def prompt_records(self, j: int, prompt: str) -> tuple[list[dict], dict[str, np.ndarray]]:
        """Prompt j's records (LLaVA format plus prompt/label/task fields) and images {relative path: uint8}."""
        a, K, S = self.a, self.samples, self.a.steps
        kw = dict(steps=S, cfg=a.cfg, temperature=a.temperature)
        score = self.score_for(j)
        name = lambda k, step=None: f"images/p{j:06d}/k{k:02d}" + ("" if step is None else f"-s{step:02d}") + ".png"
        rid = lambda task, k, step=None: f"{task}-p{j:06d}-k{k:02d}" + ("" if step is None else f"-s{step:02d}")
        records, images = [], {}
        if a.task == "prm":
            for k in range(K):
                rollout_gens = [[self.gen(j, k, "rollout", i, r) for r in range(a.rollouts)] for i in range(S - 1)]
                history, finals = prm_rollouts(self.model, self.tok, prompt, self.gen(j, k), rollout_gens, **kw)
                _, _, roll_yes = judge_codes(self.magvit, score, finals.flatten(0, 1), prompt, a.judge_batch)
                _, _, final_yes = judge_codes(self.magvit, score, history[-1:], prompt, a.judge_batch)
                labels = prm_labels(roll_yes.view(S - 1, a.rollouts), final_yes)
                pics = sample.decode_images(self.magvit, history)
                for i in range(S):
                    label = "yes" if labels[i] else "no"
                    images[name(k, i + 1)] = pics[i]
                    records.append(data.llava_record(rid("prm", k, i + 1), name(k, i + 1),
                                                     [verifiers.prm_question(prompt), label], prompt=prompt,
                                                     label=label, task="prm", step=i + 1))
            return records, images
        history = decode_history(self.model, self.tok, prompt, [self.gen(j, k) for k in range(K)], **kw)
        pics, p_yes, yes = judge_codes(self.magvit, score, history[:, -1], prompt, a.judge_batch)
        reasons = [None] * K
        if a.task == "reflect" and a.reasons is None and not bool(yes.all()):
            no = [k for k in range(K) if not yes[k]]
            texts = self.verifier.reflect([pics[k] for k in no], [prompt] * len(no), a.max_reason_tokens)
            for k, t in zip(no, texts):
                reasons[k] = strip_no(t)
        for k in range(K):
            label = "yes" if yes[k] else "no"
            final = name(k, S) if a.task == "parm" else name(k)
            images[final] = pics[k]
            if a.task in ("orm", "parm"):
                records.append(data.llava_record(rid("orm", k), final, [verifiers.orm_question(prompt), label],
                                                 prompt=prompt, label=label, task="orm", p_yes=round(float(p_yes[k]), 6)))
            if a.task == "reflect":
                records.append(data.llava_record(rid("reflect", k), final, [verifiers.reflection_question(prompt), label],
                                                 prompt=prompt, label=label, reason=reasons[k], task="reflect"))
            if a.task != "parm":
                continue
            labelled = [(i, clarity_label(i, S)) for i in range(1, S + 1) if clarity_label(i, S)]
            earlier = [i for i, _ in labelled if i < S]     # the last step's image is the final one, saved above
            if earlier:
                for i, pic in zip(earlier, sample.decode_images(self.magvit, history[k, [i - 1 for i in earlier]])):
                    images[name(k, i)] = pic
            for i, clear in labelled:
                records.append(data.llava_record(rid("clarity", k, i), name(k, i),
                                                 [verifiers.clarity_question(prompt), clear], prompt=prompt,
                                                 label=clear, task="clarity", step=i))
                if clear == "yes":     # potential assessment follows a clear step, answered by the final label
                    records.append(data.llava_record(rid("potential", k, i), name(k, i),
                                                     [*verifiers.potential_question(prompt), label], prompt=prompt,
                                                     label=label, task="potential", step=i))
        return records, images

    def finish(self, records: list[dict]) -> list[dict]:
        """The whole run's records as TASK.json holds them: parm mixes in --orm-fraction of its ORM records
        (ceil, seeded); reflect attaches the reasons and writes each answer."""
        a = self.a
        if a.task == "parm":
            orm = [r for r in records if r["task"] == "orm"]
            g = torch.Generator().manual_seed(dpo.derive_seed(a.seed, "mix"))
            keep = set(torch.randperm(len(orm), generator=g)[:math.ceil(a.orm_fraction * len(orm))].tolist())
            kept = {id(r) for n, r in enumerate(orm) if n in keep}
            return [r for r in records if r["task"] != "orm" or id(r) in kept]
        if a.task != "reflect":
            return records
        given = data.read_reasons(a.reasons) if a.reasons else {}
        missing, out, dropped = [], [], 0
        for r in records:
            if r["label"] == "no" and a.reasons:
                r["reason"] = given.get(r["id"], given.get(r["image"]))
                if r["reason"] is None:
                    missing.append(r["id"])
                    continue
            if r["label"] == "no" and not r["reason"]:
                dropped += 1            # the verifier wrote nothing but "no": there is no reason to learn
                continue
            r["conversations"][1]["value"] = "yes" if r["label"] == "yes" else f"no. {r['reason']}"
            out.append(r)
        if missing:
            raise DataError(f"{a.reasons} has no reason for {len(missing)} \"no\" image(s): {', '.join(missing[:10])}"
                            f"{' ...' if len(missing) > 10 else ''}; add lines {{\"id\": ..., \"reason\": ...}} for them "
                            "and run again with --resume")
        if dropped:
            print(f"[curate reflect] dropped {dropped} \"no\" image(s) whose reflection gave no reason", file=sys.stderr)
        return out

    def __call__(self, prompts: list[str]) -> Path:
        a, parts = self.a, self.out / ".parts"
        t0, made = time.time(), 0
        for j, prompt in enumerate(prompts):
            part = parts / f"p{j:06d}.json"
            if part.is_file():
                continue
            records, images = self.prompt_records(j, prompt)
            for rel, pic in images.items():
                data.save_png(pic, self.out / rel)
            data.write_json(records, part, indent=None)     # last: a prompt counts as done once this exists
            made += 1
            rate = (time.time() - t0) / made
            show(f"[curate {a.task}] prompt {j + 1}/{len(prompts)}  {len(records)} records  {rate:.1f}s/prompt  "
                 f"eta {rate * (len(prompts) - j - 1) / 60:.1f}min", final=j + 1 == len(prompts))
        records = [r for j in range(len(prompts)) for r in json.loads((parts / f"p{j:06d}.json").read_text())]
        records = self.finish(records)
        target = self.out / f"{a.task}.json"
        data.write_json(records, target, indent=1)
        shutil.rmtree(parts, ignore_errors=True)
        counts = {}
        for r in records:
            counts[r["task"], r["label"]] = counts.get((r["task"], r["label"]), 0) + 1
        summary = ", ".join(f"{t} {l} {n}" for (t, l), n in sorted(counts.items()))
        print(f"[curate {a.task}] wrote {target}: {len(records)} records from {len(prompts)} prompts ({summary})",
              file=sys.stderr)
        return target


def curate_settings(a) -> dict:
    """What a resumed curate run must share with the interrupted one."""
    path = lambda p: str(Path(p).resolve()) if p else None
    keys = ("task", "num_prompts", "samples", "temperature", "steps", "cfg", "rollouts", "judge", "orm_fraction",
            "seed", "max_reason_tokens")
    return {**{k: getattr(a, k) for k in keys}, "prompts": path(a.prompts), "objects": path(a.objects),
            "colors": path(a.colors), "exclude": [path(e) for e in a.exclude], "reasons_file": a.reasons is not None,
            "models": "tiny" if a.tiny else [path(a.showo), path(a.verifier)]}


def run_curate(a) -> int:
    check_curate_args(a)
    out = Path(a.out)
    guard_out(out, curate_settings(a), a.resume, "curate")
    if (out / f"{a.task}.json").is_file():
        print(f"{out / (a.task + '.json')} is already complete", file=sys.stderr)
        return 0
    prompts = curation_prompts(a)
    device, showo, phi, magvit_dir = resolve_run(a)
    verifier_dir = data.tiny_checkpoints(a.cache)["llava"] if a.tiny else Path(a.verifier)
    if not verifier_dir.is_dir():
        fail(f"verifier folder {verifier_dir} not found: pass --verifier DIR (a LLaVA-OneVision checkpoint) or --tiny")
    model, tok = cotgen.load_showo(showo, phi, dtype=torch.float32, device=device)
    magvit = cotgen.load_magvit(magvit_dir, device=device)
    verifier = verifiers.load_verifier(verifier_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                       device=device)
    data.write_json(curate_settings(a), out / "run.json")
    print(f"[curate {a.task}] {len(prompts)} prompts, {a.samples or CURATE_SAMPLES[a.task]} paths each, labelled "
          f"by {verifier_dir}", file=sys.stderr)
    score_for = lambda j: dpo.verifier_scorer(verifier, a.judge, seed=dpo.derive_seed(a.seed, j, "judge"))
    Curate(a, model, tok, magvit, verifier, score_for)(prompts)
    return 0


# ==========================================================================================================
# orm, parm: supervised fine-tuning of the LLaVA-OneVision reward model (Sec. 3.2, 4, 5)
# ==========================================================================================================

SFT_DOC = """Fine-tune LLaVA-OneVision as a reward model on curated conversations (the released LLaVA-NeXT recipe).

    python train.py orm --data data/orm/orm.json --base weights/llava-onevision-qwen2-7b-ov --out weights/orm_ft
    python train.py parm --data data/parm/parm.json --out weights/parm            # PARM (Sec. 4)
    python train.py parm --data data/parm/parm.json --data data/reflect/reflect.json --out weights/parm++
    python train.py orm --tiny --data outputs/orm-data/orm.json --out outputs/orm_ft
    python sample.py --parm --verifier weights/parm --prompt "a photo of two dogs"

Loss: next-token cross-entropy on the assistant turns (--labels). AdamW, lr 1e-5 (2e-6 for the SigLIP tower),
no weight decay, cosine schedule with 3% warm-up, gradient clipping at 1.0, one epoch. The released run used
8 GPUs x 8 = 64 records per step; the paper text says batch 8. --out receives the model in the lmms-lab layout
(bf16), which `--verifier OUT` loads; checkpoints keep fp32 weights, so --resume continues exactly."""


def add_sft_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    d = verifiers.SFTConfig()
    p = sub.add_parser(name, help=help_text, description=SFT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--base", default="weights/llava-onevision-qwen2-7b-ov",
                   help="lmms-lab LLaVA-OneVision folder to fine-tune (default: the paper's 7B base)")
    g.add_argument("--tiny", action="store_true", help="fine-tune the built-in tiny random LLaVA-OneVision")
    g.add_argument("--cache", default=None, help="where --tiny writes its checkpoints (default ~/.cache/cotgen)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="bf16 = bf16 autocast with fp32 master weights; auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each SigLIP and Qwen2 layer in the backward pass (less memory, same numbers)")
    g.add_argument("--save-dtype", default="bf16", choices=("bf16", "fp32"),
                   help="dtype of the saved model (default bf16, as the released checkpoints)")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="LLaVA conversation JSON (or JSONL) written by `train.py curate`; repeat to mix files")
    g.add_argument("--image-root", default=None,
                   help="folder that relative image paths start from (default: each data file's folder)")
    g.add_argument("--fraction", type=float, default=1.0,
                   help="use this share of the records, a seeded random subset (the released ORM run used 0.5 of "
                        "its orm.json; default 1)")
    g.add_argument("--labels", default=d.label_rule, choices=("released", "answer"),
                   help="which tokens carry the loss: 'released' = every assistant-turn token plus each newline, "
                        "<|im_start|> and <|im_end|> (LLaVA-NeXT's rule, default); 'answer' = the answers and "
                        "their closing <|im_end|> only")
    g.add_argument("--skip-bad", action="store_true",
                   help="drop unusable records (and say how many) instead of stopping with the list of them")
    g = p.add_argument_group("optimisation (defaults: the released orm_ft / parm runs)")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW lr of the LM and projector (default {d.lr})")
    g.add_argument("--vision-lr", type=float, default=d.vision_lr,
                   help=f"AdamW lr of the SigLIP tower (default {d.vision_lr})")
    g.add_argument("--freeze-vision", action="store_true", help="keep the SigLIP tower fixed")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"records per step (default {d.batch_size})")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help=f"linear warm-up over this fraction of the steps, then cosine to 0 (default {d.warmup_ratio})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"clip the gradient norm to this (default {d.max_grad_norm}; 0 = no clipping)")
    g.add_argument("--max-steps", type=int, default=None, help="cap the optimizer steps (the schedule spans the cap)")
    g.add_argument("--no-shuffle", action="store_true", help="keep file order (default: a new order every epoch)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of the data order and subset (default {d.seed})")
    add_output_args(p, "output folder: the fine-tuned verifier (lmms-lab layout, for --verifier OUT) and the last "
                       "checkpoint while training")
    return p


def add_orm_parser(sub) -> argparse.ArgumentParser:
    return add_sft_parser(sub, "orm", "fine-tune the ORM (or PRM) on curated yes/no data (Sec. 3.2)")


def add_parm_parser(sub) -> argparse.ArgumentParser:
    return add_sft_parser(sub, "parm", "fine-tune PARM, or PARM++ with reflect.json added (Sec. 4, 5)")


def check_sft_args(a) -> None:
    check_optim_args(argparse.Namespace(**vars(a), cond_dropout=0.0))    # Show-o's --cond-dropout is not a flag here
    if a.vision_lr <= 0:
        fail(f"--vision-lr must be positive (got {a.vision_lr})")
    if a.max_grad_norm < 0 or a.weight_decay < 0:
        fail("--max-grad-norm and --weight-decay must not be negative")
    if not 0 < a.fraction <= 1:
        fail(f"--fraction must be in (0, 1] (got {a.fraction})")


def sft_examples(a, tokenizer, cfg) -> verifiers.SFTData:
    """Every --data file read, checked and tokenised before the first step (bad records stop the run here),
    then the seeded --fraction subset."""
    V = verifiers
    records, problems = [], []
    for f in a.data:
        good, bad = data.read_conversations(f, a.image_root)
        records += good
        problems += bad
    examples, more = verifiers.encode_conversations(tokenizer, records, cfg.label_rule)
    stop_or_skip(problems + more, ", ".join(a.data), a.skip_bad)
    if len(examples) == 0:
        raise DataError(f"{', '.join(a.data)} hold no usable training conversation")
    if a.fraction < 1:
        g = torch.Generator().manual_seed(dpo.derive_seed(a.seed, "fraction"))
        keep = sorted(torch.randperm(len(examples), generator=g)[:math.ceil(a.fraction * len(examples))].tolist())
        examples = verifiers.SFTData(*([getattr(examples, f)[i] for i in keep] for f in ("ids", "labels", "images", "source")))
    return examples


def run_sft(a, task: str) -> int:
    """`train.py orm` / `train.py parm`: the fine-tune, checkpoints, resume, and the saved verifier."""
    from safetensors.torch import load_file

    check_sft_args(a)
    try:
        device = data.parse_device(a.device)
    except ValueError as e:
        fail(str(e))
    base = data.tiny_checkpoints(a.cache)["llava"] if a.tiny else Path(a.base)
    if not base.is_dir():
        fail(f"base model folder {base} not found: download lmms-lab/llava-onevision-qwen2-7b-ov (or -0.5b-ov) there, "
             "pass --base DIR, or use --tiny")
    cfg = verifiers.SFTConfig(lr=a.lr, vision_lr=a.vision_lr, freeze_vision=a.freeze_vision, batch_size=a.batch_size,
                      epochs=a.epochs, warmup_ratio=a.warmup_ratio, weight_decay=a.weight_decay,
                      max_grad_norm=a.max_grad_norm or None, max_steps=a.max_steps, shuffle=not a.no_shuffle,
                      seed=a.seed, label_rule=a.labels, gradient_checkpointing=a.gradient_checkpointing,
                      bf16=a.precision == "bf16" or (a.precision == "auto" and device.type == "cuda"))
    out = Path(a.out)
    path = lambda p: str(Path(p).resolve()) if p else None
    settings = {"task": task, "train": cfg.fingerprint(), "base": "tiny" if a.tiny else path(base),
                "data": [path(f) for f in a.data], "image_root": path(a.image_root), "fraction": a.fraction,
                "skip_bad": a.skip_bad}
    guard_out(out, settings, a.resume, task)
    if (out / "run.json").is_file() and (out / "config.json").is_file():    # config.json is written last
        print(f"{out} already holds the finished verifier", file=sys.stderr)
        return 0
    latest = dpo.latest_checkpoint(out)
    start = latest["dir"] if latest is not None else base
    verifier = verifiers.load_verifier(start, dtype=torch.float32, device=device)    # fp32 master weights
    examples = sft_examples(a, verifier.tokenizer, cfg)
    if not (out / "run.json").is_file():
        data.write_json(settings, out / "run.json")
    trainer = verifiers.VerifierTrainer(verifier, examples, cfg)
    if latest is not None:
        trainer.load_state(load_file(latest["dir"] / "optimizer.safetensors", device="cpu"),
                           data.read_config(latest["dir"], "trainer.json"))
        print(f"[{task}] resumed from {latest['dir']} at step {trainer.step}/{trainer.total}", file=sys.stderr)
    else:
        print(f"[{task}] {len(examples)} conversations, {trainer.total} steps of {cfg.batch_size}, from {base}",
              file=sys.stderr)
    save = lambda t: dpo.save_checkpoint(t, out, None, None, write_model=lambda d: verifiers.save_verifier(
        t.policy, verifier.tokenizer, d, base, dtype=torch.float32))
    if not dpo.train(trainer, save=save, save_every=a.save_every, stop_after=a.stop_after, log_every=a.log_every,
                     label=task):
        print(f"stopped at step {trainer.step} with a checkpoint in {out}: continue with the same command and "
              "--resume", file=sys.stderr)
        return 0
    verifiers.set_gradient_checkpointing(trainer.policy, False)
    verifiers.save_verifier(trainer.policy, verifier.tokenizer, out, base,
                    dtype=torch.bfloat16 if a.save_dtype == "bf16" else torch.float32)
    for old in out.glob("ckpt-r*"):
        shutil.rmtree(old, ignore_errors=True)
    (out / dpo.LATEST).unlink(missing_ok=True)
    print(f"wrote {out} (lmms-lab layout): python sample.py --parm --verifier {out} --prompt ...", file=sys.stderr)
    return 0


def run_orm(a) -> int:
    return run_sft(a, "orm")


def run_parm(a) -> int:
    return run_sft(a, "parm")


# ==========================================================================================================
# the command line
# ==========================================================================================================

# one entry per subcommand: (adds its parser, runs it)
COMMANDS = {"dpo": (add_dpo_parser, run_dpo), "selfcorrect": (add_selfcorrect_parser, run_selfcorrect)}
COMMANDS.update({"curate": (add_curate_parser, run_curate), "orm": (add_orm_parser, run_orm),
                 "parm": (add_parm_parser, run_parm)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (DataError, CheckpointError) as e:
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
