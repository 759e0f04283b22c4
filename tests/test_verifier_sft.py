"""Fine-tuning the reward model (train.py orm / parm): which tokens carry the loss, the loss against the
inference path, learning rates and freezing, the saved lmms-lab folder, exact resume, and bad records."""
import json

import numpy as np
import pytest
import torch

import data
import train
import verifiers as V
from conftest import evaluate_sft

PROMPT = "a photo of a red apple"


@pytest.fixture(scope="module")
def verifier(tiny):
    return V.load_verifier(tiny["llava"])


def cache_of(tiny):
    return str(tiny["llava"].parents[1])        # tiny_checkpoints(cache) -> cache/<version>/llava


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def write_orm_data(folder, n=4, seed=0):
    """n random images with ORM conversations, answers alternating yes/no; returns the JSON path."""
    g = np.random.default_rng(seed)
    records = []
    for i in range(n):
        data.save_png(g.integers(0, 256, (32, 32, 3), dtype=np.uint8), folder / "images" / f"{i}.png")
        records.append(data.llava_record(f"r{i}", f"images/{i}.png", [V.orm_question(PROMPT), ("yes", "no")[i % 2]]))
    data.write_json(records, folder / "orm.json")
    return folder / "orm.json"


def examples_of(path, tok, rule="released"):
    records, problems = data.read_conversations(path)
    assert not problems
    ex, problems = V.encode_conversations(tok, records, rule)
    assert not problems
    return ex


# ---- labels and loss ------------------------------------------------------------------------------------


def test_answer_rule_labels_only_the_answers_and_their_im_end(verifier):
    tok = verifier.tokenizer
    turns = [*V.potential_question(PROMPT), "no"]
    ids, labels = V.sft_tokens(tok, turns, "answer")
    # the ids are what the verifier reads at inference, followed by the last answer
    assert ids == V.tokenize_chat(tok, turns[:3]) + enc(tok, "no<|im_end|>\n")
    kept = [i for i, y in enumerate(labels) if y != V.IGNORE]
    assert tok.decode([ids[i] for i in kept], skip_special_tokens=False) == "yes<|im_end|>no<|im_end|>"
    assert all(labels[i] == ids[i] for i in kept)
    # each labelled run starts right after an "<|im_start|>assistant\n" header
    header = enc(tok, "<|im_start|>assistant\n")
    first_answer = len(V.tokenize_chat(tok, turns[:1]))
    assert ids[first_answer - len(header):first_answer] == header and kept[0] == first_answer


def test_released_rule_is_llava_next_preprocess_qwen(verifier):
    tok = verifier.tokenizer
    turns = [V.orm_question(PROMPT), "yes"]
    ids, labels = V.sft_tokens(tok, turns, "released")
    text = V.render_chat(turns[:1]) + "yes<|im_end|>\n"
    system_user = V.render_chat(turns[:1])[:-len("<|im_start|>assistant\n")]
    n_prompt = len(ids) - len(enc(tok, "<|im_start|>assistant\nyes<|im_end|>\n"))
    assert tok.decode([t for t in ids if t >= 0], skip_special_tokens=False) == text.replace("<image>", "")
    # the assistant turn, header and final newline included, is labelled whole
    assert labels[n_prompt:] == ids[n_prompt:]
    # before it only "\n", <|im_start|> and <|im_end|> are, wherever they stand (and all of them are)
    special = {tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>"), *enc(tok, "\n")}
    assert all((y != V.IGNORE) == (t in special) for t, y in zip(ids[:n_prompt], labels[:n_prompt]))
    assert sum(t in special for t in ids[:n_prompt]) == system_user.count("\n") + 4   # 2 starts + 2 ends
    assert labels[ids.index(V.IMAGE_PLACEHOLDER)] == V.IGNORE


def test_sft_loss_equals_the_inference_path_cross_entropy(verifier):
    """Answer rule, one ORM answer: the loss is the mean of -log p("yes") at the answer position and
    -log p(<|im_end|>) after it, both read through the verifier's own KV-cached inference path."""
    tok, model = verifier.tokenizer, verifier.model
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids, labels = V.sft_tokens(tok, [V.orm_question(PROMPT), "yes"], "answer")
    with torch.no_grad():
        loss, stats = V.sft_loss(model, verifier.pixels([image]), [ids], [labels])
        h, _, cache, _ = verifier._prefill([image], [V.orm_question(PROMPT)], 2)
        first = model.lm.logits(h)[0].log_softmax(-1)[verifier.yes_id]
        second, _ = verifier._extend(cache, [[verifier.yes_id]])
        second = second[0].log_softmax(-1)[tok.token_to_id("<|im_end|>")]
    assert stats["tokens"] == 2
    assert abs(loss.item() - (-(first + second) / 2).item()) < 1e-4


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny):
    v = V.load_verifier(tiny["llava"])
    v.model.train()                   # layers are recomputed only while training (inference has no backward)
    ids, labels = V.sft_tokens(v.tokenizer, [V.orm_question(PROMPT), "no"])
    pixels = v.pixels([torch.zeros(3, 32, 32)])
    grads = []
    for on in (False, True):
        v.model.zero_grad()
        v.model.gradient_checkpointing = on
        loss, _ = V.sft_loss(v.model, pixels, [ids], [labels])
        loss.backward()
        grads.append((loss.item(), v.model.vision.encoder.layers[0].mlp.fc1.weight.grad.clone(),
                      v.model.lm.layers[0].self_attn.q_proj.weight.grad.clone()))
    v.model.gradient_checkpointing = False
    assert grads[0][0] == grads[1][0]
    assert torch.equal(grads[0][1], grads[1][1]) and torch.equal(grads[0][2], grads[1][2])
    assert "forward" not in v.model.lm.layers[0].__dict__


