"""Issue 13, nothing lost and nothing mixed: every bad config, text file, flag, --out and device ends in one line
that names it (exit status 2, no traceback) before any work; temporaries go on SIGTERM and after a SIGKILL; a
damaged checkpoint falls back to the one before it; every user error of the command lines goes through `fail`."""
import ast
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cotgen
import data
import sample
import train
import verifiers
from data import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


def cache_of(tiny) -> str:
    return str(tiny["llava"].parents[1])            # tiny_checkpoints(cache) -> cache/<version>/llava


def one_line_error(capsys, run) -> str:
    """`run()` must stop with exit status 2 and exactly one line "error: ..." on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def forbidden(*args, **kwargs):
    raise AssertionError("work started before the inputs were checked")


# ---- 1. config files: one typed reader per model, every number bounded before anything is allocated ---------

def set_field(key, value):
    return lambda raw: json.dumps({**json.loads(raw), key: value}).encode()


def set_arch(side, key, value):
    def edit(raw):
        cfg = json.loads(raw)
        cfg["architecture"][side][key] = value
        return json.dumps(cfg).encode()
    return edit


def set_yaml(value):
    return lambda raw: raw.replace(b"max_seq_length: 24", b"max_seq_length: " + value)


CONFIG_CASES = [
    ("showo", "config.json", lambda raw: b"", "is empty"),
    ("showo", "config.json", lambda raw: b"[498, 423]", "must hold a JSON object {...}, not a list"),
    ("showo", "config.json", lambda raw: b'{"vocab_size": 4', "is not valid JSON"),
    ("showo", "config.json", lambda raw: '{"vocab_size": "é"}'.encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
    ("showo", "config.json", set_field("vocab_size", "64"), "field 'vocab_size' must be an integer in [1, "),
    ("showo", "config.json", set_field("num_vq_tokens", -64), "field 'num_vq_tokens' must be an integer in [1, "),
    ("showo", "config.json", set_field("codebook_size", None), "field 'codebook_size' is null; it must be an integer"),
    ("showo", "config.json", set_field("llm_model_path", 5), "field 'llm_model_path' must be a string, not an integer"),
    ("phi", "config.json", set_field("hidden_size", 64.0), "field 'hidden_size' must be an integer"),
    ("phi", "config.json", set_field("rope_theta", "1e4"), "field 'rope_theta' must be a number"),
    ("phi", "config.json", set_field("max_position_embeddings", 10 ** 9), "field 'max_position_embeddings' must be"),
    ("phi", "config.json", set_field("num_key_value_heads", 2), "num_key_value_heads must equal num_attention_heads"),
    ("phi", "tokenizer.json", lambda raw: raw[:100] + "é".encode("latin-1"), "is not a tokenizers JSON file"),
    ("showo", "inference_config.yaml", set_yaml(b"10000000000"), "field 'max_seq_length' must be an integer in [1, "),
    ("showo", "inference_config.yaml", set_yaml(b"4000"), "max_seq_length 4000 is too large"),
    ("showo", "inference_config.yaml", set_yaml(b'"24"'), "field 'max_seq_length' must be an integer"),
    ("showo", "inference_config.yaml", set_yaml(b"-24"), "field 'max_seq_length' must be an integer in [1, "),
    ("showo", "inference_config.yaml", lambda raw: raw + "# é".encode("latin-1"), "is not UTF-8 text"),
    ("magvit", "config.json", set_arch("encoder", "ch", "32"), "field 'architecture.encoder.ch' must be an integer"),
    ("magvit", "config.json", set_arch("decoder", "ch_mult", [1, "2"]), "'architecture.decoder.ch_mult' must be a list"),
    ("magvit", "config.json", set_arch("encoder", "z_channels", 64), "'architecture.encoder.z_channels' must be"),
    ("llava", "config.json", set_field("num_attention_heads", None), "field 'num_attention_heads' is null"),
    ("llava", "config.json", set_field("hidden_size", "64"), "field 'hidden_size' must be an integer"),
    ("llava", "config.json", set_field("tie_word_embeddings", "false"), "'tie_word_embeddings' must be true or false"),
    ("llava", "vision_tower/config.json", set_field("num_hidden_layers", "3"), "field 'num_hidden_layers' must be"),
    ("llava", "generation_config.json", set_field("top_p", "0.8"), "field 'top_p' must be a number in [0.0, 1.0]"),
    ("llava", "model.safetensors.index.json", lambda raw: b"[]", "must hold a JSON object"),
    ("llava", "model.safetensors.index.json", set_field("weight_map", None), "field 'weight_map' is null"),
    ("llava", "model.safetensors.index.json", set_field("weight_map", {"a": 5}), "weight_map['a'] must be the file"),
]


@pytest.mark.parametrize("folder,name,edit,message", CONFIG_CASES)
def test_a_bad_config_names_file_and_field_before_anything_is_built(tiny, tmp_path, monkeypatch, folder, name,
                                                                     edit, message):
    gen, llava = tmp_path / "gen", tmp_path / "llava"
    if folder == "llava":
        shutil.copytree(tiny["llava"], llava)
    else:
        shutil.copytree(tiny["showo"].parent, gen)
    path = {"showo": gen / "showo", "phi": gen / "phi", "magvit": gen / "magvitv2", "llava": llava}[folder] / name
    path.write_bytes(edit(path.read_bytes()))
    for model in (cotgen.Showo, cotgen.MAGVITv2, verifiers.LlavaOneVision):        # nothing is allocated first
        monkeypatch.setattr(sys.modules[model.__module__], model.__name__, forbidden)
    load = {"magvit": lambda: cotgen.load_magvit(gen / "magvitv2"), "llava": lambda: verifiers.load_verifier(llava)}
    with pytest.raises(CheckpointError) as e:
        load.get(folder, lambda: cotgen.load_showo(gen / "showo"))()          # phi: its llm_model_path
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_command_lines_turn_a_bad_config_into_one_line(tiny, tmp_path, capsys):
    shutil.copytree(tiny["showo"].parent, tmp_path / "gen")
    shutil.copytree(tiny["llava"], tmp_path / "llava")
    for path in (tmp_path / "gen" / "showo" / "config.json", tmp_path / "llava" / "config.json"):
        path.write_bytes(set_field("hidden_size" if "llava" in str(path) else "vocab_size", "64")(path.read_bytes()))
    gen = tmp_path / "gen"
    line = one_line_error(capsys, lambda: sample.main([
        "--showo", str(gen / "showo"), "--magvit", str(gen / "magvitv2"), "--prompt", "a photo of a cat",
        "--device", "cpu", "--out", str(tmp_path / "img")]))
    assert f"{gen / 'showo' / 'config.json'}: field 'vocab_size' must be an integer" in line
    line = one_line_error(capsys, lambda: train.main([
        "orm", "--base", str(tmp_path / "llava"), "--device", "cpu", "--data", str(tmp_path / "orm.json"),
        "--out", str(tmp_path / "ft")]))
    assert f"{tmp_path / 'llava' / 'config.json'}: field 'hidden_size' must be an integer" in line
    assert not (tmp_path / "img").exists() and not (tmp_path / "ft").exists()


# ---- 2. text files: UTF-8 only, and a prompt must be text ------------------------------------------------------

def test_non_utf8_files_and_non_text_prompts_are_named(tiny, tmp_path, capsys, monkeypatch):
    latin = tmp_path / "prompts.txt"
    latin.write_bytes("a photo of a café\n".encode("latin-1"))
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"prompt": "a photo of a cat"}) + "\n" + json.dumps({"prompt": 5}) + "\n")
    monkeypatch.setattr(sample, "load_models", forbidden)
    args = ["--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--out", str(tmp_path / "o")]
    line = one_line_error(capsys, lambda: sample.main(args + ["--prompts", str(latin)]))
    assert f"prompt file {latin} is not UTF-8 text (byte 0xe9 at offset 16)" in line
    line = one_line_error(capsys, lambda: sample.main(args + ["--metadata", str(meta)]))
    assert f'{meta} line 2: "prompt" must be non-empty text' in line
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes('{"prompt": "café", "chosen": [1], "rejected": [2]}\n'.encode("latin-1"))
    line = one_line_error(capsys, lambda: train.main(["dpo", "--data", str(pairs), "--out", str(tmp_path / "t"),
                                                      "--tiny", "--cache", cache_of(tiny), "--device", "cpu"]))
    assert f"preference file {pairs} is not UTF-8 text" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()


# ---- 3. resume files: a damaged checkpoint falls back to the one before it --------------------------------------

@pytest.fixture(scope="module")
def dpo_run(tiny, tmp_path_factory):
    """The flags of a 6-step DPO run on 12 fixed token pairs, and the weights it ends with uninterrupted."""
    root = tmp_path_factory.mktemp("dpo")
    g = torch.Generator().manual_seed(5)
    prompts = ["a photo of a red apple", "a photo of two dogs", "a photo of a cat left of a bench"]
    data.write_jsonl([{"prompt": prompts[i % 3], "chosen": torch.randint(0, 64, (64,), generator=g).tolist(),
                       "rejected": torch.randint(0, 64, (64,), generator=g).tolist()} for i in range(12)],
                     root / "pairs.jsonl")
    flags = ["dpo", "--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--data", str(root / "pairs.jsonl"),
             "--batch-size", "2", "--lr", "1e-3", "--shuffle", "--save-every", "2", "--log-every", "100"]
    assert train.main(flags + ["--out", str(root / "full")]) == 0
    return flags, load_file(root / "full" / "pytorch_model.safetensors")


def damage(ckpt: Path, how: str) -> None:
    weights, state = ckpt / "pytorch_model.safetensors", ckpt / "optimizer.safetensors"
    if how.startswith("truncated"):
        f = weights if "weights" in how else state
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how.startswith("mis-keyed"):
        f = weights if "weights" in how else state
        tensors = load_file(f)
        key = sorted(tensors)[0]
        tensors[key + "_renamed"] = tensors.pop(key)
        save_file(tensors, f)
    elif how == "damaged trainer.json":
        (ckpt / "trainer.json").write_text('{"round": 1, "step": "5"}')
    else:
        (ckpt.parent / train.LATEST).write_bytes(b"\xff not json")


@pytest.mark.parametrize("how", ["truncated weights", "mis-keyed weights", "truncated optimizer state",
                                 "mis-keyed optimizer state", "damaged trainer.json", "damaged latest.json"])
def test_a_damaged_checkpoint_falls_back_to_the_one_before(dpo_run, tmp_path, capsys, how):
    flags, want = dpo_run
    out = tmp_path / "o"
    assert train.main(flags + ["--out", str(out), "--stop-after", "5"]) == 0
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-r1-000004", "ckpt-r1-000005"]   # the one before
    damage(out / "ckpt-r1-000005", how)
    capsys.readouterr()
    assert train.main(flags + ["--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    if how == "damaged latest.json":       # nothing to fall back from: the checkpoints are found by their names
        assert f"{out / train.LATEST} is not UTF-8 text" in err and "resumed from" in err and "000005 at step 5/6" in err
    else:
        assert f"cannot resume from {out / 'ckpt-r1-000005'}: " in err
        assert f"resumed from {out / 'ckpt-r1-000004'} at step 4/6" in err
    got = load_file(out / "pytorch_model.safetensors")
    assert "Traceback" not in err and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not list(out.glob("ckpt-*")) and not (out / train.LATEST).exists()


def test_resume_never_takes_a_device_error_for_a_damaged_checkpoint(tmp_path):
    (tmp_path / "ckpt-r1-000002").mkdir()
    (tmp_path / "ckpt-r1-000002" / "trainer.json").write_text("{}")

    def load(folder):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        train.resume(tmp_path, 1, "test", load, forbidden)


def test_a_damaged_curate_part_is_named_and_made_again(tmp_path, capsys):
    good, bad = tmp_path / "p000000.json", tmp_path / "p000001.json"
    data.write_json([{"id": "a"}], good, indent=None)
    bad.write_text('[{"id": "b"')                     # cut short
    assert train.read_part(good, "curate") == [{"id": "a"}] and train.read_part(tmp_path / "none", "curate") is None
    assert train.read_part(bad, "curate") is None and not bad.exists()
    assert f"{bad} is damaged: it is made again" in capsys.readouterr().err


# ---- 4. temporaries: removed on SIGTERM, and after a SIGKILL by the next run ------------------------------------

WRITER = """
import sys, time
sys.path.insert(0, {root!r})
import data, sample

