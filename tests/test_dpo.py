"""DPO (Sec. 3.3), iterative DPO and reward-model guidance (Sec. 3.4): the loss against hand-computed values,
the masked likelihood against an explicit per-position sum, learning on fixed pairs, exact resume,
checkpoints that sample.py loads, curation, and bad data through the command line."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cotgen
import data
import dpo
import sample
import train


from conftest import fresh_showo as fresh, preference_stats


def random_pairs(n: int, seed: int = 0, N: int = 64, K: int = 64) -> dpo.PairData:
    g = torch.Generator().manual_seed(seed)
    prompts = ["a photo of a red apple", "a photo of two dogs", "a photo of a cat left of a bench"]
    return dpo.PairData([prompts[i % 3] for i in range(n)], torch.randint(0, K, (n, N), generator=g),
                        torch.randint(0, K, (n, N), generator=g), [f"test:{i}" for i in range(n)])


def brightness_scorer(images, prompts):
    """Scripted reward model: P(yes) grows with the image's mean; "dog" prompts always get yes, other prompts
    get yes for the brighter half of the batch."""
    p = torch.sigmoid(20 * images.float().mean(dim=(1, 2, 3)))
    if "dog" in prompts[0]:
        return p, torch.ones(len(p), dtype=torch.bool)
    return p, p >= p.median()


def cli(tiny, *args):
    cache = tiny["llava"].parents[1]                        # tiny_checkpoints(cache) -> cache/<version>/llava
    return train.main(["dpo", "--tiny", "--cache", str(cache), "--device", "cpu", *args])


def write_token_pairs(path, pairs: dpo.PairData):
    data.write_jsonl([{"prompt": p, "chosen": w.tolist(), "rejected": l.tolist()}
                      for p, w, l in zip(pairs.prompts, pairs.chosen, pairs.rejected)], path)


# ---- the loss and the likelihood ------------------------------------------------------------------------


def test_dpo_loss_matches_hand_computed_values():
    # row 0: z = (-10 - -12) - (-11 - -11.5) = 1.5;  row 1: z = (-21 - -19) - (-20 - -20) = -2
    loss, margin = dpo.dpo_loss(torch.tensor([-10.0, -21.0], dtype=torch.float64),
                                torch.tensor([-12.0, -19.0], dtype=torch.float64),
                                torch.tensor([-11.0, -20.0], dtype=torch.float64),
                                torch.tensor([-11.5, -20.0], dtype=torch.float64), beta=0.1)
    # -log sigmoid(0.15) = log(1 + e^-0.15), -log sigmoid(-0.2) = log(1 + e^0.2)
    assert abs(loss[0].item() - 0.6209570477895321) < 1e-6
    assert abs(loss[1].item() - 0.7981388693815917) < 1e-6
    assert torch.allclose(margin, torch.tensor([0.15, -0.2], dtype=torch.float64))
    assert dpo.BETA == 0.1


def test_masks_follow_the_cosine_schedule():
    g = torch.Generator().manual_seed(3)
    masked = dpo.sample_masks(500, 64, g)
    t = torch.rand(500, generator=torch.Generator().manual_seed(3))     # the same first draw
    k = [max(1, round(64 * math.cos(math.pi / 2 * x))) for x in t.tolist()]
    assert masked.sum(1).tolist() == k
    freq = masked.float().mean(0)                                       # positions drawn uniformly
    assert min(k) >= 1 and freq.max() - freq.min() < 0.2


def test_log_likelihood_sums_exactly_the_masked_positions_and_soi_eoi(showo):
    model, tok = showo
    c = model.config
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, c.codebook_size, (2, c.num_vq_tokens), generator=g)
    masked = torch.zeros(2, c.num_vq_tokens, dtype=torch.bool)
    masked[0, [0, 5, 17, 63]] = True
    masked[1, 30] = True
    ids, labels = dpo.training_sequences(tok, ["a photo of a red apple", "a photo of a dog"], codes, masked,
                                         torch.tensor([False, True]))
    T, off = c.text_len, c.image_offset
    assert torch.equal(ids[1, :T], tok.t2i_ids([""])[0, :T])             # dropped text = the empty prompt
    assert torch.equal(ids[0, :T], tok.t2i_ids(["a photo of a red apple"])[0, :T])
    image = ids[:, T + 1:T + 1 + c.num_vq_tokens]
    assert torch.equal(image == c.mask_token_id, masked)
    assert torch.equal(image[~masked], codes[~masked] + off)
    allowed = cotgen.omni_attention_mask(ids, tok.pad_id, tok.soi_id, tok.eoi_id)
    with torch.no_grad():
        got = dpo.image_log_likelihood(model, ids, labels, allowed)
        logp = torch.log_softmax(model(ids, allowed).double(), dim=-1)     # full vocabulary
    for b, slots in enumerate(([0, 5, 17, 63], [30])):
        want = logp[b, T, tok.soi_id] + logp[b, -1, tok.eoi_id]
        want += sum(logp[b, T + 1 + s, codes[b, s] + off] for s in slots)
        assert abs(got[b].item() - want.item()) < 1e-4
    assert ((labels != dpo.IGNORE).sum(1) == torch.tensor([4 + 2, 1 + 2])).all()


def test_chosen_and_rejected_masks_independent_or_shared(showo, monkeypatch):
    model, tok = showo
    seen = {}

    def spy(model_, ids, labels, allowed):
        seen.setdefault("labels", labels)
        return torch.zeros(ids.shape[0])

    monkeypatch.setattr(dpo, "image_log_likelihood", spy)
    for shared in (False, True):
        seen.clear()
        dpo.pair_log_likelihoods(model, model, tok, random_pairs(4).batch(range(4)), torch.Generator().manual_seed(1),
                                 shared_mask=shared, cond_dropout=0.0)
        scored = seen["labels"] != dpo.IGNORE
        assert torch.equal(scored[:4], scored[4:]) == shared


# ---- training --------------------------------------------------------------------------------------------


def test_short_run_raises_margin_and_accuracy_and_leaves_the_reference_alone(tiny, showo):
    _, tok = showo
    policy, reference = fresh(tiny), fresh(tiny)
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    pairs = random_pairs(8)
    before = preference_stats(policy, reference, tok, pairs)
    assert before == {"margin": 0.0, "accuracy": 0.0}                    # policy = reference
    cfg = train.TrainConfig(lr=1e-3, batch_size=4, epochs=4)
    trainer = train.Trainer(policy, train.dpo_objective(policy, reference, tok, pairs, cfg), pairs.source, cfg)
    assert train.fit(trainer, log_every=100)
    after = preference_stats(policy, reference, tok, pairs)
    assert after["margin"] > 0.2 and after["accuracy"] >= 0.75, after
    for k, v in reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert any(p.grad is not None for p in policy.parameters())


def test_lr_schedule_and_weight_decay_groups(showo):
    assert [train.lr_factor(s, 10, 2) for s in (0, 1, 2, 6, 10)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    assert train.lr_factor(0, 5, 0) == 1.0
    model, _ = showo
    opt = train.make_optimizer(model, train.TrainConfig())
    decay, no_decay = opt.param_groups
    names = {p: n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {names[p] for p in no_decay["params"]} == {n for n in names.values() if n.endswith("bias")}


def test_guidance_term_changes_the_update_and_pairs_best_with_worst(tiny, showo, magvit):
    _, tok = showo
    pairs = random_pairs(4)
    updates = {}
    for coef in (0.0, 0.1):
        policy = fresh(tiny)
        start = [p.detach().clone() for p in policy.parameters()]
        cfg = train.TrainConfig(lr=1e-3, batch_size=4, reward_coef=coef, online_per_step=1, online_samples=3,
                                gen_steps=2, warmup_ratio=0)
        objective = train.dpo_objective(policy, fresh(tiny), tok, pairs, cfg, magvit=magvit, score=brightness_scorer)
        trainer = train.Trainer(policy, objective, pairs.source, cfg)
        stats = trainer.train_step()
        updates[coef] = [p.detach() - s for p, s in zip(policy.parameters(), start)]
    assert stats["online_pairs"] == 1 and stats["online_p_best"] > stats["online_p_worst"]
    assert any(not torch.equal(a, b) for a, b in zip(updates[0.0], updates[0.1]))

    online, _ = dpo.online_pairs(fresh(tiny), tok, magvit, brightness_scorer, ["a photo of a cat"], 3, 7, 2, 1.75)
    codes, images = dpo.sample_images(fresh(tiny), tok, magvit, "a photo of a cat", 3, dpo.derive_seed(7, 0), 2, 1.75)
    p = brightness_scorer(images, ["a photo of a cat"] * 3)[0]
    assert torch.equal(online.chosen[0], codes[p.argmax()]) and torch.equal(online.rejected[0], codes[p.argmin()])


def test_curation_pairs_a_yes_with_a_no_and_drops_agreeing_prompts(tiny, showo, magvit):
    model, tok = showo
    prompts = ["a photo of a cat", "a photo of a dog", "a photo of a red apple"]
    records, stats = dpo.curate_pairs(model, tok, magvit, brightness_scorer, prompts, 4, seed=1, steps=2)
    assert stats == {"prompts": 3, "pairs": 2, "dropped": 1}
    assert [r["prompt"] for r in records] == ["a photo of a cat", "a photo of a red apple"]
    for r in records:          # the scorer labels the brighter half "yes": the chosen side is the brighter one
        with torch.no_grad():
            p, _ = brightness_scorer(magvit.decode_code(torch.tensor([r["chosen"], r["rejected"]])), [r["prompt"]] * 2)
        assert p.tolist() == pytest.approx([r["p_yes_chosen"], r["p_yes_rejected"]], abs=1e-6)
        assert p[0] > p[1]


def test_curation_keeps_up_to_k_different_yes_no_pairs_per_prompt(tiny, showo, magvit):
    model, tok = showo
    prompts = ["a photo of a cat", "a photo of a red apple"]
    for k in (2, 10):
        records, stats = dpo.curate_pairs(model, tok, magvit, brightness_scorer, prompts, 4, seed=1, steps=2,
                                          per_prompt=k)
        for j, prompt in enumerate(prompts):     # the prompt's 4 images again, labelled by the scorer itself
            codes, images = dpo.sample_images(model, tok, magvit, prompt, 4, dpo.derive_seed(1, "curate", j), 2, 1.75)
            yes = brightness_scorer(images, [prompt] * 4)[1].tolist()
            codes = [tuple(c) for c in codes.tolist()]
            possible = {(codes[w], codes[l]) for w in range(4) for l in range(4)
                        if yes[w] and not yes[l] and codes[w] != codes[l]}
            mine = [(tuple(r["chosen"]), tuple(r["rejected"])) for r in records if r["prompt"] == prompt]
            assert len(possible) >= 3 and len(mine) == len(set(mine)) == min(k, len(possible))
            assert set(mine) <= possible
        assert stats == {"prompts": 2, "pairs": len(records), "dropped": 0}


def test_checkpoint_reloads_in_sample_py_with_identical_logits(tiny, showo, tmp_path):
    _, tok = showo
    policy = fresh(tiny)
    pairs, cfg = random_pairs(4), train.TrainConfig(lr=1e-3, batch_size=2)
    train.fit(train.Trainer(policy, train.dpo_objective(policy, fresh(tiny), tok, pairs, cfg), pairs.source, cfg))
    out = tmp_path / "model"
    cotgen.save_showo(policy, out, tiny["showo"], tiny["phi"])
    again, tok2 = cotgen.load_showo(out)                      # phi found through config.json, as sample.py does
    ids = tok.t2i_ids(["a photo of a red apple", ""])
    allowed = cotgen.omni_attention_mask(ids, tok.pad_id, tok.soi_id, tok.eoi_id)
    policy.eval()
    with torch.no_grad():
        assert torch.equal(policy(ids, allowed), again(ids, allowed))
        assert not torch.equal(fresh(tiny)(ids, allowed), again(ids, allowed))
    assert sample.main(["--showo", str(out), "--magvit", str(tiny["magvit"]), "--prompt", "a photo of a dog",
                        "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "img")]) == 0
    assert (tmp_path / "img" / "image.png").is_file()


# ---- the command line: resume, rounds, bad data -----------------------------------------------------------


def final_weights(out):
    return load_file(out / "pytorch_model.safetensors")


def test_killed_and_resumed_run_ends_with_the_same_weights(tiny, tmp_path, monkeypatch):
    pairs = tmp_path / "pairs.jsonl"
    write_token_pairs(pairs, random_pairs(12, seed=5))
    common = ["--data", str(pairs), "--batch-size", "2", "--lr", "1e-3", "--shuffle", "--save-every", "2",
              "--log-every", "100"]
    assert cli(tiny, *common, "--out", str(tmp_path / "a")) == 0
    want = final_weights(tmp_path / "a")

    # a planned stop (--stop-after) in the middle of the epoch, then --resume
    assert cli(tiny, *common, "--out", str(tmp_path / "b"), "--stop-after", "3") == 0
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 3
    assert not (tmp_path / "b" / "pytorch_model.safetensors").exists()
    assert cli(tiny, *common, "--out", str(tmp_path / "b"), "--resume") == 0

    # a crash at step 5: the checkpoint of step 4 survives and the run continues from it
    real_step = train.Trainer.train_step

    def crash(self):
        if self.step == 5:
            raise RuntimeError("killed")
        return real_step(self)

    monkeypatch.setattr(train.Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="killed"):
        cli(tiny, *common, "--out", str(tmp_path / "c"))
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    assert json.loads((tmp_path / "c" / "latest.json").read_text())["step"] == 4
    assert cli(tiny, *common, "--out", str(tmp_path / "c"), "--resume") == 0

    for run in ("b", "c"):
        got = final_weights(tmp_path / run)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), run
    assert not list((tmp_path / "c").glob("ckpt-*")) and not (tmp_path / "c" / "latest.json").exists()


def test_resume_guards(tiny, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    write_token_pairs(pairs, random_pairs(4))
    assert cli(tiny, "--data", str(pairs), "--out", str(tmp_path / "o"), "--batch-size", "2", "--stop-after", "1") == 0
    with pytest.raises(SystemExit):
        cli(tiny, "--data", str(pairs), "--out", str(tmp_path / "o"), "--batch-size", "2")
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(tiny, "--data", str(pairs), "--out", str(tmp_path / "o"), "--batch-size", "4", "--resume")
    assert "train" in capsys.readouterr().err


def test_iterative_guided_rounds_start_from_and_reference_the_previous_round(tiny, tmp_path, monkeypatch):
    seen = []

    real_objective = train.dpo_objective

    def spy(policy, reference, *a, **kw):
        seen.append(({k: v.clone() for k, v in policy.state_dict().items()},
                     {k: v.clone() for k, v in reference.state_dict().items()}))
        return real_objective(policy, reference, *a, **kw)

    monkeypatch.setattr(train, "dpo_objective", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na photo of two dogs\n\na photo of a red apple\na photo of a bench\n")
    out = tmp_path / "it"
    assert cli(tiny, "--prompts", str(prompts), "--rounds", "2", "--out", str(out), "--gen-steps", "2",
               "--curate-samples", "3", "--batch-size", "2", "--lr", "1e-3", "--reward-coef", "0.1",
               "--online-per-step", "1", "--online-samples", "2", "--log-every", "100") == 0
    assert len(seen) == 2
    keys = cotgen.showo_key_map(fresh(tiny).config)
    round1 = {keys[k]: v for k, v in load_file(out / "round_1" / "model" / "pytorch_model.safetensors").items()}
    initial = fresh(tiny).state_dict()
    for state in seen[0]:
        assert all(torch.equal(state[k], initial[k]) for k in initial)
    for state in seen[1]:                                   # round 2: policy and reference = round 1's model
        assert all(torch.equal(state[k], round1[k]) for k in round1)
    assert not all(torch.equal(round1[k], initial[k]) for k in initial)
    for r in (1, 2):
        records, problems = data.read_pair_records(out / "round_{}".format(r) / "pairs.jsonl")
        assert records and not problems
    final = load_file(out / "pytorch_model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in load_file(out / "round_2/model/pytorch_model.safetensors").items())
    assert json.loads((out / "config.json").read_text())["llm_model_path"] == str(tiny["phi"].resolve())


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


BAD = {
    "missing image": ({"prompt": "a cat", "chosen": "a.png", "rejected": "nowhere.png"}, "nowhere.png not found"),
    "no rejected": ({"prompt": "a cat", "chosen": "a.png"}, "no 'rejected' field"),
    "unreadable image": ({"prompt": "a cat", "chosen": "broken.png", "rejected": "b.png"}, "cannot be decoded"),
    "same image": ({"prompt": "a cat", "chosen": "c.png", "rejected": "c.png"}, "same image"),
    "same tokens": ({"prompt": "a cat", "chosen": [1] * 64, "rejected": [1] * 64}, "same image"),
    "short token list": ({"prompt": "a cat", "chosen": [1] * 10, "rejected": [2] * 64}, "must hold 64 image tokens"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_stops_before_training_naming_the_line(tiny, images, capsys, case):
    record, why = BAD[case]
    good = {"prompt": "a photo of a dog", "chosen": "a.png", "rejected": "b.png"}
    path = images / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(SystemExit) as e:
        cli(tiny, "--data", str(path), "--out", str(images / "out"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{path} line 2" in err and why in err and "--skip-bad" in err
    assert "line 1" not in err and not (images / "out" / "pytorch_model.safetensors").exists()


def test_skip_bad_trains_on_the_good_records(tiny, images, capsys):
    path = images / "pairs.jsonl"
    lines = [{"prompt": "a photo of a dog", "chosen": "a.png", "rejected": "b.png"}, BAD["missing image"][0],
             {"prompt": "a photo of a cat", "chosen": "c.png", "rejected": "d.png"}, BAD["no rejected"][0]]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    assert cli(tiny, "--data", str(path), "--out", str(images / "out"), "--skip-bad", "--batch-size", "1") == 0
    assert "skipped 3 bad record(s)" in capsys.readouterr().err
    records, _ = data.read_pair_records(images / "out" / "round_1" / "pairs.jsonl")
    assert [r.prompt for r in records] == ["a photo of a dog", "a photo of a cat"]
    magvit = cotgen.load_magvit(tiny["magvit"])
    pixels = cotgen.image_to_pixels(data.load_image(images / "a.png"), 64)
    assert records[0].chosen == magvit.get_code(pixels)[0].tolist()      # encoded from the PNG, as released


def test_empty_and_missing_files(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for args, why in ((["--data", str(empty)], "is empty"), (["--data", str(tmp_path / "no.jsonl")], "not found"),
                      (["--prompts", str(empty)], "holds no prompts")):
        with pytest.raises(SystemExit):
            cli(tiny, *args, "--out", str(tmp_path / "out"))
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(tiny, "--out", str(tmp_path / "out"))
    assert "--data" in capsys.readouterr().err