# ---- optimizer -------------------------------------------------------------------------------------------


def test_learning_rates_follow_the_released_groups_and_freezing(tiny, tmp_path):
    path = write_orm_data(tmp_path)
    v = V.load_verifier(tiny["llava"])
    cfg = train.TrainConfig.preset("sft", batch_size=2, warmup_ratio=0.0)
    trainer = train.sft_trainer(v, examples_of(path, v.tokenizer), cfg)
    trainer.train_step()
    rest, vision = trainer.optimizer.param_groups
    assert rest["lr"] == 1e-5 and vision["lr"] == 2e-6           # step 0 of a cosine without warm-up: the peak
    assert len(vision["params"]) == len(list(v.model.vision.parameters()))
    assert rest["weight_decay"] == 0.0 and trainer.max_grad_norm == 1.0

    frozen = V.load_verifier(tiny["llava"])
    before = {n: p.clone() for n, p in frozen.model.named_parameters()}
    trainer = train.sft_trainer(frozen, examples_of(path, frozen.tokenizer),
                                train.TrainConfig.preset("sft", batch_size=2, freeze_vision=True))
    trainer.train_step()
    trainer.train_step()
    changed = {n for n, p in frozen.model.named_parameters() if not torch.equal(p, before[n])}
    assert len(trainer.optimizer.param_groups) == 1
    assert not any(n.startswith("vision.") for n in changed) and "projector.linear_1.weight" in changed


# ---- the command: training lowers the loss, saves a loadable verifier, resumes exactly -----------------------