def run():
    with data.atomic_path({out!r}, directory=True) as tmp:
        (tmp / "image.png").write_text("half")
        print("writing", flush=True)
        time.sleep(60)
    return 0

sys.exit(sample.command(run, "nothing was written"))
"""


def test_sigterm_while_writing_leaves_no_temporary(tmp_path):
    code = WRITER.format(root=str(ROOT), out=str(tmp_path / "out"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    assert len(list(tmp_path.iterdir())) == 1                 # the temporary folder, being written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == "interrupted: nothing was written\n"
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_writer_left_is_removed_by_the_next_run(tmp_path):
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = tmp_path / f".out.{data.HOST}.pid{gone}.k1ll3d.tmp"
    stale.mkdir()
    (stale / "image.png").write_text("half")
    live = tmp_path / f".out.{data.HOST}.pid{os.getpid()}.w0rk1n.tmp"          # a live writer's stays
    elsewhere = tmp_path / f".out.another-host.pid{gone}.n0tm1n.tmp"            # so does another machine's
    live.mkdir()
    elsewhere.mkdir()
    with data.atomic_path(tmp_path / "out", directory=True) as d:
        (d / "image.png").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, elsewhere.name])
    run = tmp_path / "run"                                # a training --out: a checkpoint cut short by SIGKILL
    (run / f".ckpt-r1-000005.{data.HOST}.pid{gone}.k1ll3d.tmp").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    assert sample.check_out(str(run)) == run and sorted(p.name for p in run.iterdir()) == ["run.json"]


# ---- 5. --out: checked before any work ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["sample", "train"])
@pytest.mark.parametrize("case,message", [("a file", "is a file: name a folder"),
                                          ("under a file", "which is a file"), ("empty", "--out is empty"),
                                          ("read-only", "is not writable"), ("foreign", "holds files")])
def test_a_bad_out_is_refused_before_any_work(tiny, tmp_path, capsys, monkeypatch, command, case, message):
    (tmp_path / "f").write_text("x")
    (tmp_path / "locked").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("someone's")
    out = {"a file": tmp_path / "f", "under a file": tmp_path / "f" / "o", "empty": "",
           "read-only": tmp_path / "locked" / "o", "foreign": tmp_path / "foreign"}[case]
    if case == "read-only":
        (tmp_path / "locked").chmod(0o555)
        if os.geteuid() == 0:           # root may write anywhere: stand in for a read-only file system
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p) != tmp_path / "locked")
    monkeypatch.setattr(sample, "load_models", forbidden)
    monkeypatch.setattr(train, "showo_run", forbidden)
    base = ["--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--out", str(out)]
    if command == "sample":
        message = "already holds files: pass --overwrite" if case == "foreign" else message
        line = one_line_error(capsys, lambda: sample.main(base + ["--prompt", "a photo of a cat"]))
    else:
        line = one_line_error(capsys, lambda: train.main(["dpo", *base, "--data", str(tmp_path / "p.jsonl")]))
    assert message in line and (case == "empty" or str(out) in line), line
    (tmp_path / "locked").chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "foreign", "locked"]
    assert not list((tmp_path / "locked").iterdir()) and (tmp_path / "f").read_text() == "x"


# ---- 6. devices: refused up front, and a device error is never blamed on a file ---------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_refused_up_front_and_never_blamed_on_a_file(tiny, tmp_path, capsys):
    args = ["--tiny", "--cache", cache_of(tiny), "--device", "cuda", "--out", str(tmp_path / "o")]
    line = one_line_error(capsys, lambda: sample.main(args + ["--prompt", "a photo of a cat"]))
    assert "device 'cuda' requested but CUDA is not available" in line
    line = one_line_error(capsys, lambda: train.main(["orm", *args, "--data", str(tmp_path / "orm.json")]))
    assert "device 'cuda' requested but CUDA is not available" in line and not (tmp_path / "o").exists()
    with pytest.raises(Exception) as e:                 # the loader, asked for a device it cannot use
        cotgen.load_magvit(tiny["magvit"], device="cuda")
    assert not isinstance(e.value, CheckpointError) and "magvit" not in str(e.value)


# ---- 7. one helper: the command lines end a user's error only through sample.fail -------------------------------

def test_every_user_error_of_the_command_lines_goes_through_fail():
    def calls(node, name):
        return [n for n in ast.walk(node) if isinstance(n, ast.Call) and ast.unparse(n.func) == name]

    for name in ("sample", "train"):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
        for top in body:
            where = f"{name}.py:{getattr(top, 'name', top.lineno)}"
            exits = [c for f in ("sys.exit", "exit", "quit", "os._exit") for c in calls(top, f)]
            raises = [n for n in ast.walk(top) if isinstance(n, ast.Raise) and n.exc is not None
                      and "SystemExit" in ast.unparse(n.exc)]
            errors = [c for c in calls(top, "print") if c.args and ast.unparse(c.args[0]).lstrip("f'\"").lower()
                      .startswith("error")]
            assert not exits, f"{where} exits on its own"
            if getattr(top, "name", None) != "fail":
                assert not raises and not errors, f"{where} ends a command without `fail`"
        main = next(n for n in tree.body if getattr(n, "name", None) == "main")
        assert calls(main, "command") or calls(main, "sample.command"), f"{name}.main does not run through command"


# ---- 8. every flag checked before anything is written --------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["dpo", "--data", "p.jsonl", "--lr", "inf"], "--lr must be positive (got inf)"),
    (["dpo", "--data", "p.jsonl", "--weight-decay", "nan"], "--weight-decay must be at least 0 (got nan)"),
    (["dpo", "--data", "p.jsonl", "--beta", "inf"], "--beta must be positive (got inf)"),
    (["dpo", "--data", "p.jsonl", "--reward-coef", "0.1", "--online-prompts", "none.txt"], "prompt file none.txt"),
    (["dpo", "--data", "p.jsonl", "--verifier", "no-such-folder"], "--verifier no-such-folder is not a folder"),
    (["dpo", "--geneval", "4", "--pairs-per-prompt", "0"], "--pairs-per-prompt must be at least 1 (got 0)"),
    (["selfcorrect", "--reflect", "r.json", "--warmup-ratio", "nan"], "--warmup-ratio must be in [0, 1)"),
    (["orm", "--data", "orm.json", "--vision-lr", "inf"], "--vision-lr must be positive (got inf)"),
    (["orm", "--data", "orm.json", "--max-grad-norm", "nan"], "--max-grad-norm must be at least 0 (got nan)"),
    (["orm", "--data", "orm.json", "--fraction", "nan"], "--fraction must be in (0, 1]"),
    (["curate", "--task", "orm", "--num-prompts", "2", "--cfg", "nan"], "--cfg must be at least 0 (got nan)"),
])
def test_a_bad_training_flag_claims_no_folder(tiny, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, lambda: train.main([args[0], "--tiny", "--cache", cache_of(tiny), "--device", "cpu",
                                                      *args[1:], "--out", "o"]))
    assert message in line and not (tmp_path / "o").exists()


def test_a_seed_outside_the_generators_range_is_refused_up_front(tiny, tmp_path, capsys):
    line = one_line_error(capsys, lambda: sample.main(["--tiny", "--cache", cache_of(tiny), "--device", "cpu",
                                                       "--prompt", "a photo of a cat", "--seed", str(10 ** 20),
                                                       "--out", str(tmp_path / "o")]))
    assert "--seed must be in [0, 2^62)" in line and not (tmp_path / "o").exists()


# ---- 9. a full disk: one line that says what and how to go on, no temporary left, and the same command continues --

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_a_full_disk_while_training_is_one_line_and_resume_continues(dpo_run, tmp_path, capsys, monkeypatch):
    flags, want = dpo_run
    out, real, written = tmp_path / "o", data.save_file, []

    def full_at_the_second_checkpoint(tensors, name, metadata=None):      # as safetensors 0.8 words ENOSPC
        written.append(name)
        if sum("optimizer" in n for n in written) == 2:
            raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path '
                                  f'"{Path(name).parent / ".tmpXyZ"}"')
        return real(tensors, name, metadata=metadata)

    monkeypatch.setattr(data, "save_file", full_at_the_second_checkpoint)
    with pytest.raises(SystemExit) as e:
        train.main(flags + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and [l for l in err.splitlines() if "error" in l] == [
        f"error: cannot write {out / 'ckpt-r1-000004' / 'optimizer.safetensors'}: No space left on device; free space "
        "and run the same command with --resume: it continues from the last complete checkpoint"]
    assert temporaries(tmp_path) == [] and sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-r1-000002"]
    monkeypatch.setattr(data, "save_file", real)                      # space freed
    assert train.main(flags + ["--out", str(out), "--resume"]) == 0
    assert f"resumed from {out / 'ckpt-r1-000002'} at step 2/6" in capsys.readouterr().err
    got = load_file(out / "pytorch_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_full_disk_while_sampling_is_one_line_and_resume_continues(tiny, tmp_path, capsys, monkeypatch):
    (tmp_path / "prompts.txt").write_text("a photo of a red apple\na photo of two dogs\na photo of a bench\n")
    argv = ["--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--prompts", str(tmp_path / "prompts.txt"),
            "--steps", "2", "--samples", "1"]
    assert sample.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    real, saved = data.Image.Image.save, []

    def full_at_the_second_image(image, *args, **kwargs):
        saved.append(1)
        if len(saved) == 2:
            raise NO_SPACE
        return real(image, *args, **kwargs)

    monkeypatch.setattr(data.Image.Image, "save", full_at_the_second_image)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sample.main(argv + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and err.splitlines()[-1] == (
        f"error: cannot write {tmp_path / '.out.parts' / '00001' / 'samples' / '0000.png'}: No space left on device; "
        "free space and run the same command with --resume: it continues from the prompts finished so far")
    assert temporaries(tmp_path) == [] and sorted(p.name for p in (tmp_path / ".out.parts").iterdir()) == [
        "00000", "run.json"]
    monkeypatch.setattr(data.Image.Image, "save", real)
    assert sample.main(argv + ["--out", str(out), "--resume"]) == 0
    whole = {p.relative_to(tmp_path / "whole"): p.read_bytes() for p in (tmp_path / "whole").rglob("*") if p.is_file()}
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == whole


def test_a_failed_write_names_the_file_and_leaves_no_temporary(tmp_path):
    with pytest.raises(data.WriteError) as e:
        with data.atomic_path(tmp_path / "run" / "ckpt", directory=True) as d:
            data.write_json({"a": 1}, d / "trainer.json")
            with data.atomic_path(d / "model" / "weights.bin") as f:
                f.write_bytes(b"half")
                raise NO_SPACE
    published = tmp_path / "run" / "ckpt" / "model" / "weights.bin"      # the file's name, not its temporary's
    assert str(e.value) == f"cannot write {published}: No space left on device"
    assert e.value.full and temporaries(tmp_path) == [] and list((tmp_path / "run").iterdir()) == []
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "x.json"))
    with pytest.raises(data.WriteError) as e:
        with data.atomic_path(tmp_path / "x.json"):
            raise read_only
    assert str(e.value) == f"cannot write {tmp_path / 'x.json'}: Read-only file system" and not e.value.full


# ---- 10. an unreadable weights file: download it again, unless a run of this project made it ---------------------

def test_an_unreadable_file_a_run_made_names_the_run_not_a_download(tiny, tmp_path, capsys):
    args = ["--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--prompt", "a photo of a cat", "--orm", "--n", "2",
            "--steps", "2"]
    for where, made in (("downloaded", False), ("run", True)):
        folder = tmp_path / where / "verifier"
        shutil.copytree(tiny["llava"], folder)
        if made:                                # a `train.py orm --out RUN` folder: its run.json is RUN's
            (folder / "run.json").write_text("{}")
        weights = next(folder.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
        line = one_line_error(capsys, lambda: sample.main(args + ["--verifier", str(folder), "--out",
                                                                   str(tmp_path / where / "o")]))
        assert f"{weights} is not a readable safetensors file" in line
        if made:
            assert line.endswith(f"; the run in {folder} made it: remove {folder} and run the command that made it "
                                 "again") and "download" not in line
        else:
            assert line.endswith("it is probably truncated or incomplete: download it again")
