"""Issue 21, one run per folder: every command that owns an --out holds an exclusive lock on it (`.NAME.lock` beside
it) for its whole run. A second run on the folder stops at once with one line naming the holder, and the first
goes on undisturbed; a killed run's lock (the OS drops a flock with its process) never blocks the next run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data
import sample
import train
from test_dpo import random_pairs, write_token_pairs

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a red apple", "a photo of two dogs", "a photo of a cat left of a bench"]

# a command line in its own process, with one thread as the tests' (conftest.py), so its files are this process's
RUN = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
torch.set_num_threads(1)
import sample, train
sys.exit(sample.main(sys.argv[2:]) if sys.argv[1] == "sample" else train.main(sys.argv[2:]))
"""


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def command_line(tiny, tmp_path: Path, name: str) -> list[str]:
    """A small run of sample.py (a prompt set) or of train.py (DPO on token pairs), without --out."""
    models = ["--tiny", "--cache", str(tiny["llava"].parents[1]), "--device", "cpu"]
    if name == "sample":
        (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        return [*models, "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2", "--samples", "1"]
    write_token_pairs(tmp_path / "pairs.jsonl", random_pairs(6, seed=3))
    return ["dpo", *models, "--data", str(tmp_path / "pairs.jsonl"), "--batch-size", "2", "--save-every", "1",
            "--log-every", "100"]


def main_of(name: str):
    return sample.main if name == "sample" else train.main


def start(name: str, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, name, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def held_by(proc: subprocess.Popen, out: Path) -> None:
    """Wait until `proc` holds the lock of `out` (its pid is in the lock file)."""
    lock = data.lock_file(out)
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().split()[:1] == [str(proc.pid)]):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)


@pytest.mark.parametrize("name", ["sample", "train"])
def test_a_second_run_on_a_folder_stops_at_once_and_the_first_ends_as_alone(tiny, tmp_path, capsys, name):
    argv, out = command_line(tiny, tmp_path, name), tmp_path / "out"
    assert main_of(name)(argv + ["--out", str(out)]) == 0        # the run alone
    alone = tree(out)
    out.rename(tmp_path / "alone")
    capsys.readouterr()
    first = start(name, argv + ["--out", str(out)])
    try:
        held_by(first, out)
        first.send_signal(signal.SIGSTOP)       # paused while it holds the lock: the second run surely meets it
        held_by(first, out)
        with pytest.raises(SystemExit) as e:
            main_of(name)(argv + ["--out", str(out)])
        err = capsys.readouterr().err
        lock = tmp_path / ".out.lock"
        assert e.value.code == 2 and err == (f"error: {out} is in use by another run: process {first.pid} on host "
                                             f"{data.HOST} holds its lock {lock}; wait for that run to end (or stop "
                                             "it), or choose another --out\n")
        first.send_signal(signal.SIGCONT)
        _, first_err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, first_err
    assert tree(out) == alone and not lock.exists()          # and the lock is gone with its run


def test_a_killed_runs_lock_does_not_block_the_next_run(tiny, tmp_path):
    argv, out = command_line(tiny, tmp_path, "sample"), tmp_path / "out"
    killed = start("sample", argv + ["--out", str(out)])
    try:
        held_by(killed, out)
    finally:
        killed.kill()                           # SIGKILL: nothing of the run's own cleanup happens
    killed.wait()
    lock = data.lock_file(out)
    assert lock.read_text() == f"{killed.pid} {data.HOST}\n"        # its file stays, but the OS let go of the lock
    assert sample.main(argv + ["--out", str(out)]) == 0
    assert len(list(out.glob("*/samples/0000.png"))) == 3 and not lock.exists()


def test_a_locked_folder_is_refused_before_any_work_and_stages_lock_their_own(tiny, tmp_path, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("work started on a locked folder")

    monkeypatch.setattr(sample, "load_models", forbidden)
    monkeypatch.setattr(train, "showo_run", forbidden)
    out, spelled = tmp_path / "runs" / "out", tmp_path / "runs" / ".." / "runs" / "out"     # one folder
    with data.folder_lock(out) as lock:          # a lock is per open file: this process's own hold counts too
        assert lock == tmp_path / "runs" / ".out.lock" and lock.read_text() == f"{os.getpid()} {data.HOST}\n"
        for name in ("sample", "train"):
            with pytest.raises(SystemExit) as e:
                main_of(name)(command_line(tiny, tmp_path, name) + ["--out", str(spelled)])
            err = capsys.readouterr().err
            holder = f"process {os.getpid()} on host {data.HOST} holds its lock {lock};"
            assert e.value.code == 2 and err.startswith(f"error: {spelled} is in use by another run: {holder}"), err
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".out.lock"]    # nothing else written
        with data.folder_lock(out / "stage") as inner:      # a pipeline's stage: a sub-folder, its own lock
            assert inner == out / ".stage.lock"
        assert not inner.exists()
    assert not lock.exists()
    with data.folder_lock(out):                 # free again
        pass
