"""Tests of the shapes world: evaluator verdicts on hand-built scenes, ground truth of the evaluation set, the
codec, the train/eval split and GenEval's wording."""
import itertools

import numpy as np
import pytest
import torch

import data

from data import Obj

def judge(objs, spec):
    return data.evaluate(data.render(objs), spec)

def spec(tag, classes, colors=(), count=1, relation=None):
    return data.make_spec(tag, classes, colors, count, relation)

# ---- the world ---------------------------------------------------------------------------------------------

def test_templates_distinct_and_connected():
    for a, b in itertools.combinations(data.SHAPE_NAMES, 2):
        assert data.best_iou(data.SHAPES[a], data.SHAPES[b]) <= 0.75, (a, b)
    for name, t in data.SHAPES.items():
        assert max(t.shape) <= 4 and len(data.components(t)) == 1, name
        assert data.classify(t) == (name, 1.0)

def test_background_colour_is_no_object_colour():
    assert len({tuple(c) for c in data.PALETTE}) == len(data.PALETTE)
    assert data.PALETTE_NAMES[0] == data.BACKGROUND and data.PALETTE_NAMES[1:] == data.GENEVAL_COLORS

# ---- evaluator: pass and fail per category -------------------------------------------------------------------

def test_single_object():
    s = spec("single_object", ["circle"])
    assert judge([Obj("circle", "red", 2, 2)], s) == (True, "")
    assert judge([Obj("circle", "red", 0, 0), Obj("square", "blue", 6, 6)], s)[0]   # extra objects are fine
    assert judge([Obj("square", "red", 2, 2)], s) == (False, "no circle")
    assert judge([], s) == (False, "no circle")

def test_two_object():
    s = spec("two_object", ["circle", "bar"])
    assert judge([Obj("circle", "red", 0, 0), Obj("bar", "red", 8, 5)], s)[0]
    assert judge([Obj("circle", "red", 0, 0)], s) == (False, "no bar")

def test_counting_exact():
    s = spec("counting", ["cross"], count=3)
    three = [Obj("cross", "red", 0, 0), Obj("cross", "blue", 0, 5), Obj("cross", "red", 5, 0)]
    assert judge(three, s) == (True, "")
    assert judge(three[:2], s) == (False, "2 crosses instead of 3")
    assert judge(three + [Obj("cross", "green", 5, 5)], s) == (False, "4 crosses instead of 3")
    assert judge(three + [Obj("square", "green", 5, 5)], s)[0]          # other classes are ignored
    assert judge([], s) == (False, "no cross instead of 3")

def test_counting_uses_strict_threshold():
    # a circle with one cell missing at the top is still a circle (IoU 11/12 > 0.9), one with two is not
    one, two = Obj("circle", "red", 0, 0), Obj("circle", "red", 0, 5)
    cells = data.paint([one, two, Obj("circle", "red", 5, 0)])
    assert data.judge_cells(cells, spec("counting", ["circle"], count=3))[0]
    cells[0, 6] = cells[1, 5] = 0        # damage the second circle by two cells: 10/12 < 0.9
    ok, reason = data.judge_cells(cells, spec("counting", ["circle"], count=3))
    assert not ok and reason == "2 circles instead of 3"
    assert data.judge_cells(cells, spec("two_object", ["circle", "square"]))[1] == "no square"

def test_colors():
    s = spec("colors", ["square"], ["blue"])
    assert judge([Obj("square", "blue", 3, 3)], s) == (True, "")
    assert judge([Obj("square", "green", 3, 3)], s) == (False, "the square is green, not blue")
    assert judge([Obj("circle", "blue", 3, 3)], s) == (False, "no square")

def test_colors_judges_top_ranked_instance():
    # equal scores and sizes: raster order (top first) decides which is the top-1 detection
    s = spec("colors", ["square"], ["blue"])
    assert judge([Obj("square", "blue", 0, 0), Obj("square", "red", 6, 6)], s)[0]
    assert not judge([Obj("square", "red", 0, 0), Obj("square", "blue", 6, 6)], s)[0]
    # an exact square outranks a damaged one whatever the order
    cells = data.paint([Obj("square", "red", 0, 0), Obj("square", "blue", 6, 6)])
    cells[0, 0] = 0
    assert data.judge_cells(cells, s)[0]

