"""The paper's method in the shapes world: curation labelled by the evaluator, and `train.py shapes --micro`
running every stage and producing every row of the tables."""
import json
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import train

MICRO_PRETRAIN = ["pretrain", "--world", "shapes", "--n-embd", "32", "--n-layer", "1", "--n-head", "2", "--vocab",
                  "120", "--scenes", "48", "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def world_showo(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "showo"
    assert train.main(MICRO_PRETRAIN + ["--out", str(out)]) == 0
    return out


def test_world_curation_is_labelled_by_the_evaluator(world_showo, tmp_path):
    for task in ("orm", "reflect"):
        out = tmp_path / task
        assert train.main(["curate", "--world", "shapes", "--showo", str(world_showo), "--task", task,
                           "--num-prompts", "5", "--samples", "3", "--steps", "4", "--device", "cpu",
                           "--out", str(out)]) == 0
        records = json.loads((out / f"{task}.json").read_text())
        assert len(records) >= 10
        for r in records:
            image = np.asarray(data.load_image(out / r["image"]))
            ok, reason = data.judge_prompt(image, r["prompt"])
            assert r["label"] == ("yes" if ok else "no")
            if task == "reflect":
                assert r["conversations"][1]["value"] == ("yes" if ok else f"no. {reason}")
    # the prompts are the world's training prompts, never its evaluation prompts
    held_out = {s["prompt"] for s in data.eval_specs()}
    assert not {r["prompt"] for r in records} & held_out


def test_world_curation_refuses_a_verifier(world_showo, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["curate", "--world", "shapes", "--showo", str(world_showo), "--task", "orm", "--num-prompts", "2",
                    "--tiny", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "labels with the world's evaluator" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_scenes_are_captioned_and_judged_from_their_pixels(tmp_path):
    """curate --task scenes: every caption names the objects the evaluator's detector finds on the saved PNG, in
    reading order; every outcome answer is the evaluator's verdict on it; both answers occur."""
    out = tmp_path / "scenes"
    assert train.main(["curate", "--world", "shapes", "--task", "scenes", "--num-prompts", "60", "--seed", "3",
                       "--out", str(out)]) == 0
    records = json.loads((out / "scenes.json").read_text())
    assert [r["task"] for r in records] == ["caption", "orm"] * 60
    for caption, judged in zip(records[::2], records[1::2]):
        assert caption["image"] == judged["image"]
        image = np.asarray(data.load_image(out / caption["image"]))
        found = [d for ds in data.detect(data.snap_cells(image)).values() for d in ds]
        found.sort(key=lambda d: (d.box[1] // (data.SLOT * data.CELL_PX), d.box[0]))     # slot row, then x
        words = " and ".join(f"{'an' if d.color[0] in 'aeiou' else 'a'} {d.color} {d.shape}" for d in found)
        assert caption["conversations"][1]["value"] == f"a photo of {words}"
        ok, _ = data.judge_prompt(image, judged["prompt"])
        assert judged["conversations"][1]["value"] == ("yes" if ok else "no")
        assert judged["prompt"] in judged["conversations"][0]["value"]
    assert {r["label"] for r in records[1::2]} == {"yes", "no"}
    # reading order is by slot: a bar sits one cell lower in its slot than a circle does in the next one
    scene = [data.in_slot("circle", "blue", 2), data.in_slot("bar", "orange", 0), data.in_slot("ring", "red", 4)]
    assert data.caption(scene) == "a photo of an orange bar and a blue circle and a red ring"


def test_scenes_need_the_world_and_no_generator(tmp_path, capsys):
    for extra in ([], ["--world", "shapes", "--showo", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            train.main(["curate", "--task", "scenes", "--num-prompts", "2", *extra, "--out", str(tmp_path / "o")])
        assert e.value.code == 2 and "--task scenes paints a world's scenes" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


def test_micro_pipeline_produces_every_row_and_continues_where_it_stopped(tmp_path, capsys, monkeypatch):
    out = tmp_path / "shapes"
    assert train.main(["shapes", "--micro", "--out", str(out), "--device", "cpu"]) == 0
    table = (out / "results.md").read_text()
    rows = [name for _, name, *_ in train.SHAPES_ROWS]
    assert rows == ["Baseline", "Zs. ORM", "Ft. ORM", "Zs. PRM", "Ft. PRM", "DPO", "It. DPO",      # Table 1
                    "1st integration: It. DPO, Ft. ORM guidance", "2nd integration: Ft. ORM on It. DPO",   # Table 2
                    "3rd integration: Ft. ORM on It. DPO, Ft. ORM guidance",
                    "PARM", "PARM on It. DPO", "It. DPO, PARM guidance", "PARM on It. DPO, PARM guidance",  # 3
                    "Raster baseline", "Raster + Zs. ORM", "Raster + Ft. ORM", "Raster + DPO", "Raster + PARM",  # 4
                    "Self-correction", "Self-correction + Ft. ORM", "Self-correction + PARM",             # Table 5
                    "Self-correction + PARM++, no reflection", "Self-correction + PARM++",
                    "DPO, ORM pairs", "It. DPO, ORM pairs", "It. DPO, ORM pairs + PARM"]
    for name in rows:
        assert f"| {name} | " in table
    scored = {p.name for p in (out / "eval").iterdir() if (p / "scores.json").is_file()}
    assert scored == {train.row_folder(out, name).name for name in rows}
    assert len([p for p in (out / "eval" / "curves").glob("*/*") if (p / "scores.json").is_file()]) == 3 * 4 * 2
    for a, b, *_ in train.CLAIMS:           # every claim is a line of the claims table, with its verdict
        line = next(line for line in table.splitlines() if f": {a} − {b} |" in line)
        assert line.endswith(("| holds |", "| reversed |", "| not separated |")), line
    for verifier, task in (("orm", "orm"), ("prm", "prm"), ("parm", "clarity"), ("parm", "potential")):
        assert f"| {verifier} | {task} | " in table
    for title in ("## When the baseline's step images clear", "## What PARM (the PARM row) prunes",
                  "## What PARM on the raster generator (the Raster + PARM row) prunes"):
        assert title in table
    for picture in ("scaling.png", "clear_steps.png", "examples.png", "raster.png"):
        assert data.load_image(out / picture).size[0] > 0
    # the seeds pooled into one claims table (here one run; a run given twice is refused)
    assert train.main(["shapes", "--pool", str(out), "--out", str(tmp_path / "pooled")]) == 0
    assert all(f": {a} − {b} |" in (tmp_path / "pooled" / "claims.md").read_text() for a, b, *_ in train.CLAIMS)
    with pytest.raises(SystemExit):
        train.main(["shapes", "--pool", str(out), str(out), "--out", str(tmp_path / "twice")])
    assert "twice" in capsys.readouterr().err
    # a run killed before self-correction and the PARM row: the same command makes only what is missing; the rows
    # evaluated again in this one process are those the two worker processes made
    before = (out / "verifiers" / "orm" / "model.safetensors").stat().st_mtime_ns
    parm, again = train.row_folder(out, "PARM"), train.row_folder(out, "Ft. PRM")
    kept = {f: (f / "results.jsonl").read_text() for f in (parm, again)}
    made_in_a_worker = (out / "selfcorrect" / "pytorch_model.safetensors").read_bytes()
    shutil.rmtree(out / "selfcorrect")
    shutil.rmtree(parm)
    shutil.rmtree(again)
    assert train.main(["shapes", "--micro", "--out", str(out), "--device", "cpu", "--workers", "1"]) == 0
    assert (out / "selfcorrect" / "config.json").is_file() and (parm / "scores.json").is_file()
    # made again in this process: the same bytes as the worker process made (one thread each, whatever --workers)
    assert (out / "selfcorrect" / "pytorch_model.safetensors").read_bytes() == made_in_a_worker
    assert {f: (f / "results.jsonl").read_text() for f in (parm, again)} == kept
    assert (out / "verifiers" / "orm" / "model.safetensors").stat().st_mtime_ns == before
    inspected = out / "eval" / "inspect_showo.json"     # measured again from the PARM row made again
    assert inspected.stat().st_mtime_ns >= (parm / "scores.json").stat().st_mtime_ns
    # once every row is scored, a run stopped while writing the results does not inspect the paths again
    (out / "results.md").unlink()
    def not_again(*args):
        raise AssertionError("inspected again")
    monkeypatch.setattr(train, "inspect_generator", not_again)
    assert train.main(["shapes", "--micro", "--out", str(out), "--device", "cpu", "--workers", "1"]) == 0
    assert "## What PARM (the PARM row) prunes" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):     # another seed into the same folder is refused, not mixed
        train.main(["shapes", "--micro", "--out", str(out), "--device", "cpu", "--seed", "1"])


def test_a_stage_starts_once_the_stages_it_reads_are_made(tmp_path):
    """What each training stage reads, written out by hand from what each one does: `run_stages` starts a stage only
    after these, and the list's order (the order with one worker) has each after them too."""
    stages = train.shapes_stages(tmp_path, train.SHAPES_SIZES["full"], 0, "cpu")
    curations = {"data/orm", "data/orm_heldout", "data/prm", "data/prm_heldout", "data/parm", "data/parm_heldout",
                 "data/reflect"}
    expected = {"showo": set(), "data/scenes": set(), "raster": set(), "dpo_raster": {"raster"}, "dpo": {"showo"},
                **{c: {"showo"} for c in curations},
                "verifiers/base": {"data/scenes", "data/orm_heldout"},           # its held-out set: the ORM's
                **{f"verifiers/{v}": {"verifiers/base", f"data/{v}", f"data/{v}_heldout"} for v in ("orm", "prm", "parm")},
                "verifiers/parmpp": {"verifiers/base", "data/parm", "data/reflect"},
                "dpo_orm": {"showo", "verifiers/orm"},      # the trained ORM labels its pairs
                "dpo_guided_orm": {"dpo", "verifiers/orm"}, "dpo_guided_parm": {"dpo", "verifiers/parm"},
                "selfcorrect": {"showo", "data/reflect"}}
    name = lambda f: f.relative_to(tmp_path).as_posix()  # noqa: E731
    found = {name(f): {name(n) for n in needs} for f, needs in train.stage_inputs(stages).items()}
    assert found == expected
    order = [name(f) for f, _ in stages]
    assert all(order.index(n) < order.index(f) for f, needs in expected.items() for n in needs)


def test_a_stage_that_fails_in_a_worker_stops_the_pipeline_with_its_status(tmp_path, capfd):
    """Two stages in two worker processes: the second reads the first's file and stops on a bad flag, in its one
    line; the pipeline returns that status (2) instead of waiting for it, and keeps what the first made."""
    scenes = tmp_path / "scenes"
    stages = [(scenes, ["curate", "--world", "shapes", "--task", "scenes", "--num-prompts", "4", "--seed", "0"]),
              (tmp_path / "base", ["orm", "--world", "shapes", "--data", str(scenes / "scenes.json"), "--lr", "-1"])]
    assert train.stage_inputs(stages)[tmp_path / "base"] == {scenes}
    pipeline = train.sample.Pipeline("python train.py shapes --out x", {f: f"train.py {a[0]}" for f, a in stages})
    assert train.run_stages(stages, pipeline, 2, 1) == 2
    assert (scenes / "scenes.json").is_file() and not (tmp_path / "base" / "model.safetensors").exists()
    assert "error: --lr" in capfd.readouterr().err


def test_a_pipeline_stopped_by_sigterm_stops_its_worker_processes_and_ends(tmp_path):
    """`kill` of the pipeline's process alone (as a job scheduler does) while its two workers run stages: the pool's
    terminate stops them (each stage keeps what it made) and the command ends with 143, not waiting on a worker."""
    out = tmp_path / "shapes"
    run = subprocess.Popen([sys.executable, "train.py", "shapes", "--micro", "--out", str(out), "--device", "cpu"],
                           cwd=Path(train.__file__).parent, stderr=subprocess.PIPE, text=True)
    started = 0
    for line in run.stderr:                         # the first stage made, two more begun
        started += line.startswith("[shapes] ")
        if started == 4:
            break
    run.send_signal(signal.SIGTERM)
    try:
        err = run.communicate(timeout=120)[1]
    finally:
        run.kill()
    assert run.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"interrupted: {out} keeps")


def test_only_a_search_decodes_more_than_path_0(tmp_path):
    """A row without a search shows path 0 of each image (sample.image_seed), so it asks for that path alone; every
    search row decodes the run's 8 paths, and a best-of-N point its N."""
    z = train.SHAPES_SIZES["full"]
    jobs = train.evaluations(tmp_path, z)
    searches = ("--orm", "--prm", "--parm", "--parm++")
    plain = {folder.name for folder, _, flags, *_ in jobs if not any(f in flags for f in searches)}
    assert plain == {train.row_folder(tmp_path, name).name for _, name, _, flags, _ in train.SHAPES_ROWS if not flags}
    assert len(plain) == 10
    for folder, _, flags, *_ in jobs:
        n = int(flags[flags.index("--paths") + 1])
        if folder.name in plain:
            assert n == 1
        elif folder.parent.parent.name != "curves":
            assert n == z["paths"] == 8
        else:
            assert folder.name.endswith(f"_n{n}")


def test_a_stage_points_at_the_pipelines_command_and_a_damaged_stage_file_at_its_stage(tmp_path, capsys, monkeypatch):
    """Issue 21: an interrupted stage says to run the pipeline's command (not the stage's own with --resume), and an
    unreadable file an earlier stage made names that stage and how to make it again, not a download."""
    out = tmp_path / "shapes"
    argv = ["shapes", "--micro", "--out", str(out), "--device", "cpu", "--workers", "1"]    # stages in this process
    typed = shlex.join(["python", "train.py", *argv])
    add, run = train.COMMANDS["curate"]

    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setitem(train.COMMANDS, "curate", (add, interrupted))      # stopped at the first curation
    assert train.main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (f"interrupted: {out / 'data' / 'scenes'} keeps its last complete "
                                                        f"checkpoint or file; `{typed}` continues")
    weights = out / "showo" / "pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setitem(train.COMMANDS, "curate", (add, run))
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    line = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and line.startswith(f"error: {weights} is not a readable safetensors file") and (
        line.endswith(f"; the pipeline's stage `train.py pretrain` made it in {out / 'showo'}: remove that folder "
                      f"and run `{typed}` to make it again")), line
    shutil.rmtree(out / "showo")                # as the line says: the stage is made again and the pipeline goes on
    monkeypatch.setitem(train.COMMANDS, "curate", (add, interrupted))
    assert train.main(argv) == 130 and (out / "showo" / "config.json").is_file()