def test_orm_training_lowers_the_loss_and_the_saved_verifier_scores(tiny, tmp_path):
    path = write_orm_data(tmp_path / "data", n=4)
    base = V.load_verifier(tiny["llava"])
    ex = examples_of(path, base.tokenizer, "answer")
    before = evaluate_sft(base, ex)
    out = tmp_path / "orm_ft"
    assert train.main(["orm", "--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--data", str(path),
                       "--out", str(out), "--lr", "1e-3", "--vision-lr", "1e-4", "--batch-size", "2", "--epochs", "4",
                       "--save-dtype", "fp32", "--log-every", "4", "--labels", "answer"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= \
        {p.name for p in out.iterdir()} and (out / "vision_tower" / "config.json").is_file()
    assert not list(out.glob("ckpt-r*")) and not (out / train.LATEST).exists()
    tuned = V.load_verifier(out)
    after = evaluate_sft(tuned, ex)
    assert after < before - 0.5, (before, after)
    # it scores, and now answers as its training data says
    images = [data.load_image(i) for i in ex.images]
    judged = tuned.judge_orm(images, [PROMPT] * len(images))
    judged0 = base.judge_orm(images, [PROMPT] * len(images))
    right = lambda js: sum(j.p_yes if i % 2 == 0 else j.p_no for i, j in enumerate(js))
    assert right(judged) > right(judged0), ([j.p_yes for j in judged], [j.p_yes for j in judged0])
    # the saved config is the base's, with the dtype written
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava_qwen" and cfg["torch_dtype"] == "float32"


def test_resumed_training_equals_the_uninterrupted_run(tiny, tmp_path):
    path = write_orm_data(tmp_path / "data", n=6)
    common = ["orm", "--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--data", str(path), "--lr", "1e-3",
              "--batch-size", "2", "--save-dtype", "fp32", "--log-every", "10"]
    assert train.main(common + ["--out", str(tmp_path / "full")]) == 0
    assert train.main(common + ["--out", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert (tmp_path / "split" / train.LATEST).is_file() and not (tmp_path / "split" / "config.json").exists()
    with pytest.raises(SystemExit):       # continuing needs --resume
        train.main(common + ["--out", str(tmp_path / "split")])
    assert train.main(common + ["--out", str(tmp_path / "split"), "--resume"]) == 0
    a, b = V.load_verifier(tmp_path / "full"), V.load_verifier(tmp_path / "split")
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n


def test_save_verifier_shards_with_an_index(tiny, tmp_path, verifier):
    V.save_verifier(verifier.model, verifier.tokenizer, tmp_path / "v", tiny["llava"], dtype=torch.float32,
                    shard_bytes=200_000)
    index = json.loads((tmp_path / "v" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "v" / "model.safetensors").exists()
    again = V.load_verifier(tmp_path / "v")
    for (n, p), q in zip(verifier.model.named_parameters(), again.model.parameters()):
        assert torch.equal(p, q), n


# ---- bad records -------------------------------------------------------------------------------------------


def test_malformed_records_are_named_in_one_error(tiny, tmp_path, capsys):
    write_orm_data(tmp_path, n=1)
    good = data.llava_record("ok", "images/0.png", [V.orm_question(PROMPT), "yes"])
    bad = [
        dict(good, id="no-image-field", image=None),
        dict(good, id="missing-file", image="images/nope.png"),
        data.llava_record("no-placeholder", "images/0.png", ["Is this an apple?", "yes"]),
        data.llava_record("two-images", "images/0.png", ["<image> <image> apple?", "yes"]),
        {**good, "id": "wrong-roles", "conversations": [{"from": "gpt", "value": "yes"},
                                                         {"from": "human", "value": "<image> hi"}]},
        {**good, "id": "ends-with-human", "conversations": good["conversations"] + [{"from": "human", "value": "?"}]},
    ]
    path = tmp_path / "bad.json"
    data.write_json([good] + bad, path)
    records, problems = data.read_conversations(path)
    assert [r.id for r in records] == ["ok"] and len(problems) == len(bad)
    for rec, problem in zip(bad, problems):
        assert repr(rec["id"]) in problem, problem
    assert "not found" in problems[1] and "exactly one <image>" in problems[2] and "exactly one <image>" in problems[3]
    assert "must come from 'human'" in problems[4] and "gpt answer" in problems[5]
    with pytest.raises(SystemExit):
        train.main(["parm", "--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--data", str(path),
                    "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "6 unusable record(s)" in err and "'wrong-roles'" in err and "--skip-bad" in err
    assert not (tmp_path / "out" / "run.json").exists()       # nothing was started

    path.write_text("[{\"id\": 1,")
    with pytest.raises(data.DataError, match="not valid JSON"):
        data.read_conversations(path)


def test_an_undecodable_image_stops_the_run_before_step_one(tiny, tmp_path, capsys):
    path = write_orm_data(tmp_path, n=3)
    (tmp_path / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")       # exists, but is no image
    args = ["orm", "--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--data", str(path), "--batch-size", "1"]
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "1 unusable record(s)" in err and "(id 'r1')" in err and "cannot be decoded" in err
    assert not (tmp_path / "out").exists()
    assert train.main(args + ["--out", str(tmp_path / "skip"), "--skip-bad", "--log-every", "9"]) == 0
    assert "skipped 1 bad record(s)" in capsys.readouterr().err


def test_resume_without_a_run_interrupts_and_devices_say_so(tiny, tmp_path, capsys, monkeypatch):
    path = write_orm_data(tmp_path, n=2)
    args = ["orm", "--tiny", "--cache", cache_of(tiny), "--device", "cpu", "--data", str(path), "--batch-size", "1"]
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--out", str(tmp_path / "none"), "--resume"])
    assert e.value.code == 2 and "holds no orm run to continue" in capsys.readouterr().err

    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "train_step", interrupt)
    assert train.main(args + ["--out", str(tmp_path / "int")]) == 130
    err = capsys.readouterr().err
    assert "interrupted:" in err and "Traceback" not in err
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="no MPS"):
            data.parse_device("mps")
