"""The searches' decisions (Sec. 3.2, 4, 5) with a scripted verifier: fixed answers per path and step."""
import pytest
import torch

import cotgen
import dpo


class Answer:
    def __init__(self, yes: bool, p_yes: float = None, p_no: float = None):
        self.answer = "yes" if yes else "no"
        self.is_yes = yes
        self.p_yes = p_yes if p_yes is not None else (0.9 if yes else 0.1)
        self.p_no = p_no if p_no is not None else 1.0 - self.p_yes


class ScriptedJudge(cotgen.Judge):
    """Answers from tables keyed by path (and step), and a log of every call, in place of the verifier."""

    def __init__(self, clear_from=None, potential=None, orm=None, prm=None, reflection=()):
        self.clear_from = clear_from or {}      # path -> first step (0-based) judged clear
        self.potential_table = potential or {}  # path -> (yes, p_no)
        self.orm_table = orm or {}              # path -> p_yes
        self.prm_table = prm or {}              # (path, step) -> p_yes
        self.reflection = list(reflection)      # answers of successive reflection evaluations
        self.calls = []
        self.tokens = 0

    @property
    def tokens_processed(self):
        return self.tokens

    def _log(self, task, images, who):
        assert images is None or images.shape[0] == len(who)
        self.calls.append((task, list(who)))
        self.tokens += 10 * len(who)

    def clarity(self, images, prompt, who):
        self._log("clarity", images, who)
        return [Answer(step >= self.clear_from.get(path, 99)) for path, step in who]

    def potential(self, prompt, who):
        self._log("potential", None, who)
        return [Answer(self.potential_table[p][0], p_no=self.potential_table[p][1]) for p, _ in who]

    def orm(self, images, prompt, who):
        self._log("orm", images, who)
        if isinstance(who[0][1], str):  # reflection evaluation
            return [Answer(self.reflection.pop(0))]
        return [Answer(True, p_yes=self.orm_table.get(p, 0.5)) for p, _ in who]

    def prm(self, images, prompt, who):
        self._log("prm", images, who)
        return [Answer(True, p_yes=self.prm_table.get(w, 0.5)) for w in who]

    def reflect(self, images, prompt, max_new_tokens):
        self._log("reflect", images, [None])
        return ["the apple is green, not red"]


@pytest.fixture(scope="module")
def models(tiny):
    model, tok = cotgen.load_showo(tiny["showo"])
    return model, tok, cotgen.load_magvit(tiny["magvit"])


PROMPT = "a photo of a red apple"


def run(search, models, judge, n=4, **kw):
    model, tok, magvit = models
    return search(model, tok, magvit, judge, PROMPT, n, steps=kw.pop("steps", 18), seed=3, **kw)


def plain(models, n=4, steps=18):
    model, tok, magvit = models
    return cotgen.decode_all(model, tok, magvit, PROMPT, n, steps=steps, seed=3).finals


def test_orm_keeps_highest_p_yes(models):
    judge = ScriptedJudge(orm={0: 0.2, 1: 0.7, 2: 0.9, 3: 0.9})
    r = run(cotgen.orm_search, models, judge)
    assert r.winner == 2  # ties go to the lower index
    assert judge.calls == [("orm", [(i, 18) for i in range(4)])]
    assert torch.equal(r.finals, plain(models))


