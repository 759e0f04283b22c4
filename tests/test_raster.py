"""The raster-order generator (the paper's Table 4 in miniature): a LlamaGen-style mode of Show-o's classes, its
token-by-token paths under the searches' interface, its exact DPO likelihood, and its pretraining command."""
import json

import pytest
import torch
import torch.nn.functional as F
from test_search import ScriptedJudge

import cotgen
import data
import dpo

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def raster(tmp_path_factory):
    """A tiny raster generator at the shapes world's image sizes (36 tokens, 71 codes), random weights."""
    d = tmp_path_factory.mktemp("raster")
    c = cotgen.ShowoConfig.preset("tiny")
    c.order, c.codebook_size, c.num_vq_tokens = "raster", 71, 36
    cotgen.write_showo(d / "showo", d / "phi", cotgen.phi_style_tokenizer(data.tiny_corpus(), 400), c, seed=0)
    model, tok = cotgen.load_showo(d / "showo")
    return model, tok, d / "showo"


def random_codes(n, seed=0):
    return torch.randint(0, 71, (n, 36), generator=torch.Generator().manual_seed(seed))


def full_forward_mask(ids, tok):
    """The test's own raster mask: Show-o's omni-attention, cut to positions at or before the query."""
    L = ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return cotgen.omni_attention_mask(ids, tok.pad_id, tok.soi_id, tok.eoi_id) & causal


def test_config_says_which_generator(raster, tiny):
    _, _, folder = raster
    saved = json.loads((folder / "config.json").read_text())
    assert (saved["order"], saved["top_k"], saved["temperature"]) == ("raster", 0, 1.0)
    assert "order" not in json.loads((tiny["showo"] / "config.json").read_text())    # absent: masked
    assert cotgen.load_showo(tiny["showo"])[0].config.order == "masked"


def test_a_later_image_token_never_changes_an_earlier_positions_logits(raster, showo):
    model, tok, _ = raster
    codes = random_codes(1)
    ids = tok.t2i_ids([PROMPT], codes + model.config.image_offset)
    start = ids.shape[1] - 38                         # <|soi|>
    for n in (0, 17, 35):
        changed = ids.clone()
        changed[0, start + 1 + n] = model.config.image_offset + (codes[0, n] + 1) % 71
        with torch.no_grad():
            a, b = (model(x, tok.attention_mask(x)) for x in (ids, changed))
        assert torch.equal(a[:, :start + 1 + n], b[:, :start + 1 + n])               # before token n: unchanged
        assert not torch.equal(a[:, start + 1 + n:], b[:, start + 1 + n:])           # from it on: it is seen
    # the control: Show-o's masked mode sees the whole image segment from every image position
    model, tok = showo
    ids = tok.t2i_ids([PROMPT])
    changed = ids.clone()
    changed[0, -2] = model.config.image_offset
    with torch.no_grad():
        a, b = (model(x, tok.attention_mask(x)) for x in (ids, changed))
    assert not torch.equal(a[:, -10], b[:, -10])


