"""Ranking data for the reward models (train.py curate): the template prompts, the PRM any-of-R rule with a
scripted verifier, the PARM static rule and mixing, the reflection records, and each task's file read by the
matching training command."""
import json
import math
import re
import zlib
from argparse import Namespace

import pytest
import torch

import cotgen
import data
import train
import verifiers as V

# one pattern per GenEval template, in data.PROMPT_TEMPLATES order
O = "(?:" + "|".join(data.GENEVAL_OBJECTS) + ")"
C = "(?:" + "|".join(data.GENEVAL_COLORS) + ")"
TEMPLATES = [rf"a photo of an? {O}", rf"a photo of an? {O} and an? {O}", rf"a photo of (?:two|three|four) {O}e?s",
             rf"a photo of an? {C} {O}", rf"a photo of an? {O} (?:left of|right of|above|below) an? {O}",
             rf"a photo of an? {C} {O} and an? {C} {O}"]


@pytest.fixture(scope="module")
def showo(tiny):
    model, tok = cotgen.load_showo(tiny["showo"], tiny["phi"])
    return model, tok, cotgen.load_magvit(tiny["magvit"])


def cache_of(tiny):
    return str(tiny["llava"].parents[1])


def mean_scorer(threshold):
    """Scripted verifier: "yes" when the image's mean brightness is above `threshold`."""
    def score(images, prompts):
        m = images.float().mean(dim=(1, 2, 3))
        return torch.sigmoid(m), m > threshold
    return score


def curate_args(**kw):
    base = dict(task="orm", samples=2, steps=18, cfg=1.75, temperature=1.5, rollouts=4, judge="greedy",
                judge_batch=16, orm_fraction=0.7, reasons=None, max_reason_tokens=8, seed=0, out="unused",
                clarity=list(train.PAPER_CLARITY))
    return Namespace(**{**base, **kw})


# ---- prompts ------------------------------------------------------------------------------------------------


def test_training_prompts_are_deterministic_cover_the_six_templates_and_exclude_test_prompts():
    p = data.training_prompts(60, seed=3)
    assert p == data.training_prompts(60, seed=3) and p != data.training_prompts(60, seed=4)
    assert len(set(p)) == 60
    # the templates take turns: prompt i comes from template i mod 6
    for i, prompt in enumerate(p):
        assert re.fullmatch(TEMPLATES[i % 6], prompt), prompt
    # the test prompts are left out (case, spacing and a final period do not matter)
    test = [p[0].upper() + ".", "  " + p[7], p[11]]
    q = data.training_prompts(60, seed=3, exclude=test)
    assert len(q) == 60 and not {p[0], p[7], p[11]} & set(q)
    assert set(q) > set(p) - {p[0], p[7], p[11]}


def test_training_prompts_follow_genevals_wording_over_given_lists():
    every = data.training_prompts(None, objects=["apple", "bus", "person"], colors=["orange", "red"])
    # by hand: single 3, two objects 3*2, counting 3*3, colours 2*2 (no "person"), position 3*2*4,
    # colour attribution 2*1*2*1
    assert len(every) == 3 + 6 + 9 + 4 + 24 + 4 == len(set(every))
    for prompt in ("a photo of an apple", "a photo of a person and a bus", "a photo of two buses",
                   "a photo of four apples", "a photo of an orange apple", "a photo of a red bus",
                   "a photo of a bus below an apple", "a photo of an orange apple and a red bus"):
        assert prompt in every
    assert not [q for q in every if re.search(r"(orange|red) person", q)]
    assert "a photo of a red apple and a red bus" not in every and "a photo of an apple and an apple" not in every
    with pytest.raises(data.DataError, match="only 50"):
        data.training_prompts(51, objects=["apple", "bus", "person"], colors=["orange", "red"])
    with pytest.raises(data.DataError, match="more than once"):
        data.training_prompts(5, objects=["apple", "apple"])


# ---- PRM: the any-of-R rule --------------------------------------------------------------------------------