def test_parm_truncates_exactly_the_paths_without_potential(models):
    judge = ScriptedJudge(clear_from={0: 7, 1: 7, 2: 9, 3: 7},
                          potential={0: (False, 0.8), 1: (True, 0.1), 2: (True, 0.3), 3: (False, 0.6)},
                          orm={1: 0.4, 2: 0.6})
    r = run(cotgen.parm_search, models, judge)
    assert r.pruned == [True, False, False, True]
    assert r.winner == 2 and r.trace["n_prime"] == 2
    # clarity is asked only while a path is not yet clear, potential once at the first clear step
    clarity_steps = {p: [s for task, who in judge.calls if task == "clarity" for (q, s) in who if q == p] for p in range(4)}
    assert clarity_steps[0] == list(range(8)) and clarity_steps[2] == list(range(10))
    assert [c for c in judge.calls if c[0] == "potential"] == [("potential", [(0, 7), (1, 7), (3, 7)]),
                                                               ("potential", [(2, 9)])]
    assert [c for c in judge.calls if c[0] == "orm"] == [("orm", [(1, 18), (2, 18)])]
    # one batched verifier call per task and step
    assert all(len({s for _, s in who}) == 1 for task, who in judge.calls)
    # truncated paths stopped after step 8 and ran nothing afterwards
    assert r.trace["paths"][0]["final_step"] == 8 and r.trace["paths"][3]["final_step"] == 8
    assert "truncated after step 8" in r.trace["paths"][0]["ended"]
    full = plain(models)
    assert torch.equal(r.finals[[1, 2]], full[[1, 2]])


def test_parm_without_potential_resumes_lowest_p_no(models):
    judge = ScriptedJudge(clear_from={0: 5, 1: 6, 2: 7}, potential={0: (False, 0.7), 1: (False, 0.2), 2: (False, 0.5)})
    r = run(cotgen.parm_search, models, judge)
    # path 3 never clear: p(no) counts as 1.0; path 1 has the lowest p(no) and was truncated at step 7
    assert r.trace["n_prime"] == 0 and r.winner == 1
    assert r.pruned == [True, True, True, False]
    assert "resumed" in r.trace["why"]
    assert torch.equal(r.codes, plain(models)[1])  # the image the untruncated path gives


def test_parm_truncation_saves_work(models):
    """Half the paths pruned at step 8 of 18: the counters show the saving against the released no-truncation loop."""
    judge_kw = dict(clear_from={i: 7 for i in range(4)},
                    potential={0: (False, 0.9), 1: (False, 0.9), 2: (True, 0.1), 3: (True, 0.2)}, orm={2: 0.5, 3: 0.6})
    cut = run(cotgen.parm_search, models, ScriptedJudge(**judge_kw))
    full = run(cotgen.parm_search, models, ScriptedJudge(**judge_kw), truncate=False)
    assert cut.winner == full.winner == 3
    c = models[0].config
    per_path_step = 2 * (c.num_vq_tokens + 2)  # cond + uncond image segments
    prefix = 2 * c.text_len
    assert full.trace["work"]["showo_token_forwards"] == prefix + 4 * 18 * per_path_step
    assert cut.trace["work"]["showo_token_forwards"] == prefix + (4 * 8 + 2 * 10) * per_path_step
    assert cut.trace["work"]["decodes"] == full.trace["work"]["decodes"] == 4 * 8 + 2


def test_prm_follows_the_most_confident_path(models):
    steps = 4
    prm = {(i, t): 0.1 for i in range(3) for t in range(steps)}
    prm.update({(2, 0): 0.9, (0, 1): 0.8, (1, 2): 0.7, (1, 3): 0.95})
    judge = ScriptedJudge(prm=prm)
    r = run(cotgen.prm_search, models, judge, n=3, steps=steps)
    assert r.trace["followed"] == [2, 0, 1, 1] and r.winner == 1
    # after re-branching from path 2 at step 0, every path holds path 2's tokens up to its own step-1 samples
    model, tok, magvit = models
    ref = cotgen.Paths(model, tok, PROMPT, 3, steps=steps, seed=3)
    ref.step()
    kept = ref.tokens[2] != model.config.mask_token_id
    assert int(kept.sum()) >= 1
    assert all(torch.equal(r.finals[i][kept], ref.x0[2][kept]) for i in range(3))