def step_ends(steps, n=36):
    return [(s + 1) * n // steps for s in range(steps)]


def test_steps_are_groups_of_tokens_and_x0_is_the_partial_image(raster):
    model, tok, _ = raster
    paths = cotgen.open_paths(model, tok, PROMPT, 2, steps=18, seed=4)
    assert isinstance(paths, cotgen.RasterPaths)
    history = [step.x0 for step in paths]
    final = paths.final_tokens()
    for s, made in enumerate(step_ends(18)):
        assert made == 2 * (s + 1)
        assert torch.equal(history[s][:, :made], final[:, :made]) and not history[s][:, made:].any()
    assert paths.token_forwards == 2 * paths.key_ok.shape[1] - 2 * 36 + 2 * 2 * 36   # text once; a position a token


def test_stop_resume_batch_and_copy_state_give_the_same_images(raster):
    model, tok, _ = raster
    kw = dict(steps=5, top_k=20)
    whole = cotgen.RasterPaths(model, tok, PROMPT, 3, seed=7, **kw)
    for _ in whole:
        pass
    alone = [cotgen.generate(model, tok, PROMPT, 1, seed=7 + i, **kw)[0] for i in range(3)]
    assert torch.equal(whole.final_tokens(), torch.stack(alone))            # batched paths = one by one
    assert len({tuple(t.tolist()) for t in alone}) == 3

    stopped = cotgen.RasterPaths(model, tok, PROMPT, 3, seed=7, **kw)
    for step in stopped:
        if step.step[0] == 1:
            stopped.stop(1)
    assert stopped.step_of == [5, 2, 5]
    stopped.resume(1)
    assert [step.paths for step in stopped] == [[1]] * 3
    assert torch.equal(stopped.final_tokens(), whole.final_tokens())        # stop/resume: bit-identical

    # PRM's re-branching: a path continued from another's state with that path's generator state makes its image
    branched = cotgen.RasterPaths(model, tok, PROMPT, 2, seed=7, **kw)
    branched.step()
    branched.copy_state(0, 1)
    branched.generators[1].set_state(branched.generators[0].get_state())
    for _ in branched:
        pass
    assert torch.equal(branched.final_tokens()[1], whole.final_tokens()[0])


@pytest.mark.parametrize("temperature,top_k,cfg", [(1.0, 0, 1.75), (0.7, 5, 3.0), (1.0, 0, 0.0)])
def test_cached_step_distributions_equal_a_full_forward(raster, temperature, top_k, cfg):
    """Every token's distribution of the KV-cached sampler, recomputed from the final images by whole-sequence
    forwards of the cond and empty-prompt rows, with the guidance, temperature and top-k written out here."""
    model, tok, _ = raster
    paths = cotgen.RasterPaths(model, tok, PROMPT, 2, steps=4, cfg=cfg, temperature=temperature, top_k=top_k,
                               seed=1, keep_probs=True)
    got = torch.cat([step.probs for step in paths], 1)                         # [2, 36, K]
    images = paths.final_tokens() + model.config.image_offset
    with torch.no_grad():
        logits = [model(ids, full_forward_mask(ids, tok))[:, -38:-2, model.config.code_ids]
                  for ids in (tok.t2i_ids([PROMPT] * 2, images), tok.t2i_ids([""] * 2, images))]
    guided = (1 + cfg) * logits[0] - cfg * logits[1] if cfg else logits[0]
    guided = guided / temperature
    if top_k:
        guided[guided < guided.topk(top_k, dim=-1).values[..., -1:]] = -float("inf")
        assert ((got > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(got, torch.softmax(guided, -1), atol=1e-5, rtol=0)


def test_greedy_paths_take_the_most_likely_code(raster):
    model, tok, _ = raster
    paths = cotgen.RasterPaths(model, tok, PROMPT, 2, steps=3, temperature=[1.0, 0.0], seed=2, keep_probs=True)
    probs = torch.cat([step.probs for step in paths], 1)
    assert torch.equal(paths.final_tokens()[1], probs[1].argmax(-1))


def test_dpo_likelihood_is_the_exact_sum_of_next_token_log_probabilities(raster):
    """dpo's raster likelihood, against one forward per image token of the sequence cut just before it."""
    model, tok, _ = raster
    batch = dpo.PairBatch([PROMPT, "two blue squares"], random_codes(2, 1), random_codes(2, 2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        (pw, pl), (rw, rl), scored = dpo.pair_log_likelihoods(model, model, tok, batch, g)
    assert torch.equal(pw, rw) and torch.equal(pl, rl) and scored.tolist() == [36, 36]
    off = model.config.image_offset
    for got, codes in ((pw, batch.chosen), (pl, batch.rejected)):
        for b in range(2):
            ids = tok.t2i_ids([batch.prompts[b]], codes[b:b + 1] + off)
            soi = ids.shape[1] - 38
            want = 0.0
            for n in range(36):
                cut = ids[:, :soi + 1 + n]              # text, <|soi|>, tokens 0..n-1
                with torch.no_grad():
                    logits = model(cut, full_forward_mask(cut, tok))[0, -1]
                want += F.log_softmax(logits.double(), -1)[codes[b, n] + off].item()
            assert abs(got[b].item() - want) < 1e-3
    # the loss of DPO itself takes it (the masked estimate draws masks from g; the exact one draws nothing)
    loss, _ = dpo.preference_loss(model, model, tok, batch, g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state()) and loss.item() == pytest.approx(
        -F.logsigmoid(torch.tensor(0.0)).item())


def test_dpo_objective_on_a_raster_generator_samples_raster_paths_online(raster, monkeypatch):
    import math

    import train

    model, tok, _ = raster
    pairs = dpo.PairData([PROMPT, "two blue squares"], random_codes(2, 1), random_codes(2, 2), ["a", "b"])
    cfg = train.TrainConfig(reward_coef=1.0, online_per_step=1, online_samples=3, gen_steps=3)
    made = []
    monkeypatch.setattr(cotgen.RasterPaths, "step", lambda self, step=cotgen.RasterPaths.step: made.append(
        self.n) or step(self))
    score = lambda images, prompts: (torch.arange(len(prompts), dtype=torch.float32), torch.ones(len(prompts)))  # noqa
    objective = train.dpo_objective(model, model, tok, pairs, cfg, magvit=data.QuadrantCodec(), score=score)
    g = torch.Generator().manual_seed(0)
    loss, stats = objective(0, [0, 1], g)
    assert made == [3] * 3 and stats["online_pairs"] == 1          # one prompt's 3 samples, 3 steps, as raster paths
    assert stats["dpo"] == pytest.approx(math.log(2)) and stats["online_dpo"] == pytest.approx(math.log(2))
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())   # no mask drawn


def test_searches_run_on_the_raster_generator(raster):
    model, tok, _ = raster
    codec = data.QuadrantCodec()
    run = lambda search, judge, **kw: search(model, tok, codec, judge, PROMPT, 4, steps=6, seed=3, **kw)  # noqa
    plain = cotgen.decode_all(model, tok, codec, PROMPT, 4, steps=6, seed=3)
    assert plain.history.shape == (4, 6, 36) and not plain.history[:, 0, 6:].any()

    orm = run(cotgen.orm_search, ScriptedJudge(orm={0: 0.2, 1: 0.7, 2: 0.9, 3: 0.1}))
    assert orm.winner == 2 and torch.equal(orm.finals, plain.finals)
    assert orm.trace["work"]["showo_token_forwards"] == plain.trace["work"]["showo_token_forwards"]

    prm = run(cotgen.prm_search, ScriptedJudge(prm={(1, t): 0.9 for t in range(6)}))
    assert prm.trace["followed"] == [1] * 6
    assert torch.equal(prm.finals[:, :6], plain.finals[1, :6].expand(4, 6))       # all re-branched from path 1

    judge = ScriptedJudge(clear_from={0: 2, 1: 2, 2: 4, 3: 1}, potential={0: (False, 0.8), 1: (True, 0.2),
                                                                          2: (True, 0.3), 3: (False, 0.6)},
                          orm={1: 0.4, 2: 0.6})
    parm = run(cotgen.parm_search, judge)
    assert parm.winner == 2 and parm.pruned == [True, False, False, True] and parm.trace["n_prime"] == 2
    assert parm.trace["clear_at"] == {0: 2, 1: 2, 2: 4, 3: 1}
    assert [p["final_step"] for p in parm.trace["paths"]] == [3, 6, 6, 2]
    assert torch.equal(parm.finals[0, :18], plain.finals[0, :18]) and not parm.finals[0, 18:].any()
    assert parm.trace["work"]["showo_token_forwards"] < plain.trace["work"]["showo_token_forwards"]
    with pytest.raises(ValueError, match="PARM\\+\\+ needs Show-o's masked generator"):
        cotgen.parm_plus_plus(model, tok, codec, judge, PROMPT, 4, steps=6)


def test_raster_paths_refuse_what_they_cannot_do(raster):
    model, tok, _ = raster
    with pytest.raises(ValueError, match="no conditioning image"):
        cotgen.RasterPaths(model, tok, PROMPT, 1, condition=random_codes(1)[0])
    with pytest.raises(ValueError, match="37 steps for 36 image tokens"):
        cotgen.RasterPaths(model, tok, PROMPT, 1, steps=37)


def test_an_unknown_order_in_config_json(raster, tmp_path):
    import shutil

    _, _, folder = raster
    shutil.copytree(folder, tmp_path / "showo")
    shutil.copytree(folder.parent / "phi", tmp_path / "phi")
    config = json.loads((tmp_path / "showo" / "config.json").read_text())
    (tmp_path / "showo" / "config.json").write_text(json.dumps({**config, "order": "diagonal"}))
    with pytest.raises(data.CheckpointError, match="field 'order' must be one of masked, raster"):
        cotgen.load_showo(tmp_path / "showo")


# ---- the commands ---------------------------------------------------------------------------------------------

MICRO = ["pretrain", "--world", "shapes", "--generator", "raster", "--n-embd", "32", "--n-layer", "1", "--n-head",
         "2", "--vocab", "120", "--scenes", "48", "--batch-size", "16", "--log-every", "10", "--device", "cpu",
         "--top-k", "7"]


def test_raster_pretraining_resumes_exactly_and_sample_detects_it(tmp_path, capsys, tiny):
    from safetensors.torch import load_file

    import sample
    import train

    assert train.main(MICRO + ["--out", str(tmp_path / "a")]) == 0
    assert train.main(MICRO + ["--out", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert train.main(MICRO + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    want, got = (load_file(tmp_path / run / "pytorch_model.safetensors") for run in ("a", "b"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    init = load_file(tmp_path / "a" / "init" / "pytorch_model.safetensors")
    assert not all(torch.equal(init[k], want[k]) for k in want)                     # it trained
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["order"], config["top_k"]) == ("raster", 7)

    out = tmp_path / "eval"
    assert sample.main(["--world", "shapes", "--eval", "--limit", "2", "--samples", "1", "--steps", "3", "--device",
                        "cpu", "--showo", str(tmp_path / "a"), "--out", str(out)]) == 0
    assert json.loads((out / "scores.json").read_text())["overall"]["total"] == 2
    for args, message in ((["--steps", "40"], "--steps 40: " + str(tmp_path / "a") + " is a raster generator"),
                          (["--parm++", "--verifier", str(tiny["llava"])], "PARM++ regenerates from a previous")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--world", "shapes", "--prompt", PROMPT, "--device", "cpu", "--showo", str(tmp_path / "a"),
                         "--out", str(tmp_path / "o")] + args)
        assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["--generator", "diagonal"], "invalid choice: 'diagonal'"),
    (["--generator", "masked"], "--top-k is a raster generator's sampling setting"),
    (["--temperature", "-1"], "--temperature must be at least 0"),
])
def test_raster_pretrain_bad_flags_write_nothing(tmp_path, capsys, args, message):
    import train

    with pytest.raises(SystemExit) as e:
        train.main(MICRO + ["--out", str(tmp_path / "o")] + args)
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_pretraining_length_defaults_by_generator(tmp_path, monkeypatch):
    """Without --scenes, Show-o pretrains on 57600 scenes and the raster generator on 38400 (2400 steps of 32, its
    time budget); an explicit --scenes wins for both."""
    import train

    class Painted(Exception):
        pass

    def paint(specs, n, seed, progress=None):
        raise Painted(n)

    monkeypatch.setattr(data, "training_scenes", paint)
    flags = [a for a in MICRO if a not in ("--scenes", "48", "--top-k", "7")]
    for generator, extra, want in (("raster", [], 38400), ("masked", [], 57600), ("raster", ["--scenes", "96"], 96)):
        argv = [a if a != "raster" else generator for a in flags] + extra + ["--out", str(tmp_path / f"{want}")]
        with pytest.raises(Painted) as e:
            train.main(argv)
        assert e.value.args == (want,)


def test_a_token_order_makes_the_image_left_to_right_top_to_bottom(tmp_path):
    """The world's tokenizer lays a slot's four quarters 9 apart; the raster generator makes them left to right,
    top to bottom over the image (token_order, saved in config.json): a step's x̂0 holds exactly the first tokens of
    that order, and DPO's exact likelihood sums the next-token log-probabilities in that order."""
    order = data.QuadrantCodec().raster_order
    assert order[:6] == [0, 9, 1, 10, 2, 11] and order[6:8] == [18, 27]    # the top row: slots 0-2, upper quarters
    c = cotgen.ShowoConfig.preset("tiny")
    c.order, c.codebook_size, c.num_vq_tokens, c.token_order = "raster", 71, 36, order
    cotgen.write_showo(tmp_path / "showo", tmp_path / "phi", cotgen.phi_style_tokenizer(data.tiny_corpus(), 400), c,
                       seed=0)
    ordered, otok = cotgen.load_showo(tmp_path / "showo")
    c = ordered.config
    assert ordered.config.token_order == order
    paths = cotgen.open_paths(ordered, otok, PROMPT, 2, steps=6, seed=4)
    history = [step.x0 for step in paths]
    final = paths.final_tokens()
    for s, made in enumerate(step_ends(6)):
        filled = torch.zeros(36, dtype=torch.bool)
        filled[order[:made]] = True
        assert torch.equal(history[s][:, filled], final[:, filled]) and not history[s][:, ~filled].any()
    codes = random_codes(1, 3)
    batch = dpo.PairBatch([PROMPT], codes, random_codes(1, 4))
    with torch.no_grad():
        (pw, _), _, _ = dpo.pair_log_likelihoods(ordered, ordered, otok, batch, torch.Generator())
    off, want = c.image_offset, 0.0
    ids = otok.t2i_ids([PROMPT], codes[:, order] + off)
    soi = ids.shape[1] - 38
    for n in range(36):
        cut = ids[:, :soi + 1 + n]
        with torch.no_grad():
            logits = ordered(cut, full_forward_mask(cut, otok))[0, -1]
        want += F.log_softmax(logits.double(), -1)[codes[0, order[n]] + off].item()
    assert abs(pw.item() - want) < 1e-3
    bad = json.loads((tmp_path / "showo" / "config.json").read_text())
    bad["token_order"] = list(range(35)) + [0]
    (tmp_path / "showo" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(data.CheckpointError, match="token_order"):
        cotgen.load_showo(tmp_path / "showo")
