"""The paper's method in the shapes world: curation labelled by the evaluator, and `train.py shapes --micro`
running every stage and producing every row of the tables."""
import json
import shutil

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


def test_micro_pipeline_produces_every_row_and_continues_where_it_stopped(tmp_path):
    out = tmp_path / "shapes"
    assert train.main(["shapes", "--micro", "--out", str(out), "--device", "cpu"]) == 0
    table = (out / "results.md").read_text()
    rows = [name for name, *_ in train.SHAPES_ROWS]
    assert rows == ["Baseline", "Ft. ORM", "Ft. PRM", "PARM", "PARM++", "DPO", "It. DPO", "It. DPO + PARM"]
    for name in rows:
        assert f"| {name} | " in table
    for verifier, task in (("orm", "orm"), ("prm", "prm"), ("parm", "clarity"), ("parm", "potential")):
        assert f"| {verifier} | {task} | " in table
    assert data.load_image(out / "results.png").size[0] > 0 and data.load_image(out / "examples.png").size[0] > 0
    # a run killed before self-correction and the PARM row: the same command makes only what is missing
    before = (out / "verifiers" / "orm" / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(out / "selfcorrect")
    shutil.rmtree(out / "eval" / "parm")
    assert train.main(["shapes", "--micro", "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "selfcorrect" / "config.json").is_file() and (out / "eval" / "parm" / "scores.json").is_file()
    assert (out / "verifiers" / "orm" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(SystemExit):     # another seed into the same folder is refused, not mixed
        train.main(["shapes", "--micro", "--out", str(out), "--device", "cpu", "--seed", "1"])