def test_paths_in_one_state_share_one_forward(models, monkeypatch):
    """PRM's re-branched paths hold one state, and so does every path at its first step (all masked): Show-o runs
    it once (a cond and an uncond row), not once per path. The work counter still counts a step per path, and the
    paths still draw their own samples."""
    model, tok, _ = models
    rows = []
    forward = model.image_logits
    monkeypatch.setattr(model, "image_logits", lambda seg, *a: rows.append(seg.shape[0]) or forward(seg, *a))
    steps, n = 4, 3
    r = run(cotgen.prm_search, models, ScriptedJudge(), n=n, steps=steps)
    assert rows == [2] * steps                               # one state a step: 2 rows, where it was 2 x 3
    per_path_step = 2 * (model.config.num_vq_tokens + 2)     # as test_parm_truncation_saves_work counts it
    assert r.trace["work"]["showo_token_forwards"] == 2 * model.config.text_len + n * steps * per_path_step
    assert len({tuple(f.tolist()) for f in r.finals}) > 1    # same state, own generators: the paths part again
    rows.clear()
    paths = cotgen.Paths(model, tok, PROMPT, n, steps=steps, seed=3)
    for _ in paths:
        pass
    assert rows == [2] + [2 * n] * (steps - 1)               # the first step shared, then each path's own


@pytest.mark.parametrize("answers,rounds_run", [([True], 0), ([False, True], 1), ([False, False, False, False], 3)])
def test_parm_plus_plus_stops_at_first_yes_and_after_three_rounds(models, answers, rounds_run):
    judge = ScriptedJudge(clear_from={i: 3 for i in range(2)}, potential={0: (True, 0.1), 1: (True, 0.2)},
                          orm={0: 0.3, 1: 0.8}, reflection=answers)
    r = run(cotgen.parm_plus_plus, models, judge, n=2, steps=6)
    refl = r.trace["reflections"]
    assert len(refl) == rounds_run + 1 and sum(1 for c in judge.calls if c[0] == "reflect") == rounds_run
    assert refl[-1]["stopped"] == ("reflection evaluation said yes" if answers[-1] else "3 rounds done")
    assert not judge.reflection  # every scripted answer consumed, none extra asked
    if rounds_run:
        assert refl[-1]["codes"] == r.codes.tolist()  # the last regenerated image is the result
        assert not torch.equal(r.codes, r.finals[1])  # regenerated from the prompt, the image and the reason


class ReflectingJudge(ScriptedJudge):
    def reflect(self, images, prompt, max_new_tokens):
        self._log("reflect", images, [None])
        return ["no. the apple is  green, not red"]       # the reflect data's answer format: "no. <reason>"


def test_parm_plus_plus_corrects_from_the_reason_the_generator_was_trained_on(models, monkeypatch):
    """The verifier answers "no. <reason>"; the self-correction data hold the reason alone (`train.py selfcorrect`
    on reflect.json), so the correction round is conditioned on the training text of that reason."""
    texts, real = [], cotgen.Paths

    def spy(model, tok, text, *args, **kw):
        texts.append(text)
        return real(model, tok, text, *args, **kw)

    monkeypatch.setattr(cotgen, "Paths", spy)
    judge = ReflectingJudge(clear_from={0: 3, 1: 3}, potential={0: (True, 0.1), 1: (True, 0.2)},
                            orm={0: 0.3, 1: 0.8}, reflection=[False, True])
    r = run(cotgen.parm_plus_plus, models, judge, n=2, steps=6)
    trained = dpo.correction_texts(dpo.CorrectionData([PROMPT], ["the apple is green, not red"], None, None, [""]))
    assert texts[-1] == trained[0] == PROMPT + "\nCorrection: the apple is green, not red"
    assert r.trace["reflections"][0]["reason"] == "no. the apple is  green, not red"   # the trace keeps the answer
    assert [cotgen.reflection_reason(a) for a in ("yes", "No. too red", "no.", " no square ")] == [
        "yes", "too red", "no.", "no square"]


