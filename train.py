"""Post-training commands of the paper. One subcommand per method:

    python train.py dpo --tiny --geneval 24 --out outputs/dpo             # curate pairs with the verifier, then DPO
    python train.py dpo --data pairs.jsonl --out outputs/dpo              # DPO on given pairs (Sec. 3.3)
    python train.py dpo --data pairs.jsonl --rounds 2 --verifier DIR ...  # iterative DPO (Sec. 3.3)
    python train.py dpo --data pairs.jsonl --reward-coef 0.1 --verifier DIR ...   # reward-model guidance (Sec. 3.4)

The trained generator is written to --out in Show-o's own layout; `python sample.py --showo OUT` samples it.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

import cotgen
import data
import dpo
import sample
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
# dpo
# ==========================================================================================================


def add_dpo_parser(sub) -> argparse.ArgumentParser:
    d = dpo.TrainConfig()
    p = sub.add_parser("dpo", help="DPO, iterative DPO and DPO with reward-model guidance (Sec. 3.3, 3.4)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--showo", default="weights/show-o", help="Show-o checkpoint folder to start from (showlab/show-o)")
    g.add_argument("--phi", default=None, help="folder with phi-1.5's tokenizer.json + config.json (default: the "
                                               "checkpoint's llm_model_path if it is a folder, else weights/phi-1_5)")
    g.add_argument("--magvit", default="weights/magvitv2", help="MAGVIT-v2 folder, to encode and decode images")
    g.add_argument("--verifier", default=None,
                   help="LLaVA-OneVision yes/no reward model folder (the paper's fine-tuned ORM); needed to curate "
                        "pairs, for --rounds > 1 and for --reward-coef")
    g.add_argument("--tiny", action="store_true", help="use the built-in tiny random checkpoints (runs in seconds)")
    g.add_argument("--cache", default=None, help="where --tiny writes its checkpoints (default ~/.cache/cotgen)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="bf16 = bf16 autocast with fp32 master weights; auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in the backward pass (less memory, same numbers)")

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

    g = p.add_argument_group("optimisation (defaults: Sec. 3.3 and the released dpo.yaml)")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"pairs per step (default {d.batch_size})")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs per round (default {d.epochs})")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help=f"linear warm-up over this fraction of the steps, then cosine to 0 (default {d.warmup_ratio})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay, biases excluded (default {d.weight_decay})")
    g.add_argument("--max-steps", type=int, default=None, help="cap the optimizer steps of each round (the schedule "
                                                                "spans the cap)")
    g.add_argument("--shuffle", action="store_true", help="shuffle pairs every epoch (the released run keeps file order)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of every random draw (default {d.seed})")

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

    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--out", required=True, help="output folder: the final model (Show-o layout), round_R/ with each "
                                                "round's pairs and model, and the last checkpoint")
    g.add_argument("--save-every", type=int, default=100, help="write a resumable checkpoint every N steps (default 100)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop with a checkpoint after N steps of this invocation (split a long run into jobs)")
    g.add_argument("--log-every", type=int, default=1, help="progress line every N steps (default 1)")
    return p


def check_dpo_args(a) -> None:
    positive = {"--batch-size": a.batch_size, "--epochs": a.epochs, "--rounds": a.rounds, "--save-every": a.save_every,
                "--log-every": a.log_every, "--curate-samples": a.curate_samples, "--gen-steps": a.gen_steps,
                "--online-per-step": a.online_per_step}
    for flag, v in positive.items():
        if v < 1:
            fail(f"{flag} must be at least 1 (got {v})")
    for flag, v in {"--max-steps": a.max_steps, "--stop-after": a.stop_after, "--geneval": a.geneval}.items():
        if v is not None and v < 1:
            fail(f"{flag} must be at least 1 (got {v})")
    if a.lr <= 0 or a.beta <= 0:
        fail("--lr and --beta must be positive")
    if not 0 <= a.warmup_ratio < 1 or not 0 <= a.cond_dropout <= 1:
        fail("--warmup-ratio must be in [0, 1) and --cond-dropout in [0, 1]")
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
    bf16 = a.precision == "bf16" or (a.precision == "auto" and device.type == "cuda")
    return dpo.TrainConfig(lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, warmup_ratio=a.warmup_ratio,
                           weight_decay=a.weight_decay, max_steps=a.max_steps, shuffle=a.shuffle, seed=a.seed,
                           beta=a.beta, sft_coef=a.sft_coef, shared_mask=a.shared_mask, cond_dropout=a.cond_dropout,
                           reward_coef=a.reward_coef, online_per_step=a.online_per_step,
                           online_samples=a.online_samples, gen_steps=a.gen_steps, gen_cfg=a.gen_cfg, bf16=bf16,
                           gradient_checkpointing=a.gradient_checkpointing)


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
        try:
            self.device = data.parse_device(a.device)
        except ValueError as e:
            fail(str(e))
        self.cfg = train_config(a, self.device)
        self.showo, phi, self.magvit_dir = sample.resolve_weights(a)
        self.phi = cotgen.resolve_phi_dir(self.showo, phi)
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
        problems += more
        if problems and not a.skip_bad:
            listed = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
            raise DataError(f"{len(problems)} unusable record(s) in {a.data}:\n  {listed}\n"
                            "Fix them, or pass --skip-bad to train on the others.")
        if problems:
            print(f"skipped {len(problems)} bad record(s) of {a.data} (--skip-bad); first: {problems[0]}",
                  file=sys.stderr)
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
        if (self.out / "run.json").is_file():
            if not a.resume:
                fail(f"{self.out} already holds a DPO run: pass --resume to continue it, or choose another --out")
            settings, before = run_settings(a, self.cfg), data.read_config(self.out, "run.json")
            diff = sorted(k for k in settings if settings[k] != before.get(k))
            if diff:
                fail(f"--resume with other settings than the run in {self.out} ({', '.join(diff)} differ): "
                     "use the same flags, or another --out")
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
# the command line
# ==========================================================================================================

# one entry per subcommand: (adds its parser, runs it)
COMMANDS = {"dpo": (add_dpo_parser, run_dpo)}


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
