"""The shapes world's verifier (train.py orm|parm --world): the untrained checkpoint the run writes and loads, the
world tokenizer, a micro run from scratch that resumes exactly, the held-out accuracies against an independent
count, and the flag combinations that stop before writing anything."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import train
import verifiers as V
from dpo import derive_seed

# three specs whose scenes differ, so a scene of one is a wrong image for the next
SPECS = [data.parse_prompt(p) for p in ("a photo of a red square", "a photo of two rings",
                                        "a photo of a circle left of a cross")]


def write_scenes(folder, name, n, seed):
    """n ground-truth images: scene i is a correct scene of SPECS[i % 3] or, every other image, of the next spec.
    Returns [(relative image path, prompt, the evaluator's (correct, reason))]."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        spec, drawn = SPECS[i % 3], SPECS[(i + i % 2) % 3]
        image = data.render(data.sample_scene(drawn, rng))
        rel = f"images/{name}{i}.png"
        data.save_png(image, folder / rel)
        out.append((rel, spec["prompt"], data.judge_prompt(image, spec["prompt"])))
    return out


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    """orm.json (8 records) and heldout.json (10 records, every task), both labelled by the world's evaluator."""
    folder = tmp_path_factory.mktemp("world")
    train_records = [data.llava_record(f"t{i}", rel, [V.orm_question(p), "yes" if ok else "no"])
                     for i, (rel, p, (ok, _)) in enumerate(write_scenes(folder, "t", 8, 0))]
    data.write_json(train_records, folder / "orm.json")
    questions = [lambda p: [V.orm_question(p)], lambda p: [V.prm_question(p)], lambda p: [V.clarity_question(p)],
                 lambda p: list(V.potential_question(p)), lambda p: [V.reflection_question(p)]]
    held = []
    for i, (rel, p, (ok, why)) in enumerate(write_scenes(folder, "h", 10, 1)):
        task = i % 5
        answer = ("yes" if ok else f"no. {why}") if task == 4 else "yes" if ok else "no"
        held.append(data.llava_record(f"h{i}", rel, [*questions[task](p), answer], task=train.HELDOUT_TASKS[task]))
    data.write_json(held, folder / "heldout.json")
    return folder


def micro(world_data, out, *more):
    return ["orm", "--world", "shapes", "--data", str(world_data / "orm.json"), "--device", "cpu", "--batch-size",
            "4", "--epochs", "2", "--out", str(out), *more]


def test_world_preset_sees_one_slot_per_patch():
    cfg = V.LlavaConfig.from_preset("world")
    assert cfg.vision.n_patches == data.SLOTS ** 2
    assert data.GRID * data.CELL_PX * cfg.vision.patch_size / cfg.vision.image_size == data.SLOT * data.CELL_PX


def test_untrained_world_verifier_round_trips(tmp_path):
    tok = V.world_tokenizer(["a photo of a red square"], ["a photo of two rings"], ["no. no ring"])
    init = train.world_verifier(tmp_path / "init", tok, seed=3)
    v = V.load_verifier(init)
    want = V.LlavaConfig.from_preset("world")
    want.vocab_size = want.n_vocab = tok.get_vocab_size(with_added_tokens=True)
    assert v.model.cfg == want
    assert json.loads((init / "config.json").read_text())["torch_dtype"] == "float32"
    model = V.new_llava(want, torch.Generator().manual_seed(derive_seed(3, "init")), 0.15)   # the same draw, anew
    got = dict(v.model.named_parameters())
    assert all(torch.equal(got[k], p) for k, p in model.named_parameters())
    assert float(got["lm.norm.weight"].detach().min()) == 1.0 and abs(got["lm.embed_tokens.weight"].detach().std().item() - 0.15) < 0.015
    image = data.render(data.sample_scene(SPECS[0], np.random.default_rng(0)))
    assert v.judge_orm([image], ["a photo of a red square"])[0].p_yes > 0      # it runs, on the world's images


def test_micro_world_orm_trains_resumes_exactly_and_scores_heldout(world_data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    held = str(world_data / "heldout.json")
    assert train.main(micro(world_data, a, "--heldout", held)) == 0
    assert train.main(micro(world_data, b, "--stop-after", "1")) == 0
    assert (b / "latest.json").is_file() and not (b / "config.json").exists()
    assert train.main(micro(world_data, b, "--resume")) == 0
    want, got = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    init = V.load_verifier(a / "init").model.state_dict()
    assert not all(torch.equal(init[k], v) for k, v in V.load_verifier(a).model.state_dict().items())  # it trained
    assert json.loads((a / "run.json").read_text())["train"]["lr"] == 1e-3       # the world's default

    # every word of the world's texts is one token: prompts (training and evaluation), questions, reasons
    tok = data.load_tokenizer(a / "init")
    texts = [data.eval_specs()[-1]["prompt"], "a photo of four archs", "no. the ring is left of and above the bar"]
    for text in texts + V.question_texts(["a photo of a purple triangle below a ring"]):
        pieces = tok.pre_tokenizer.pre_tokenize_str(text.replace(V.IMAGE_TOKEN, ""))
        assert len(tok.encode(text.replace(V.IMAGE_TOKEN, "")).ids) == len(pieces), text

    # held-out accuracy, counted independently: one record at a time, the answer's first word
    report = json.loads((a / "heldout.json").read_text())
    verifier, counts = V.load_verifier(a), {}
    for rec in json.loads((world_data / "heldout.json").read_text()):
        turns = [t["value"] for t in rec["conversations"]]
        judged = verifier.judge([data.load_image(world_data / rec["image"])], [turns[:-1]])[0].answer
        c = counts.setdefault(rec["task"], [0, 0])
        c[0] += judged == turns[-1].split(".")[0]
        c[1] += 1
    assert {t: [r["correct"], r["total"]] for t, r in report["tasks"].items()} == counts
    assert sorted(counts) == sorted(train.HELDOUT_TASKS)
    assert all(r["accuracy"] == r["correct"] / r["total"] for r in report["tasks"].values())
    assert "[heldout] orm: accuracy" in capsys.readouterr().err


def test_world_defaults_yield_to_flags():
    parse = lambda *args: train.build_parser().parse_args(["orm", "--data", "x", "--out", "o", *args])  # noqa
    for args, lr, vision_lr in ((["--world", "shapes"], 1e-3, 1e-3), ((), 1e-5, 2e-6),
                                (["--world", "shapes", "--lr", "3e-4"], 3e-4, 1e-3)):
        a = parse(*args)
        train.sft_defaults(a)
        assert (a.lr, a.vision_lr) == (lr, vision_lr), args


@pytest.mark.parametrize("args,message", [
    (["--base", "somewhere"], "--base somewhere not found or not a verifier folder"),
    (["--tiny"], "leave out --tiny"),
    (["--heldout", "missing.json"], "--heldout missing.json not found"),
    (["--lr", "0"], "--lr must be positive"),
])
def test_world_bad_flags_write_nothing(world_data, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        train.main(micro(world_data, tmp_path / "o", *args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_heldout_control_tells_a_verifier_that_looks_from_one_that_does_not(tmp_path):
    """The shuffled-image control: a judge that answers from the image loses accuracy when each question is
    shown another prompt's image; a judge that answers from the prompt alone does not. Records come two per
    prompt, as curated ones come in groups: the control must skip the group's other image, whose label is the same."""
    from types import SimpleNamespace

    import numpy as np

    import verifiers

    records = []
    for k in range(8):                       # bright image = "yes", dark = "no", alternating prompt by prompt
        path, yes = tmp_path / f"{k}.png", (k // 2) % 2 == 0
        data.save_png(np.full((8, 8, 3), 250 if yes else 5, dtype=np.uint8), path)
        rec = SimpleNamespace(image=path, turns=[verifiers.orm_question(f"a photo of {k // 2} things"), "?"])
        records.append((rec, "orm", "yes" if yes else "no"))
    said = lambda yes: verifiers.Judgment(float(yes), float(not yes), "yes" if yes else "no", 0, 1)  # noqa: E731

    class Looks:
        def judge(self, images, questions):
            return [said(np.asarray(im).mean() > 128) for im in images]

    class Guesses:
        def judge(self, images, questions):
            return [said(int(q[0].split("photo of ")[1].split()[0]) % 2 == 0) for q in questions]

    looks, guesses = train.heldout_accuracy(Looks(), records)["orm"], train.heldout_accuracy(Guesses(), records)["orm"]
    assert looks["accuracy"] == 1.0 and looks["shuffled_accuracy"] == 0.0    # the next prompt has the other label
    assert guesses["accuracy"] == 1.0 and guesses["shuffled_accuracy"] == 1.0


class LooksAtTheImage:
    """A judge that answers from the image alone: a bright image is "yes"."""

    def judge(self, images, questions):
        return [V.Judgment(float(yes), float(not yes), "yes" if yes else "no", 0, 1)
                for yes in (np.asarray(im).mean() > 128 for im in images)]


class AlwaysYes(LooksAtTheImage):
    def judge(self, images, questions):
        return super().judge([np.full((2, 2, 3), 255, dtype=np.uint8)] * len(questions), questions)


def test_clarity_control_shows_the_same_prompts_image_from_the_other_side_of_the_rule(tmp_path):
    """Clarity records of one prompt at several steps: the control shows the same question an image of the same
    prompt with the other label, so a judge that reads the image is right 1 - accuracy of the time there, and one
    that reads only the question (the same for every step) scores the share of its one answer both times."""
    from types import SimpleNamespace

    records = []
    for prompt in ("a photo of a ring", "a photo of two bars"):
        for step, clear in ((3, False), (5, False), (13, True), (16, True), (18, True)):
            path = tmp_path / f"{prompt[-4:]}{step}.png"
            data.save_png(np.full((8, 8, 3), 250 if clear else 5, dtype=np.uint8), path)
            rec = SimpleNamespace(image=path, turns=[V.clarity_question(prompt), "?"])
            records.append((rec, "clarity", "yes" if clear else "no"))
    assert [records[j][2] for j in train.other_image(records)] == (["yes"] * 2 + ["no"] * 3) * 2
    looks = train.heldout_accuracy(LooksAtTheImage(), records)["clarity"]
    guesses = train.heldout_accuracy(AlwaysYes(), records)["clarity"]
    assert (looks["accuracy"], looks["shuffled_accuracy"]) == (1.0, 0.0)
    assert (guesses["accuracy"], guesses["shuffled_accuracy"]) == (0.6, 0.6)


def test_clarity_counts_what_the_judge_says_at_each_step(tmp_path):
    """judged_yes_by_step reads each record's step from its curated id and counts [said yes, records] per step:
    here a judge that calls a step-5 image clear on one prompt of two, by hand; records without a step count nowhere."""
    from types import SimpleNamespace

    records = []
    for j, prompt in enumerate(("a photo of a ring", "a photo of two bars")):
        for step, bright in ((3, False), (5, j == 0), (13, True)):
            path = tmp_path / f"{j}-{step}.png"
            data.save_png(np.full((8, 8, 3), 250 if bright else 5, dtype=np.uint8), path)
            rec = SimpleNamespace(id=f"clarity-p{j:06d}-k00-s{step:02d}", image=path,
                                  turns=[V.clarity_question(prompt), "?"])
            records.append((rec, "clarity", "yes" if step > 10 else "no"))
    records.append((SimpleNamespace(id="elsewhere", image=path, turns=[V.clarity_question("a ring"), "?"]),
                    "clarity", "yes"))
    report = train.heldout_accuracy(LooksAtTheImage(), records)["clarity"]
    assert report["judged_yes_by_step"] == {"3": [0, 2], "5": [1, 2], "13": [2, 2]}
    assert report["total"] == 7 and report["correct"] == 6


def test_pair_ranking_by_hand():
    """Pairs are formed within one question only; ties count half; a question without both answers adds none."""
    judged = [("q1", "yes", 0.9), ("q1", "no", 0.2), ("q1", "no", 0.95), ("q2", "yes", 0.5), ("q2", "no", 0.5),
              ("q3", "yes", 0.1), ("q4", "no", 0.99)]
    assert train.pair_ranking(judged) == (1.5 / 3, 3)
    assert train.pair_ranking([("q", "yes", 0.3)]) == (None, 0)
