"""Many processes (README: Many GPUs), on the CPU with gloo. One torchrun job of 2 processes runs DPO, the
verifier's fine-tune (replicated, as DDP, and sharded with FSDP2), runs stopped and resumed, sample.py --prompts
and curate; each result is compared with the same command in this single process.

A batch of 4 on 2 processes is two shares of 2: the weights must equal, bit for bit, those of one process that
takes the batch in passes of 2 (--micro-batch 2), so each process computes its share as one process computes that
pass and the gradients are summed once (FSDP2's SFT to 1e-6: its clipping norm is summed shard by shard). That
the passes get the batch's draws and are normalised over the whole batch, so that a batch taken in parts has
the gradient of the whole batch, is checked in this process to 1e-6, step by step. The weights after several
steps of two orders of summation are not compared, because AdamW turns rounding noise into a full lr-sized
step for any weight whose exact gradient is 0 (Show-o's k_layernorm.bias: softmax ignores a shift shared by every
key), so those weights differ by ~lr whatever the implementation."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.run import get_args_parser

import data
import sample
import train
import verifiers as V
from conftest import fresh_showo as fresh
from test_dpo import brightness_scorer, random_pairs, write_token_pairs
from test_verifier_sft import examples_of, write_orm_data

WORKER = Path(__file__).resolve().parent / "_distributed_worker.py"
PROMPTS = ["a photo of a red apple", "a photo of two dogs", "a photo of a cat left of a bench"]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_weights(a: Path, b: Path, name: str) -> bool:
    x, y = load_file(a / name), load_file(b / name)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def job(tiny, tmp_path_factory):
    """The inputs, then every command line under `torchrun --nproc_per_node 2`, in one job. Returns (folder,
    the command lines by name, the job's stderr)."""
    tmp = tmp_path_factory.mktemp("distributed")
    write_token_pairs(tmp / "pairs.jsonl", random_pairs(8, seed=5))
    write_orm_data(tmp, n=8)
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    models = ["--tiny", "--cache", str(tiny["llava"].parents[1]), "--device", "cpu"]
    steps = [*models, "--batch-size", "4", "--lr", "1e-3", "--epochs", "2", "--log-every", "100"]
    lines = {"dpo": ["dpo", *steps, "--data", str(tmp / "pairs.jsonl"), "--shuffle"],
             "orm": ["orm", *steps, "--data", str(tmp / "orm.json"), "--save-dtype", "fp32"],
             "sample": ["sample", *models, "--prompts", str(tmp / "prompts.txt"), "--orm", "--n", "2", "--steps", "3",
                        "--samples", "2", "--judge", "sample"],
             "curate": ["curate", "--task", "orm", *models, "--prompts", str(tmp / "prompts.txt"), "--samples", "2",
                        "--steps", "3"]}
    k2 = tmp / "k2"
    run = [lines["dpo"] + ["--out", str(k2 / "dpo")],
           lines["dpo"] + ["--out", str(k2 / "dpo_resumed"), "--stop-after", "1"],
           lines["dpo"] + ["--out", str(k2 / "dpo_resumed"), "--resume"],
           lines["dpo"] + ["--out", str(k2 / "dpo_half"), "--stop-after", "2"],      # resumed by one process below
           lines["dpo"] + ["--out", str(k2 / "dpo_fsdp"), "--fsdp"],
           lines["orm"] + ["--out", str(k2 / "orm")],
           lines["orm"] + ["--out", str(k2 / "fsdp"), "--fsdp"],
           lines["orm"] + ["--out", str(k2 / "fsdp_resumed"), "--fsdp", "--stop-after", "1"],
           lines["orm"] + ["--out", str(k2 / "fsdp_resumed"), "--fsdp", "--resume"],
           lines["sample"] + ["--out", str(k2 / "sample")],
           lines["curate"] + ["--out", str(k2 / "curate")]]
    (tmp / "commands.json").write_text(json.dumps(run))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(tmp / "commands.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return tmp, lines, done.stderr


def one(lines: dict, name: str, out: Path, *more: str) -> None:
    """The command line `name` in this single process."""
    argv = lines[name][1:] if name == "sample" else lines[name]
    assert (sample.main if name == "sample" else train.main)([*argv, "--out", str(out), *more]) == 0


def test_dpo_on_two_processes_equals_one_process_and_resumes_exactly(job):
    tmp, lines, err = job
    one(lines, "dpo", tmp / "k1" / "dpo", "--micro-batch", "2")
    weights = "pytorch_model.safetensors"
    assert same_weights(tmp / "k1" / "dpo", tmp / "k2" / "dpo", weights)
    # stopped after step 1 and resumed, under 2 processes: the uninterrupted run's weights
    assert same_weights(tmp / "k2" / "dpo", tmp / "k2" / "dpo_resumed", weights)
    # stopped under 2 processes, resumed by 1 (another number of processes): the checkpoint holds whole tensors
    assert json.loads((tmp / "k2" / "dpo_half" / "latest.json").read_text())["step"] == 2
    one(lines, "dpo", tmp / "k2" / "dpo_half", "--micro-batch", "2", "--resume")
    assert same_weights(tmp / "k2" / "dpo", tmp / "k2" / "dpo_half", weights)
    # Show-o sharded with FSDP2 (no gradient clipping in DPO, so nothing rounds differently)
    assert same_weights(tmp / "k2" / "dpo", tmp / "k2" / "dpo_fsdp", weights)
    # only the first process prints the progress line; it says how many processes there are
    finished = 3                                    # dpo, dpo_resumed, dpo_fsdp: one line each, not one per process
    assert err.count("[dpo round 1/1] step 4/4") == finished and "on 2 processes" in err


def test_verifier_sft_replicated_and_fsdp2_equal_one_process(job):
    tmp, lines, _ = job
    one(lines, "orm", tmp / "k1" / "orm", "--micro-batch", "2")
    weights = "model.safetensors"
    assert same_weights(tmp / "k1" / "orm", tmp / "k2" / "orm", weights)
    # FSDP2: the gradient norm that clipping divides by is summed shard by shard, so it may round differently
    want, got = load_file(tmp / "k1" / "orm" / weights), load_file(tmp / "k2" / "fsdp" / weights)
    assert got.keys() == want.keys() and max((got[k] - want[k]).abs().max().item() for k in want) < 1e-6
    # a sharded run stopped and resumed (AdamW's moments gathered, then sharded again) ends where it would have
    assert same_weights(tmp / "k2" / "fsdp", tmp / "k2" / "fsdp_resumed", weights)
    assert not list((tmp / "k2" / "fsdp_resumed").glob("ckpt-*"))


def test_sample_prompts_and_curate_write_the_single_process_files(job):
    tmp, lines, _ = job
    for name in ("sample", "curate"):
        one(lines, name, tmp / "k1" / name)
        got, want = tree(tmp / "k2" / name), tree(tmp / "k1" / name)
        assert got.keys() == want.keys() and got == want, name
    assert len([k for k in want if k.endswith(".png")]) == 6 and not (tmp / "k2" / ".sample.parts").exists()


def test_a_batch_taken_in_parts_has_the_whole_batch_gradient(tiny, showo, magvit, tmp_path):
    """One step of DPO (with the SFT term and reward-model guidance) and of the verifier's SFT, the batch of 4
    in one pass and in passes of 1: the same loss, stats and gradients (to rounding)."""
    _, tok = showo
    pairs = random_pairs(4)
    examples = examples_of(write_orm_data(tmp_path, n=4), V.load_verifier(tiny["llava"]).tokenizer)
    cfg = dict(lr=1e-3, batch_size=4, reward_coef=0.5, sft_coef=0.5, online_per_step=1, online_samples=3,
               gen_steps=2, warmup_ratio=0)
    reference = fresh(tiny)

    def dpo_step(micro):
        policy, c = fresh(tiny), train.TrainConfig(**cfg, micro_batch=micro)
        objective = train.dpo_objective(policy, reference, tok, pairs, c, magvit=magvit, score=brightness_scorer)
        trainer = train.Trainer(policy, objective, pairs.source, c)
        return trainer.train_step(), [p.grad for p in policy.parameters()]

    def sft_step(micro):
        verifier = V.load_verifier(tiny["llava"])
        c = train.TrainConfig.preset("sft", batch_size=4, micro_batch=micro)
        trainer = train.sft_trainer(verifier, examples, c)
        return trainer.train_step(), [p.grad for p in verifier.model.parameters() if p.requires_grad]

    for step in (dpo_step, sft_step):
        (whole, g_whole), (parts, g_parts) = step(None), step(1)
        assert whole.keys() == parts.keys() and ("online_dpo" in whole or step is sft_step)
        for k in whole:
            assert whole[k] == pytest.approx(parts[k], rel=1e-5, abs=1e-6), (step.__name__, k)
        for a, b in zip(g_whole, g_parts):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the batch's token count that a share's mean divides by is the one sft_loss counts in the whole batch
    v = V.load_verifier(tiny["llava"])
    pixels = v.pixels([data.load_image(p) for p in examples.images])
    assert V.sft_token_count(examples.ids, examples.labels) == V.sft_loss(v.model, pixels, examples.ids,
                                                                          examples.labels)[1]["tokens"]


def test_shares_of_a_batch(tiny, monkeypatch):
    """Process r of K takes rows [B·r/K, B·(r+1)/K) in passes of at most --micro-batch; under FSDP a process with
    no row in a short batch still passes row 0 with weight 0 (FSDP's collectives need every process)."""
    pairs = random_pairs(4)
    cfg = train.TrainConfig(batch_size=4, micro_batch=2)
    trainer = train.Trainer(fresh(tiny), lambda *a: None, pairs.source, cfg)
    for rank, want in ((0, [(slice(0, 1), 1)]), (1, [(slice(1, 3), 1)]), (2, [(slice(3, 5), 1)])):
        monkeypatch.setattr(sample, "world", lambda r=rank: (r, 3))
        assert trainer.parts(5) == want
    monkeypatch.setattr(sample, "world", lambda: (0, 3))        # a batch of 2: rows [0, 0), [0, 1), [1, 2)
    assert trainer.parts(2) == []
    trainer.skeleton = object()                     # as under FSDP
    assert trainer.parts(2) == [(slice(0, 1), 0)]


def test_sample_resume_makes_only_the_unfinished_prompts(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = ["--tiny", "--cache", str(tiny["llava"].parents[1]), "--device", "cpu", "--prompts",
            str(tmp_path / "prompts.txt"), "--steps", "2", "--samples", "1"]
    assert sample.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    real, made = sample.run_one, []

    def stop_at_the_third(args, model, tok, magvit, judge, prompt, *rest):
        if prompt == PROMPTS[2] and "resumed" not in made:
            raise KeyboardInterrupt
        made.append(prompt)
        return real(args, model, tok, magvit, judge, prompt, *rest)

    monkeypatch.setattr(sample, "run_one", stop_at_the_third)
    out = ["--out", str(tmp_path / "out")]
    assert sample.main(argv + out) == 130 and "--resume" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in (tmp_path / ".out.parts").iterdir()) == [
        "00000", "00001", "run.json"]
    made.append("resumed")
    with pytest.raises(SystemExit):          # other flags than the interrupted run's
        sample.main(argv + out + ["--resume", "--seed", "1"])
    assert "other flags" in capsys.readouterr().err
    assert sample.main(argv + out + ["--resume"]) == 0
    assert made == PROMPTS[:2] + ["resumed", PROMPTS[2]]
    assert tree(tmp_path / "out") == tree(tmp_path / "whole") and not (tmp_path / ".out.parts").exists()


def options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of `parser` and of its subcommands."""
    found = set()
    for action in parser._actions:
        found |= set(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= options(sub)
    return found


def test_torchrun_leaves_every_flag_to_the_script(capsys):
    """torchrun's argparse takes an abbreviation of its own options even after the script's name (issue 21: `--n 4`
    was "ambiguous option: --n could match --nnodes, --nproc-per-node"), so no flag of ours may be the start of
    one of torchrun's. `--n` stays as an alias of `--paths` for one process; -h/--help is everyone's."""
    torchrun = get_args_parser()
    theirs = options(torchrun)
    ours = options(sample.build_parser()) | options(train.build_parser())
    assert {"--paths", "--n", "--fsdp", "--out", "--n-embd"} <= ours and {"--nnodes", "-m"} <= theirs
    taken = {f: [t for t in theirs if t.startswith(f)] for f in sorted(ours - {"-h", "--help", "--n"})}
    assert {f: t for f, t in taken.items() if t} == {}
    script = ["sample.py", "--tiny", "--prompt", "a photo of a cat", "--paths", "4", "--out", "o"]
    assert torchrun.parse_args(["--standalone", "--nproc_per_node", "2", *script]).training_script_args == script[1:]
    assert sample.build_parser().parse_args(script[1:]).n == 4
    assert sample.build_parser().parse_args(script[1:4] + ["--n", "4"]).n == 4
    with pytest.raises(SystemExit):             # why --paths: the alias is torchrun's
        torchrun.parse_args(["--standalone", "sample.py", "--prompt", "a photo of a cat", "--n", "4"])
    assert "ambiguous option: --n" in capsys.readouterr().err


def test_under_torchrun_a_locked_out_stops_every_process_with_the_lock_line(tiny, tmp_path):
    """The first process takes --out's lock (issue 21) and tells the others: each stops with the same one line,
    before any work, instead of waiting for the first at a barrier."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    with data.folder_lock(out) as lock:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(WORKER.parent.parent / "sample.py"), "--tiny", "--cache",
                               str(tiny["llava"].parents[1]), "--device", "cpu", "--prompts",
                               str(tmp_path / "prompts.txt"), "--paths", "2", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        line = (f"error: {out} is in use by another run: process {os.getpid()} on host {data.HOST} holds its lock "
                f"{lock}; wait for that run to end (or stop it), or choose another --out")
        assert done.returncode != 0 and done.stderr.count(line) == 2, done.stderr[-3000:]
        assert "interrupted" not in done.stderr and sorted(p.name for p in tmp_path.iterdir()) == [".out.lock",
                                                                                                   "prompts.txt"]