def test_color_attr():
    s = spec("color_attr", ["circle", "square"], ["red", "blue"])
    assert judge([Obj("circle", "red", 0, 0), Obj("square", "blue", 6, 6)], s) == (True, "")
    assert judge([Obj("circle", "blue", 0, 0), Obj("square", "red", 6, 6)], s) == \
        (False, "the circle is blue, not red; the square is red, not blue")
    assert judge([Obj("circle", "red", 0, 0)], s) == (False, "no square")

def test_position():
    s = spec("position", ["circle", "square"], relation="left of")
    assert s["include"][1] == {"class": "circle", "count": 1, "position": ["left of", 0]}
    assert judge([Obj("circle", "red", 3, 0), Obj("square", "blue", 3, 6)], s) == (True, "")
    assert judge([Obj("circle", "red", 3, 6), Obj("square", "blue", 3, 0)], s) == \
        (False, "the circle is right of the square")
    assert judge([Obj("circle", "red", 0, 3), Obj("square", "blue", 6, 3)], s) == \
        (False, "the circle is above the square")
    assert judge([Obj("square", "blue", 3, 6)], s) == (False, "no circle")
    assert judge([Obj("circle", "red", 3, 0)], s) == (False, "no square")

def test_position_margin():
    # box centres 4 px apart on x (3-cell square at col 0 vs 4-wide bar at col 0 three rows down):
    # margin 0.1*(24+32)=5.6 px > 4 px, so the shrunk x offset is 0; y decides: above, not left of
    square, bar = Obj("square", "red", 0, 0), Obj("bar", "blue", 5, 0)
    a, b = data.detect(data.paint([square, bar]))["square"][0], data.detect(data.paint([square, bar]))["bar"][0]
    assert data.relations(a, b) == ["above"]
    assert judge([square, bar], spec("position", ["square", "bar"], relation="left of")) == \
        (False, "the square is above the bar")
    # side by side but almost touching in x with a large offset in y is diagonal: both may hold
    assert set(data.relations(data.Detection("a", "red", 1, (0, 0, 8, 8), 1), data.Detection("b", "red", 1, (24, 24, 32, 32), 1))) \
        == {"left of", "above"}

def test_position_inside_margin_has_no_relation():
    a = data.Detection("square", "red", 1.0, (0, 0, 24, 24), 9)
    b = data.Detection("circle", "red", 1.0, (2, 1, 34, 33), 12)       # centres 5 px apart, margins 5.6 px
    assert data.relations(a, b) == []
    found_reason = data._check_include({"class": "square", "count": 1, "position": ["left of", 0]},
                                    {"square": [a], "circle": [b]}, [True], [{"class": "circle", "count": 1}])
    assert found_reason == "the square is too close to the circle to be left of it"

def test_touching_objects_of_different_colours_stay_apart():
    # no gap, different colours: still two components, two objects
    objs = [Obj("square", "red", 0, 0), Obj("square", "blue", 0, 3)]
    assert judge(objs, spec("counting", ["square"], count=2)) == (True, "")
    # the same two touching in one colour merge into one blob that is no square
    merged = [Obj("square", "red", 0, 0), Obj("square", "red", 0, 3)]
    assert not judge(merged, spec("single_object", ["square"]))[0]

def test_png_round_trip(tmp_path):
    objs = [Obj("triangle", "orange", 1, 1), Obj("ring", "white", 5, 5)]
    s = spec("color_attr", ["triangle", "ring"], ["orange", "white"])
    img = data.render(objs)
    data.save_png(img, tmp_path / "x.png")
    back = np.asarray(data.load_image(tmp_path / "x.png"))
    assert np.array_equal(back, img)
    assert data.evaluate(back, s) == data.evaluate(img, s) == (True, "")