def test_prm_labels_use_the_any_of_r_rule(showo):
    model, tok, magvit = showo
    S, R, prompt = 6, 3, "a photo of a red apple"
    # seeds from the parts' text: hash() of a str is salted per process and would change the test every run
    gens = lambda *parts: torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))
    rollout_gens = lambda: [[gens("r", i, r) for r in range(R)] for i in range(S - 1)]
    history, finals = train.prm_rollouts(model, tok, prompt, gens("main"), rollout_gens(), steps=S, cfg=1.75,
                                         temperature=1.5)
    assert history.shape == (S, 64) and finals.shape == (S - 1, R, 64)
    # a continuation is the path's state after step i, decoded on with its own generator: replay one alone
    for i, r in ((0, 1), (3, 2)):
        alone = cotgen.Paths(model, tok, prompt, 1, steps=S, temperature=1.5, generators=[gens("main")])
        for _ in range(i + 1):
            alone.step()
        alone.generators[0] = rollout_gens()[i][r]
        for _ in alone:
            pass
        assert torch.equal(alone.final_tokens()[0], finals[i, r])
    # the scripted verifier: "yes" above the median brightness of all final images, so both answers occur
    with torch.inference_mode():
        means = magvit.decode_code(torch.cat([finals.flatten(0, 1), history[-1:]])).mean(dim=(1, 2, 3))
    # threshold halfway between the two middle brightnesses: both answers occur, and no image sits on it
    # (decoding in batches of another size may change the last bits of a mean)
    mid = means.sort().values[len(means) // 2 - 1: len(means) // 2 + 1]
    assert mid[1] - mid[0] > 1e-4
    threshold = mid.mean()
    score = mean_scorer(threshold)
    _, _, roll_yes = train.judge_codes(magvit, score, finals.flatten(0, 1), prompt, 4)
    _, _, final_yes = train.judge_codes(magvit, score, history[-1:], prompt, 4)
    labels = train.prm_labels(roll_yes.view(S - 1, R), final_yes)
    by_hand = [bool((means[i * R:(i + 1) * R] > threshold).any()) for i in range(S - 1)]
    assert labels.tolist() == by_hand + [bool(means[-1] > threshold)]
    # any, not all and not a majority: a hand-made mix
    mixed = torch.tensor([[False, False, True], [False, False, False], [True, True, True]])
    assert train.prm_labels(mixed, torch.tensor([False])).tolist() == [True, False, True, False]


def test_prm_records_carry_the_labels_of_their_step(showo, tmp_path):
    model, tok, magvit = showo
    a = curate_args(task="prm", samples=1, steps=5, rollouts=2, out=str(tmp_path))
    scorer = mean_scorer(0.0)
    cur = train.Curate(a, model, tok, magvit, lambda j: scorer, None)
    records, images = cur.prompt_records(3, "a photo of two dogs")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and set(images) == {r["image"] for r in records}
    assert records[0]["id"] == "prm-p000003-k00-s01" and records[0]["image"] == "images/p000003/k00-s01.png"
    # recompute independently with the same seeds
    rollouts = [[cur.gen(3, 0, "rollout", i, r) for r in range(2)] for i in range(4)]
    history, finals = train.prm_rollouts(model, tok, "a photo of two dogs", cur.gen(3, 0), rollouts, steps=5,
                                         cfg=1.75, temperature=1.5)
    with torch.inference_mode():
        yes = magvit.decode_code(torch.cat([finals.flatten(0, 1), history[-1:]])).mean(dim=(1, 2, 3)) > 0
    want = [bool(yes[2 * i:2 * i + 2].any()) for i in range(4)] + [bool(yes[-1])]
    assert [r["label"] == "yes" for r in records] == want
    for r in records:
        assert r["conversations"] == [{"from": "human", "value": V.prm_question("a photo of two dogs")},
                                      {"from": "gpt", "value": r["label"]}]


# ---- PARM: the static rule, the two-turn potential records, the mix -------------------------------------------


def test_clarity_rule_is_the_papers_static_rule():
    # 1-based steps of 18: after 11 "yes", before 10 "no", 10 and 11 unlabelled
    assert [train.clarity_label(i) for i in range(1, 19)] == ["no"] * 9 + [None, None] + ["yes"] * 7
    assert [train.clarity_label(i, 9) for i in range(1, 10)] == ["no"] * 4 + [None] + ["yes"] * 4


def test_clarity_rule_thresholds_are_a_setting(monkeypatch):
    """The rule's thresholds are an argument (curate --clarity-steps), the paper's by default and the world's own
    (data.WORLD_CLARITY) with --world."""
    assert [train.clarity_label(i, 18, (4, 12)) for i in range(1, 19)] == ["no"] * 3 + [None] * 9 + ["yes"] * 6
    assert [train.clarity_label(i, 18, (6, 5)) for i in range(1, 19)] == ["no"] * 5 + ["yes"] * 13
    parse = lambda *more: train.build_parser().parse_args(["curate", "--task", "parm", "--num-prompts", "2",  # noqa
                                                           "--out", "o", *more])
    monkeypatch.setattr(data, "WORLD_CLARITY", (3, 14))
    for argv, want in (((), [10, 11]), (("--world", "shapes"), [3, 14]),
                       (("--world", "shapes", "--clarity-steps", "7", "8"), [7, 8])):
        a = parse(*argv)
        train.check_curate_args(a)
        assert a.clarity == want
    with pytest.raises(SystemExit):
        train.check_curate_args(parse("--clarity-steps", "12", "3"))


def test_parm_records_follow_the_static_rule_and_the_final_label(showo, tmp_path):
    model, tok, magvit = showo
    a = curate_args(task="parm", samples=2, out=str(tmp_path))
    answers = lambda images, prompts: (torch.tensor([0.9, 0.2]), torch.tensor([True, False]))  # path 0 yes, 1 no
    records, images = train.Curate(a, model, tok, magvit, lambda j: answers, None).prompt_records(0, "a photo of a cat")
    for k, final in enumerate(("yes", "no")):
        mine = [r for r in records if r["id"].split("-")[2] == f"k{k:02d}"]
        clarity = {r["step"]: r["label"] for r in mine if r["task"] == "clarity"}
        assert clarity == {**{i: "no" for i in range(1, 10)}, **{i: "yes" for i in range(12, 19)}}
        potential = [r for r in mine if r["task"] == "potential"]
        assert [r["step"] for r in potential] == list(range(12, 19))
        for r in potential:
            q, first, follow = V.potential_question("a photo of a cat")
            assert [t["value"] for t in r["conversations"]] == [q, first, follow, final]
            assert [t["from"] for t in r["conversations"]] == ["human", "gpt", "human", "gpt"]
        orm = [r for r in mine if r["task"] == "orm"]
        assert len(orm) == 1 and orm[0]["label"] == final and orm[0]["image"] == f"images/p000000/k{k:02d}-s18.png"
    assert set(images) == {r["image"] for r in records} and len(images) == 2 * 16

    # the mix: ceil(70%) of the ORM records (seeded), every PARM record
    fake = [{"task": "orm", "id": f"o{i}"} for i in range(10)] + [{"task": "clarity", "id": f"c{i}"} for i in range(5)]
    mixed = train.Curate(a, model, tok, magvit, None, None).finish(fake)
    assert sum(r["task"] == "orm" for r in mixed) == math.ceil(0.7 * 10) and sum(r["task"] == "clarity" for r in mixed) == 5
    assert mixed == train.Curate(a, model, tok, magvit, None, None).finish(fake)


# ---- the command: each task's file is read by its training command ------------------------------------------


def cli(tiny, *args):
    return train.main(["curate", "--tiny", "--cache", cache_of(tiny), "--device", "cpu", *args])


def sft(tiny, task, out, *files, extra=()):
    args = [task, "--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--out", str(out), "--max-steps", "1",
            "--batch-size", "4", "--log-every", "10", *extra]
    for f in files:
        args += ["--data", str(f)]
    return train.main(args)


def test_curated_files_are_read_by_the_training_commands(tiny, tmp_path, capsys):
    tests = tmp_path / "geneval.txt"
    tests.write_text("a photo of a pizza\n")
    assert cli(tiny, "--task", "orm", "--num-prompts", "2", "--samples", "3", "--exclude", str(tests),
               "--out", str(tmp_path / "orm")) == 0
    orm = json.loads((tmp_path / "orm" / "orm.json").read_text())
    assert len(orm) == 6 and all((tmp_path / "orm" / r["image"]).is_file() for r in orm)
    assert "a photo of a pizza" not in {r["prompt"] for r in orm} and not (tmp_path / "orm" / ".parts").exists()
    assert {r["conversations"][1]["value"] for r in orm} <= {"yes", "no"}
    assert cli(tiny, "--task", "orm", "--num-prompts", "2", "--samples", "3", "--exclude", str(tests),
               "--out", str(tmp_path / "orm"), "--resume") == 0              # already complete: nothing to do
    with pytest.raises(SystemExit):
        cli(tiny, "--task", "orm", "--num-prompts", "2", "--out", str(tmp_path / "orm"))
    assert "already holds a curate run" in capsys.readouterr().err

    assert cli(tiny, "--task", "prm", "--num-prompts", "1", "--steps", "4", "--rollouts", "2",
               "--out", str(tmp_path / "prm")) == 0
    assert cli(tiny, "--task", "parm", "--num-prompts", "1", "--samples", "1", "--out", str(tmp_path / "parm")) == 0
    parm = json.loads((tmp_path / "parm" / "parm.json").read_text())
    assert sorted({r["task"] for r in parm}) == ["clarity", "orm", "potential"] and len(parm) == 16 + 7 + 1
    assert cli(tiny, "--task", "reflect", "--num-prompts", "2", "--samples", "3", "--out", str(tmp_path / "refl")) == 0
    reflect = json.loads((tmp_path / "refl" / "reflect.json").read_text())
    for r in reflect:      # the contract train.py selfcorrect reads
        assert set(r) >= {"id", "image", "prompt", "label", "reason", "conversations"}
        assert r["conversations"][1]["value"] == ("yes" if r["label"] == "yes" else f"no. {r['reason']}")
        assert (r["reason"] is None) == (r["label"] == "yes")
    good, problems = data.read_reflect_records(tmp_path / "refl" / "reflect.json")
    assert not problems and len(good) == len(reflect)

    assert sft(tiny, "orm", tmp_path / "m1", tmp_path / "orm" / "orm.json", tmp_path / "prm" / "prm.json") == 0
    assert sft(tiny, "parm", tmp_path / "m2", tmp_path / "parm" / "parm.json", tmp_path / "refl" / "reflect.json",
               extra=("--labels", "answer")) == 0
    assert V.load_verifier(tmp_path / "m2").judge_orm([torch.zeros(3, 16, 16)], ["a photo of a cat"])[0].answer


def test_reflection_reasons_from_a_file(showo, tiny, tmp_path):
    model, tok, magvit = showo
    reasons = tmp_path / "reasons.jsonl"
    a = curate_args(task="reflect", samples=4, out=str(tmp_path), reasons=str(reasons))
    answers = lambda images, prompts: (torch.full((4,), 0.5), torch.tensor([True, False, False, True]))
    cur = train.Curate(a, model, tok, magvit, lambda j: answers, None)
    records, _ = cur.prompt_records(0, "a photo of two dogs")
    assert [r["reason"] for r in records] == [None] * 4          # no verifier text was asked for (it is None)

    reasons.write_text(json.dumps({"id": "reflect-p000000-k01", "reason": "There is only one dog."}) + "\n")
    with pytest.raises(data.DataError, match="reflect-p000000-k02"):
        cur.finish(json.loads(json.dumps(records)))
    with open(reasons, "a") as f:
        f.write(json.dumps({"image": "images/p000000/k02.png", "reason": "The dogs are cats."}) + "\n")
    out = cur.finish(json.loads(json.dumps(records)))
    assert [r["conversations"][1]["value"] for r in out] == ["yes", "no. There is only one dog.",
                                                             "no. The dogs are cats.", "yes"]
    assert train.strip_no("No, the dog is missing.") == "the dog is missing." and train.strip_no("nothing") == "nothing"


def test_bad_curate_flags_fail_clearly(tiny, tmp_path, capsys):
    for args, message in ((["--task", "orm", "--out", str(tmp_path)], "give the prompts"),
                          (["--task", "orm", "--num-prompts", "0", "--out", str(tmp_path)], "--num-prompts must be"),
                          (["--task", "orm", "--num-prompts", "2", "--reasons", "r.jsonl", "--out", str(tmp_path)],
                           "--task reflect only"),
                          (["--task", "orm", "--num-prompts", "2", "--orm-fraction", "2", "--out", str(tmp_path)],
                           "--orm-fraction")):
        with pytest.raises(SystemExit):
            cli(tiny, *args)
        assert message in capsys.readouterr().err


def test_an_interrupted_curation_continues_where_it_stopped(showo, tmp_path):
    model, tok, magvit = showo
    prompts = ["a photo of a cat", "a photo of two dogs", "a photo of a red apple"]
    run = lambda out, cls=train.Curate: cls(curate_args(task="orm", samples=2, out=str(out)), model, tok, magvit,
                                            lambda j: mean_scorer(0.0), None)(prompts)
    whole = json.loads(run(tmp_path / "whole").read_text())

    made = []

    class Interrupted(train.Curate):
        def prompt_records(self, j, prompt):
            made.append(j)
            if j == 2 and made.count(2) == 1:
                raise KeyboardInterrupt
            return super().prompt_records(j, prompt)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", Interrupted)
    assert sorted(p.name for p in (tmp_path / "split" / ".parts").iterdir()) == ["p000000.json", "p000001.json"]
    assert json.loads(run(tmp_path / "split", Interrupted).read_text()) == whole
    assert made == [0, 1, 2, 2]                       # the second run made only the missing prompt


def test_a_bad_reasons_file_stops_curation_before_any_image(tiny, tmp_path, capsys):
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"id": "reflect-p000000-k00"}\n')            # no reason
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        train.main(["curate", "--tiny", "--cache", cache_of(tiny), "--task", "reflect", "--num-prompts", "2",
                    "--reasons", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "r.jsonl line 1" in err and "non-empty reason" in err
    assert not out.exists() or not any(out.rglob("*.png"))