def test_self_correction_layout_and_mask(models):
    model, tok, _ = models
    c = model.config
    prev = torch.arange(c.num_vq_tokens) % c.codebook_size
    ids = tok.t2i_ids([cotgen.self_correction_text(PROMPT, "too  green\n")], condition=prev[None])
    T, N = c.text_len, c.num_vq_tokens
    assert ids.shape[1] == T + 2 * (N + 2)
    assert ids[0, T] == tok.soi_id and torch.equal(ids[0, T + 1:T + 1 + N], prev + c.image_offset)
    assert ids[0, T + N + 1] == tok.eoi_id and ids[0, T + N + 2] == tok.soi_id
    assert "Correction: too green" in tok.tok.decode(ids[0, :T].tolist())
    a = cotgen.omni_attention_mask(ids, tok.pad_id, tok.soi_id, tok.eoi_id)[0, 0]
    first, second = T + 5, T + N + 5
    assert not a[first, second] and a[second, first] and a[second, T - 1] and a[first, T - 1]
    # the fast path (previous image cached as prefix) agrees with the full forward under this mask
    probs = [cotgen.Paths(model, tok, PROMPT, 2, condition=prev, fast=f).probs(
        torch.full((2, N), c.mask_token_id)) for f in (True, False)]
    torch.testing.assert_close(probs[0], probs[1], atol=1e-6, rtol=0)


def test_judge_rejects_unknown_decision():
    with pytest.raises(ValueError, match="greedy"):
        cotgen.Judge(object(), decide="vote")


# ---- sample.py with the searches ------------------------------------------------------------------------

import json

import sample


def run_cli(tiny, capsys, *args):
    """Run sample.py in-process; returns (exit code, stderr)."""
    cache = tiny["showo"].parent.parent.parent
    try:
        code = sample.main([*args, "--cache", str(cache)])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--orm", "--prm", "--parm", "--parm++"])
def test_searches_end_to_end_with_tiny_models(tiny, capsys, tmp_path, flag):
    out = tmp_path / "out"
    code, err = run_cli(tiny, capsys, "--tiny", "--prompt", PROMPT, flag, "--n", "3", "--steps", "4", "--out", str(out))
    assert code == 0, err
    assert {"image.png", "paths.png", "trace.json", "path_02.png"} <= {p.name for p in out.iterdir()}
    trace = json.loads((out / "trace.json").read_text())
    assert trace["strategy"] == flag.strip("-") and 0 <= trace["winner"] < 3 and trace["why"]
    assert trace["work"]["verifier_tokens"] > 0 and trace["work"]["showo_token_forwards"] > 0
    assert all(p["steps"] for p in trace["paths"])  # every path was judged at least once
    if flag == "--parm":
        assert "alive" in err and "judged clear" in err and "pruned" in err