def test_evaluator_tolerates_pixel_noise():
    rng = np.random.default_rng(0)
    objs = [Obj("cross", "pink", 2, 2), Obj("arch", "brown", 6, 5)]
    img = data.render(objs).astype(np.int32) + rng.integers(-25, 26, size=(120, 120, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    assert data.evaluate(img, spec("color_attr", ["cross", "arch"], ["pink", "brown"])) == (True, "")

# ---- the sets ------------------------------------------------------------------------------------------------

def test_evaluation_set_balanced_like_geneval():
    ev = data.eval_specs()
    prompts = {t: [s for s in ev if s["tag"] == t] for t in data.PROMPT_TEMPLATES}
    # hand-computed from GenEval's counts (80, 99, 80, 94, 100, 100 of 553) for 784 images and 7 shapes: single
    # object is every class; the others need ceil(share / 4) prompts, at most a third of their distinct prompts
    # (two objects 42, counting 21, colours 70, position 168, colour attribution 3780)
    assert {t: len(v) for t, v in prompts.items()} == {"single_object": 7, "two_object": 14, "counting": 7,
                                                       "colors": 23, "position": 36, "color_attr": 36}
    assert {t: {s["images"] for s in v} for t, v in prompts.items()} == {
        "single_object": {17}, "two_object": {11}, "counting": {17}, "colors": {6}, "position": {4},
        "color_attr": {4}}
    assert sum(s["images"] for s in ev) == 818 >= data.EVAL_IMAGES
    assert sorted(s["include"][0]["class"] for s in prompts["single_object"]) == sorted(data.SHAPE_NAMES)
    assert len({s["prompt"] for s in ev}) == len(ev)

def test_ground_truth_scenes_of_every_eval_prompt_pass():
    rng = np.random.default_rng(1)
    for s in data.eval_specs():
        for _ in range(3):
            objs = data.sample_scene(s, rng)
            img = data.render(objs)
            assert np.array_equal(data.snap_cells(img), data.paint(objs))
            assert data.evaluate(img, s) == (True, ""), s["prompt"]

def test_no_train_prompt_is_an_eval_prompt():
    ev = data.eval_specs()
    tr = data.train_specs(ev)
    assert not {data.prompt_key(s["prompt"]) for s in tr} & {data.prompt_key(s["prompt"]) for s in ev}
    assert len(tr) + len(ev) == len(data.training_prompts(None, objects=list(data.SHAPE_NAMES)))

def test_training_scenes_pass_their_prompt():
    rng = np.random.default_rng(2)
    tr = data.train_specs(data.eval_specs())
    for i in rng.choice(len(tr), 60, replace=False):
        assert data.evaluate(data.render(data.sample_scene(tr[i], rng)), tr[i])[0]

# ---- wording ---------------------------------------------------------------------------------------------------

def test_geneval_wording():
    assert spec("single_object", ["arch"])["prompt"] == "a photo of an arch"
    assert spec("two_object", ["circle", "arch"])["prompt"] == "a photo of a circle and an arch"
    assert spec("counting", ["cross"], count=3)["prompt"] == "a photo of three crosses"
    assert spec("counting", ["arch"], count=2)["prompt"] == "a photo of two archs"        # GenEval's naive plural
    assert spec("colors", ["circle"], ["orange"])["prompt"] == "a photo of an orange circle"
    assert spec("position", ["circle", "square"], relation="right of")["prompt"] == \
        "a photo of a circle right of a square"
    assert spec("color_attr", ["circle", "square"], ["red", "blue"])["prompt"] == \
        "a photo of a red circle and a blue square"

def test_geneval_metadata_form():
    c = spec("counting", ["bar"], count=4)
    assert list(c) == ["tag", "include", "exclude", "prompt"]
    assert c["include"] == [{"class": "bar", "count": 4}] and c["exclude"] == [{"class": "bar", "count": 5}]
    p = spec("position", ["bar", "ring"], relation="below")
    assert p["include"] == [{"class": "ring", "count": 1}, {"class": "bar", "count": 1, "position": ["below", 0]}]
    assert list(spec("colors", ["bar"], ["red"])) == ["tag", "include", "prompt"]

def test_prompts_agree_with_the_project_generator():
    for p in data.training_prompts(None, objects=list(data.SHAPE_NAMES)):
        assert data.parse_prompt(p)["prompt"] == p
    with pytest.raises(ValueError):
        data.parse_prompt("a photo of a dog")

# ---- codec -----------------------------------------------------------------------------------------------------

def to_pixels(im):
    return torch.from_numpy(im).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_codec_round_trip():
    codec = data.QuadrantCodec()
    assert codec.codebook_size == 1 + 7 * 10 and codec.tokens == 36
    codes = torch.randint(0, 71, (3, 36))
    pixels = codec.decode_code(codes)
    assert pixels.shape == (3, 3, 15 * 8, 15 * 8) and pixels.abs().max() <= 1
    again = codec.get_code(pixels)                  # what it decodes re-encodes to the same pixels
    assert torch.equal(codec.decode_code(again), pixels)
    whole = torch.randint(0, 71, (3, 9)).repeat(1, 4)   # four equal quarters per slot: the codes themselves
    assert torch.equal(codec.get_code(codec.decode_code(whole)), whole)
    rng = np.random.default_rng(4)
    tr = data.train_specs(data.eval_specs())
    for i in rng.choice(len(tr), 40, replace=False):        # exact on the world's scenes, through the pixels
        objs = data.sample_scene(tr[i], rng)
        img, codes = data.render(objs), codec.get_code(to_pixels(data.render(objs)))
        assert np.array_equal(data.to_uint8_image(codec.decode_code(codes))[0], img)
        assert all(codes[0, s] == codes[0, s + 9] == codes[0, s + 18] == codes[0, s + 27] for s in range(9))


def test_codec_decodes_to_the_hand_drawn_scene():
    # code 1 + shape * 10 + colour: ring = shape 5, blue = colour 4 -> 55; token q * 9 + s is quadrant q of slot s
    codes = torch.zeros(1, 36, dtype=torch.long)
    codes[0, [1, 10, 19, 28]] = 55                  # every quarter of slot 1: a whole blue ring
    codes[0, 8 + 27] = 1                            # only the bottom-right quarter of slot 8 (red square)
    img = data.to_uint8_image(data.QuadrantCodec().decode_code(codes))[0]
    want = np.full((15, 15, 3), (150, 150, 150), dtype=np.uint8)
    want[0:4, 5:9] = (40, 80, 220)
    want[1:3, 6:8] = (150, 150, 150)                # the ring's hole
    want[12, 12] = (220, 40, 40)                    # the square (3x3 at the slot's corner) has one cell there
    assert np.array_equal(img, np.repeat(np.repeat(want, 8, 0), 8, 1))


def test_codec_encodes_any_image_to_the_nearest_quarter():
    codec = data.QuadrantCodec()
    circle = 1 + 1 * 10 + 5                         # purple circle
    img = data.render([data.in_slot("circle", "purple", 0), data.in_slot("bar", "yellow", 7)])
    codes = codec.get_code(to_pixels(img))[0]
    assert codes[[0, 9, 18, 27]].tolist() == [circle] * 4 and codes[[7, 16, 25, 34]].tolist() == [1 + 42] * 4
    stray = img.copy()
    stray[32:40, 0:8] = data.PALETTE[1]             # a red cell in slot 0's free last row belongs to no token
    assert torch.equal(codec.get_code(to_pixels(stray))[0], codes)
    cut = img.copy()
    cut[0:16, 16:32] = data.PALETTE[0]              # the circle's top-right quarter erased: not a whole slot, so
    got = codec.get_code(to_pixels(cut))[0]         # each quarter its nearest: the erased one is empty
    assert got[9] == 0 and got[[0, 18, 27]].tolist() == [circle] * 3 and torch.equal(got[1:9], codes[1:9])


def test_a_step_image_mixing_quarters_of_two_objects_is_no_object():
    codec = data.QuadrantCodec()
    code = lambda shape, color: 1 + data.SHAPE_NAMES.index(shape) * 10 + data.GENEVAL_COLORS.index(color)  # noqa

    def slot4(*quarter_codes):                      # slot 4's four quarters: tokens 4, 13, 22, 31
        codes = torch.zeros(1, 36, dtype=torch.long)
        codes[0, [4, 13, 22, 31]] = torch.tensor(quarter_codes)
        return codec.decode_cells(codes)[0]

    cross, ring, green = code("cross", "red"), code("ring", "red"), code("cross", "green")
    for shape, c in (("cross", cross), ("ring", ring)):
        assert data.well_formed(slot4(c, c, c, c)) and data.judge_cells(slot4(c, c, c, c),
                                                                        spec("single_object", [shape]))[0]
    cross_over_ring = slot4(cross, cross, ring, ring)
    assert not data.well_formed(cross_over_ring)
    for shape in ("cross", "ring"):
        assert data.judge_cells(cross_over_ring, spec("single_object", [shape])) == (False, f"no {shape}")
    assert not data.well_formed(slot4(cross, cross, green, green))      # (the evaluator still sees a red cross
    assert not data.well_formed(np.zeros((15, 15), dtype=np.int64))    # short of a cell); no object: not whole


def test_ground_truth_objects_never_touch():
    rng = np.random.default_rng(3)
    for _ in range(50):
        objs = data.place([("square", "red")] * 4, rng)
        assert len(data.components(data.paint(objs) > 0)) == 4

# ---- table -------------------------------------------------------------------------------------------------------

def test_geneval_table():
    results = [("single_object", True)] * 9 + [("single_object", False)] + [("counting", False)] * 10
    for tag in ("two_object", "colors", "position", "color_attr"):
        results += [(tag, True), (tag, False)]
    table = data.geneval_table(results)
    assert table["single_object"].accuracy == 0.9 and table["counting"].accuracy == 0.0
    assert table["overall"].accuracy == pytest.approx((0.9 + 0 + 4 * 0.5) / 6)
    w = data.wilson(9, 10)
    assert w.low == pytest.approx(0.5958, abs=1e-3) and w.high == pytest.approx(0.9821, abs=1e-3)
    assert table["overall"].low < table["overall"].accuracy < table["overall"].high

# ---- the commands: pretraining from scratch and GenEval-style evaluation -------------------------------------

MICRO = ["pretrain", "--world", "shapes", "--n-embd", "32", "--n-layer", "1", "--n-head", "2", "--vocab", "120",
         "--scenes", "48", "--batch-size", "16", "--log-every", "10", "--device", "cpu"]


def test_micro_world_pretrains_resumes_exactly_and_is_scored(tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    import sample
    import train

    assert train.main(MICRO + ["--out", str(tmp_path / "a")]) == 0
    assert train.main(MICRO + ["--out", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert (tmp_path / "b" / "latest.json").is_file() and not (tmp_path / "b" / "config.json").exists()
    assert train.main(MICRO + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    want, got = (load_file(tmp_path / run / "pytorch_model.safetensors") for run in ("a", "b"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    init = load_file(tmp_path / "a" / "init" / "pytorch_model.safetensors")
    assert not all(torch.equal(init[k], want[k]) for k in want)                     # it trained
    assert json.loads((tmp_path / "a" / "config.json").read_text())["llm_model_path"] == "init/phi"

    out = tmp_path / "eval"
    assert sample.main(["--world", "shapes", "--eval", "--limit", "3", "--samples", "2", "--steps", "2", "--device",
                        "cpu", "--showo", str(tmp_path / "a"), "--out", str(out)]) == 0
    assert "| shapes world, none |" in capsys.readouterr().err
    specs = data.eval_specs()[:3]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00000", "00001", "00002"]
    assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == specs[1]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["tag"] for r in rows} == {s["tag"] for s in specs}
    for r in rows:              # each verdict is the evaluator's on the saved PNG
        image = np.asarray(data.load_image(out / r["filename"]))
        assert data.evaluate(image, specs[int(r["filename"][:5])]) == (r["correct"], r["reason"])
    scores = json.loads((out / "scores.json").read_text())
    assert scores["overall"]["total"] == 6 and 0 <= scores["overall"]["accuracy"] <= 1
    assert (out / "scores.md").read_text().startswith("| | single_object | two_object | counting |")
    assert (out / "grid.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["--n-embd", "30"], "--n-embd 30 must be a multiple of 4 x --n-head"),
    (["--scenes", "0"], "--scenes must be at least 1"),
    (["--lr", "nan"], "--lr must be positive"),
])
def test_pretrain_bad_flags_write_nothing(tmp_path, capsys, args, message):
    import train

    with pytest.raises(SystemExit) as e:
        train.main(MICRO + ["--out", str(tmp_path / "o")] + args)
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_eval_needs_a_world_and_its_generator(tmp_path, capsys, tiny):
    import sample

    for args, message in ((["--eval"], "add --world shapes"), (["--eval", "--world", "shapes"], "--showo DIR"),
                          (["--prompt", "a photo of a ring", "--limit", "2"], "--limit applies to --eval only"),
                          (["--eval", "--world", "shapes", "--showo", str(tiny["showo"])], "not the shapes world's")):
        with pytest.raises(SystemExit) as e:
            sample.main(args + ["--out", str(tmp_path / "o"), "--device", "cpu"])
        assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "o").exists()



# ---- paired differences (the claims table) ------------------------------------------------------------------------

def image_rows(tag, per_prompt, first_prompt=0):
    """results.jsonl rows: one list of 0/1 per prompt, one entry per image."""
    return [{"filename": f"{first_prompt + k:05d}/samples/{j:04d}.png", "tag": tag, "correct": bool(v)}
            for k, images in enumerate(per_prompt) for j, v in enumerate(images)]


def test_paired_difference_by_hand():
    # one tag, two prompts: A is right on prompt 0 only, B never: a draw picks each prompt twice (1/4), once each
    # (1/2) or prompt 0 twice (1/4), so the difference is 0, 0.5 or 1 and the 95 % interval is [0, 1]
    a, b = image_rows("colors", [[1], [0]]), image_rows("colors", [[0], [0]])
    d, low, high = data.paired_difference([(a, b)], draws=4000, seed=1)
    assert (d, low, high) == (0.5, 0.0, 1.0)
    # two tags with no spread between prompts: every draw is the point, averaged GenEval's way (per tag, then
    # the mean of the tags): colours +1, counting 0 -> overall +0.5, whatever the images per prompt
    a = image_rows("colors", [[1, 1], [1, 1], [1, 1]]) + image_rows("counting", [[1, 0, 0]] * 2, 3)
    b = image_rows("colors", [[0, 0], [0, 0], [0, 0]]) + image_rows("counting", [[0, 1, 0]] * 2, 3)
    assert data.paired_difference([(a, b)]) == (0.5, 0.5, 0.5)
    # pooled over seeds: the mean of the seeds' differences, prompts drawn once for every seed
    assert data.paired_difference([(a, b), (b, b)]) == (0.25, 0.25, 0.25)
    assert data.verdict_of(0.5, 0.5) == "holds" and data.verdict_of(-0.2, -0.1) == "reversed"
    assert data.verdict_of(0.0, 1.0) == "not separated"
    with pytest.raises(ValueError, match="same images"):
        data.paired_difference([(a, b[:-1])])


def test_paired_difference_is_a_prompt_bootstrap():
    """The interval of a difference spread over many prompts narrows like a bootstrap of prompt means: checked
    against the same bootstrap written out with a loop (an independent implementation)."""
    rng = np.random.default_rng(5)
    wins = rng.random((40, 4)) < 0.6
    a, b = image_rows("position", wins.astype(int).tolist()), image_rows("position", [[0] * 4] * 40)
    d, low, high = data.paired_difference([(a, b)], draws=2000, seed=3)
    means = []
    pick = np.random.default_rng(3).integers(40, size=(2000, 40))
    for draw in pick:
        means.append(wins[draw].mean())
    assert d == pytest.approx(wins.mean()) and (low, high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