def test_geneval_layout(tiny, capsys, tmp_path):
    meta = [{"tag": "single_object", "include": [{"class": "apple", "count": 1}], "prompt": "a photo of an apple"},
            {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"}]
    mfile = tmp_path / "evaluation_metadata.jsonl"
    mfile.write_text("".join(json.dumps(m) + "\n" for m in meta))
    pfile = tmp_path / "generation_prompts.txt"
    pfile.write_text("a photo of an apple\na photo of a red dog\n")
    out = tmp_path / "geneval"
    code, err = run_cli(tiny, capsys, "--tiny", "--metadata", str(mfile), "--check-prompts", str(pfile), "--orm",
                        "--n", "2", "--steps", "3", "--samples", "2", "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    for k, m in enumerate(meta):
        folder = out / f"{k:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == m
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]


@pytest.mark.parametrize("args,message", [
    (["--parm", "--n", "0"], "--n must be at least 1"),
    (["--orm", "--no-truncate"], "--no-truncate only applies"),
    (["--parm", "--rounds", "-1"], "--rounds must be 0 or more"),
])
def test_search_bad_flags_write_nothing(tiny, capsys, tmp_path, args, message):
    code, err = run_cli(tiny, capsys, "--tiny", "--prompt", PROMPT, "--out", str(tmp_path / "o"), *args)
    assert code == 2 and message in err and not (tmp_path / "o").exists()


def test_two_strategies_are_refused(tiny, capsys, tmp_path):
    code, err = run_cli(tiny, capsys, "--tiny", "--prompt", PROMPT, "--orm", "--parm", "--out", str(tmp_path / "o"))
    assert code == 2 and "not allowed with argument" in err and not (tmp_path / "o").exists()


def test_missing_verifier_is_named_before_any_work(fixtures, capsys, tmp_path):
    _, _, fx = fixtures
    try:
        sample.main(["--prompt", PROMPT, "--parm", "--showo", str(fx / "showo"), "--magvit", str(fx / "magvitv2"),
                     "--verifier", str(tmp_path / "no-verifier"), "--out", str(tmp_path / "o")])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err
    assert "no verifier found" in err and "hf download ZiyuG/Image-Generation-CoT" in err and "--verifier" in err
    assert not (tmp_path / "o").exists()


def test_metadata_that_does_not_match_the_prompts(tiny, capsys, tmp_path):
    mfile = tmp_path / "m.jsonl"
    mfile.write_text(json.dumps({"prompt": "a photo of a cat"}) + "\n" + json.dumps({"prompt": "a photo of a dog"}) + "\n")
    pfile = tmp_path / "p.txt"
    pfile.write_text("a photo of a cat\na photo of a bird\n")
    code, err = run_cli(tiny, capsys, "--tiny", "--metadata", str(mfile), "--check-prompts", str(pfile), "--parm",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "prompt 2 differs" in err and not (tmp_path / "o").exists()
    mfile.write_text("{not json\n")
    code, err = run_cli(tiny, capsys, "--tiny", "--metadata", str(mfile), "--out", str(tmp_path / "o"))
    assert code == 2 and "line 1: not valid JSON" in err and not (tmp_path / "o").exists()
    (tmp_path / "empty.txt").write_text("\n")
    code, err = run_cli(tiny, capsys, "--tiny", "--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"))
    assert code == 2 and "holds no prompts" in err


def test_released_temperature_leak(models):
    """With the flag, paths after the first anneal from τ = 0 (pure confidence re-masking), as the released loop."""
    model, tok, magvit = models
    r = cotgen.decode_all(model, tok, magvit, PROMPT, 3, steps=6, seed=3, released_temperature=True)
    alone = [cotgen.Paths(model, tok, PROMPT, 1, steps=6, generators=[torch.Generator().manual_seed(3 + i)],
                          temperature=t) for i, t in enumerate((1.0, 0.0, 0.0))]
    for p in alone:
        for _ in p:
            pass
    assert all(torch.equal(r.finals[i], alone[i].final_tokens()[0]) for i in range(3))


def test_judge_keeps_only_the_turns_it_will_follow_up():
    class FakeVerifier:
        tokens_processed = 0

        def judge_clarity(self, images, prompts, **kw):
            return [Answer(True), Answer(False)], ["turn-of-path-4", "turn-of-path-7"]

        def judge_potential(self, turns, prompts, **kw):
            self.followed = list(turns)
            return [Answer(True) for _ in turns]

    v = FakeVerifier()
    judge = cotgen.Judge(v)
    judge.clarity(torch.zeros(2, 3, 8, 8), PROMPT, [(4, 2), (7, 2)])
    assert list(judge._turns) == [4]  # the "no" path's cache is not held
    judge.potential(PROMPT, [(4, 2)])
    assert v.followed == ["turn-of-path-4"] and not judge._turns


# ---- searches over recorded paths (PathRecord): the same search, bit for bit, with the live search's work ---------

class PixelJudge(ScriptedJudge):
    """Answers that depend on the image alone (a hash of its pixels), so that a search over recorded paths could
    only agree with the live one by being shown the same images."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    @staticmethod
    def score(image):
        return (int(abs(float(image.detach().double().sum())) * 1000) % 97) / 97

    def _answers(self, task, images, who):
        self._log(task, images, who)
        return [Answer(self.score(im) > 0.4, p_yes=self.score(im)) for im in images]

    def clarity(self, images, prompt, who):
        answers = self._answers("clarity", images, who)
        self.seen.update({path: a.p_yes for (path, _), a in zip(who, answers)})
        return answers

    def potential(self, prompt, who):
        self._log("potential", None, who)
        return [Answer(self.seen[p] > 0.6, p_no=1 - self.seen[p]) for p, _ in who]

    def orm(self, images, prompt, who):
        return self._answers("orm", images, who)

    def prm(self, images, prompt, who):
        return self._answers("prm", images, who)


@pytest.mark.parametrize("search", [cotgen.orm_search, cotgen.prm_search, cotgen.parm_search,
                                    cotgen.parm_plus_plus])
def test_a_search_over_recorded_paths_is_the_live_search(models, search):
    live_judge = PixelJudge()
    live = run(search, models, live_judge, n=4, steps=6)
    record = cotgen.PathRecord()
    run(cotgen.orm_search, models, PixelJudge(), n=6, steps=6, record=record)     # decodes paths 0-5 to the end
    recorded = len(record)
    judge = PixelJudge()
    again = run(search, models, judge, n=4, steps=6, record=record)
    assert again.winner == live.winner and torch.equal(again.codes, live.codes)
    assert again.trace == live.trace and judge.calls == live_judge.calls      # every judgment and the work counts
    assert torch.equal(again.finals, live.finals) and again.pruned == live.pruned
    if search in (cotgen.orm_search, cotgen.parm_search):
        assert len(record) == recorded                       # every step was replayed: nothing decoded again
    if search is cotgen.parm_search:
        assert any(live.pruned) and not all(live.pruned)     # the pixels decide: pruned paths stop mid-way
    if search is cotgen.prm_search:
        assert len(record) > recorded                        # re-branched paths leave the record: decoded live


@pytest.mark.parametrize("threads", [1, 2])
def test_a_path_decoded_alone_takes_the_steps_it_takes_beside_others(models, threads):
    """Why a row without a search may decode path 0 alone (train.evaluations): each path's x̂0 at every step is the
    same, bit for bit, whether it is decoded alone or as one of 6 paths in a batch, on one thread (as an
    evaluation worker) or two."""
    model, tok, _ = models
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = [step.x0 for step in cotgen.Paths(model, tok, PROMPT, 6, steps=8, seed=3)]
        for i in (0, 4):
            alone = [step.x0[0] for step in cotgen.Paths(model, tok, PROMPT, 1, steps=8, seed=3 + i)]
            assert all(torch.equal(a, b[i]) for a, b in zip(alone, batch))
    finally:
        torch.set_num_threads(before)


def test_a_replayed_step_leaves_the_generator_where_the_live_step_does(models):
    model, tok, _ = models
    record = cotgen.PathRecord()
    live = cotgen.Paths(model, tok, PROMPT, 3, steps=5, seed=8, record=record)
    for _ in live:
        pass
    replayed = cotgen.Paths(model, tok, PROMPT, 3, steps=5, seed=8, record=record)
    for _ in replayed:
        pass
    assert record.replayed == 15 and replayed.token_forwards == live.token_forwards
    for a, b in zip(live.generators, replayed.generators):
        assert torch.equal(a.get_state(), b.get_state())
    with pytest.raises(ValueError, match="seed"):
        cotgen.Paths(model, tok, PROMPT, 2, generators=[torch.Generator(), torch.Generator()], record=record)


def test_path_record_holds_copies_as_bytes_not_tensors():
    # a full evaluation records ~10^5 steps: as small tensors they fragmented the heap to 16 GB in one worker
    record = cotgen.PathRecord()
    x0, tokens = torch.arange(36), torch.arange(100, 136)
    record.put(("p", 0), x0, tokens, 7)
    x0 += 1                                                  # the record keeps the values it was given
    got = record.get(("p", 0))
    assert torch.equal(got[0], torch.arange(36)) and torch.equal(got[1], torch.arange(100, 136)) and got[2] == 7
    assert got[0].dtype == torch.long and record.replayed == 1 and record.get(("p", 1)) is None
    assert not any(torch.is_tensor(v) for entry in record._steps.values() for v in entry)
