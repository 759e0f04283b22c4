"""The objectives on Show-o: Show-o's masked-token likelihood, DPO (Sec. 3.3) and iterative DPO's pair curation,
the reward-model guidance term (Sec. 3.4), and the self-correction loss of PARM++ (Sec. 5); on a raster generator
(cotgen.RasterPaths, the paper's Table 4) next-token prediction and DPO with the exact likelihood.

Each objective is a function from a batch to a loss; `train.py` holds the one trainer that optimises them.
The released DPO code is Show-o's `training/train_dpo.py` (from the paper's repository); "as released" below
refers to it. A verifier enters only as a plain callable, `score(images, prompts) -> (p_yes [k], is_yes [k])`
with images [k, 3, H, W] in [-1, 1] as MAGVIT-v2 decodes them, so tests can script it and the command line
wires in LLaVA-OneVision (`verifier_scorer`): this file never imports verifiers.py.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import cotgen
import data
from data import DataError

BETA = 0.1       # Sec. 3.3, as released
IGNORE = -100    # label of positions that are not scored

Scorer = Callable[[torch.Tensor, Sequence[str]], "tuple[torch.Tensor, torch.Tensor]"]

def derive_seed(*parts) -> int:
    """A 63-bit seed that depends on every part, so each (run seed, round, step, use) gets its own stream and
    a resumed run draws exactly what the uninterrupted one drew, without saving generator states."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1

# ---- 1. Show-o's masked-token likelihood, and the DPO loss -----------------------------------------------

def sample_masks(batch: int, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Show-o's training masks (`training/utils.py` mask_or_random_replace_tokens, as `train_dpo.py` calls it):
    per row t ~ U[0,1), k = max(1, round(N·cos(πt/2))) image tokens masked, at positions drawn uniformly
    without replacement. [batch, N] bool, exactly k per row."""
    t = torch.rand(batch, generator=generator)
    k = torch.clamp(torch.round(n_tokens * torch.cos(t * math.pi / 2)), min=1).long()
    order = torch.rand(batch, n_tokens, generator=generator).argsort(dim=1)   # a random permutation per row
    return order < k[:, None]

def training_sequences(tok: cotgen.ShowoTokenizer, prompts: Sequence[str], codes: torch.Tensor,
                       masked: torch.Tensor, drop_text: torch.Tensor,
                       condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One masked-prediction example per row (`train_dpo.py`, Show-o's `t2i_prompt`): the masked image slots hold
    [MASK]; a dropped text condition becomes the empty prompt. Returns ids [B, L] and labels [B, L]: the true
    code at every masked slot, the <|soi|>/<|eoi|> ids at their own positions (the released code scores them
    too), IGNORE elsewhere.

    `condition` [B, N] codes puts a previous image before the one being predicted (PARM++'s self-correction
    format, Sec. 5): it is input only, so its segment is never scored, and text dropout leaves it in place."""
    c = tok.config
    vocab = codes.cpu()[:, c.token_order or slice(None)] + c.image_offset     # in the order the generator makes them
    masked = masked.cpu()
    ids = tok.t2i_ids(["" if d else p for p, d in zip(prompts, drop_text.tolist())],
                      torch.where(masked, c.mask_token_id, vocab), condition=condition)
    labels = torch.full_like(ids, IGNORE)
    start = ids.shape[1] - (c.num_vq_tokens + 2)     # the predicted segment is always the last one
    labels[:, start] = tok.soi_id
    labels[:, start + 1:start + 1 + c.num_vq_tokens] = torch.where(masked, vocab, IGNORE)
    labels[:, -1] = tok.eoi_id
    return ids, labels

def next_token_sequences(tok: cotgen.ShowoTokenizer, prompts: Sequence[str], codes: torch.Tensor,
                         drop_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A raster generator's teacher forcing (LlamaGen's next-token prediction on Show-o's t2i layout): the whole
    image as input, nothing masked; the label of position i is the token at i + 1, placed where
    `image_log_likelihood` reads it (no shift there): <|soi|> predicts image token 0, token n predicts n + 1.
    Only the N image tokens are scored (the sampler stops after N, so <|eoi|> is never drawn). ids, labels [B, L]."""
    c = tok.config
    vocab = codes.cpu()[:, c.token_order or slice(None)] + c.image_offset     # in the order the generator makes them
    ids = tok.t2i_ids(["" if d else p for p, d in zip(prompts, drop_text.tolist())], vocab)
    labels = torch.full_like(ids, IGNORE)
    start = ids.shape[1] - (c.num_vq_tokens + 2)      # <|soi|>
    labels[:, start:start + c.num_vq_tokens] = vocab
    return ids, labels

def image_log_likelihood(model: cotgen.Showo, ids: torch.Tensor, labels: torch.Tensor,
                         allowed: torch.Tensor) -> torch.Tensor:
    """Sec. 3.3, log π(y|x) of an image under masked prediction (Show-o's mask-token-prediction objective,
    as `train_dpo.py` computes it): Σ_{i ∈ masked ∪ {soi, eoi}} log softmax(logits_i)[y_i], with the softmax over
    the full vocabulary and the logits of position i read at position i (no shift). A sum, not a mean. [B].
    With `next_token_sequences` and the raster mask: the exact Σ_n log p(y_n | x, y_<n) of a raster generator."""
    T = model.config.text_len
    logits = model(ids, allowed)[:, T:]                      # the text part is never scored
    target = labels[:, T:]
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(target.shape).sum(dim=1)

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = BETA) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 3.3, DPO (Rafailov et al. 2023, Eq. 7), per pair:
        L = −log σ(β·[(log πθ(y_w) − log πθ(y_l)) − (log π_ref(y_w) − log π_ref(y_l))]).
    Returns (L [B], the implicit reward margin β·[...] [B], detached)."""
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    return -F.logsigmoid(beta * z), (beta * z).detach()

@dataclass
class PairBatch:
    """Preference pairs as image codes (0..K-1): chosen y_w and rejected y_l for each prompt."""
    prompts: list[str]
    chosen: torch.Tensor    # [B, N] long
    rejected: torch.Tensor  # [B, N] long

def pair_log_likelihoods(policy: cotgen.Showo, reference: cotgen.Showo, tok: cotgen.ShowoTokenizer,
                         batch: PairBatch, generator: torch.Generator, *, shared_mask: bool = False,
                         cond_dropout: float = 0.1, rows: slice = slice(None)):
    """Sec. 3.3: log π(y_w), log π(y_l) under the policy (with gradient) and the frozen reference.

    As released, chosen and rejected get independent mask ratios, masked positions and text-dropout
    draws; policy and reference see the same inputs. `shared_mask` gives both sides one draw, which lowers the
    variance of the difference as Diffusion-DPO does by sharing its noise.
    `rows` picks the pairs this call computes (one process's share of a batch, README: Many GPUs): the draws are
    made for the whole batch, so a pair gets the same ones whichever process computes it.
    Returns ((πθ_w, πθ_l), (πref_w, πref_l)) of the pairs in `rows` and the scored positions of every y_w of the
    batch (the normaliser of the SFT term).

    A raster generator (the paper's Table 4) has its exact likelihood instead, Σ_n log p(y_n | x, y_<n) by teacher
    forcing: no draw at all, so no mask and no text dropout (the image's likelihood given its prompt). Show-o's is
    an estimate (Sec. 3.3): it scores only the masked tokens of one random draw, each predicted from the unmasked
    rest, so it differs from draw to draw and sums conditionals that are no factorisation of log π(y|x)."""
    B, N = batch.chosen.shape
    codes, prompts = torch.cat([batch.chosen, batch.rejected]), list(batch.prompts) * 2
    if policy.config.order == "raster":
        ids, labels = next_token_sequences(tok, prompts, codes, torch.zeros(2 * B, dtype=torch.bool))
    else:
        if shared_mask:
            masked = sample_masks(B, N, generator).repeat(2, 1)
            drop = (torch.rand(B, generator=generator) < cond_dropout).repeat(2)
        else:
            masked = sample_masks(2 * B, N, generator)
            drop = torch.rand(2 * B, generator=generator) < cond_dropout
        ids, labels = training_sequences(tok, prompts, codes, masked, drop)
    scored = (labels[:B] != IGNORE).sum(dim=1)
    mine = torch.arange(B)[rows]
    ids, labels, allowed = share(policy, tok, ids, labels, torch.cat((mine, B + mine)))
    logp = image_log_likelihood(policy, ids, labels, allowed)
    with torch.no_grad():
        logp_ref = image_log_likelihood(reference, ids, labels, allowed)
    return logp.chunk(2), logp_ref.chunk(2), scored.to(logp.device)

def share(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, ids: torch.Tensor, labels: torch.Tensor,
          pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows `pick` of a batch's sequences (a whole batch is taken as it is) on `model`'s device, and their
    attention mask: (ids, labels, allowed)."""
    if len(pick) < len(ids):
        ids, labels = ids[pick], labels[pick]
    device = model.embed_tokens.weight.device
    ids = ids.to(device)
    return ids, labels.to(device), tok.attention_mask(ids)

def preference_loss(policy: cotgen.Showo, reference: cotgen.Showo, tok: cotgen.ShowoTokenizer, batch: PairBatch,
                    generator: torch.Generator, *, beta: float = BETA, sft_coef: float = 0.0, shared_mask: bool = False,
                    cond_dropout: float = 0.1, online: PairBatch | None = None, reward_coef: float = 0.0,
                    rows: slice = slice(None)):
    """Sec. 3.3 (+ 3.4), the loss of one DPO step: L = mean L_DPO(y_w, y_l) + sft_coef·CE(y_w) per scored token
    (the released SFT term, weight 0 by default) + reward_coef·mean L_DPO(online best, online worst) when the
    reward model gave an `online` pair batch (`online_pairs`). The online pairs reuse the step's generator.
    With `rows` (one process's share, `pair_log_likelihoods`) the means are still over the whole batch, so the
    shares' losses and stats add up to the batch's.
    Returns (loss, stats: the DPO term, the implicit reward margin and the preference accuracy)."""
    kw = dict(shared_mask=shared_mask, cond_dropout=cond_dropout)
    (pw, pl), (rw, rl), scored = pair_log_likelihoods(policy, reference, tok, batch, generator, rows=rows, **kw)
    losses, margin = dpo_loss(pw, pl, rw, rl, beta)
    B = len(batch.prompts)
    loss = losses.sum() / B
    stats = {"dpo": loss.item(), "margin": float(margin.sum() / B), "accuracy": float((margin > 0).float().sum() / B)}
    if sft_coef:
        sft = -pw.sum() / scored.sum()
        loss = loss + sft_coef * sft
        stats["sft"] = sft.item()
    if reward_coef and online is not None:
        (ow, ol), (qw, ql), _ = pair_log_likelihoods(policy, reference, tok, online, generator, **kw)
        guide = dpo_loss(ow, ol, qw, ql, beta)[0].mean()
        loss = loss + reward_coef * guide
        stats["online_dpo"] = guide.item()
    stats["loss"] = loss.item()
    return loss, stats

def masked_log_likelihood(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, prompts: Sequence[str],
                          codes: torch.Tensor, generator: torch.Generator, cond_dropout: float = 0.1,
                          condition: torch.Tensor | None = None,
                          rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(codes | prompt [, condition]) under masked prediction with fresh training draws: a cosine-schedule
    fraction of each image masked (`sample_masks`), the prompt dropped with probability `cond_dropout`. Returns
    the log-likelihoods of the images in `rows` (all, by default; the draws are made for all, as in
    `pair_log_likelihoods`) and the number of scored positions of every image, [B]."""
    B, N = codes.shape
    masked = sample_masks(B, N, generator)
    drop = torch.rand(B, generator=generator) < cond_dropout
    ids, labels = training_sequences(tok, prompts, codes, masked, drop, condition=condition)
    scored = (labels != IGNORE).sum(dim=1)
    ids, labels, allowed = share(model, tok, ids, labels, torch.arange(B)[rows])
    logp = image_log_likelihood(model, ids, labels, allowed)
    return logp, scored.to(logp.device)

def masked_token_loss(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, prompts: Sequence[str], codes: torch.Tensor,
                      generator: torch.Generator, cond_dropout: float = 0.1, condition: torch.Tensor | None = None,
                      rows: slice = slice(None)) -> tuple[torch.Tensor, dict]:
    """Show-o's own objective (its `training/train.py`), for pretraining the generator: the cross-entropy per
    scored token (the masked ones and <|soi|>/<|eoi|>) under `masked_log_likelihood`'s draws, whose prompt
    dropout gives classifier-free guidance an unconditional model to subtract. With `rows` (one process's share)
    the loss is the share's part of the batch's: its tokens' cross-entropy over the batch's scored tokens."""
    logp, scored = masked_log_likelihood(model, tok, prompts, codes, generator, cond_dropout, condition, rows)
    loss = -logp.sum() / scored.sum()
    return loss, {"loss": loss.item()}

def next_token_loss(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, prompts: Sequence[str], codes: torch.Tensor,
                    generator: torch.Generator, cond_dropout: float = 0.1,
                    rows: slice = slice(None)) -> tuple[torch.Tensor, dict]:
    """A raster generator's pretraining objective (LlamaGen's, ours for the paper's Table 4): the cross-entropy
    per image token under teacher forcing (`next_token_sequences`), the prompt dropped with probability
    `cond_dropout` for classifier-free guidance. `rows`: as `masked_token_loss`."""
    B, N = codes.shape
    drop = torch.rand(B, generator=generator) < cond_dropout
    ids, labels, allowed = share(model, tok, *next_token_sequences(tok, prompts, codes, drop), torch.arange(B)[rows])
    loss = -image_log_likelihood(model, ids, labels, allowed).sum() / (B * N)
    return loss, {"loss": loss.item()}

# ---- 2. Preference pairs ---------------------------------------------------------------------------------

@dataclass
class PairData:
    """A round's training pairs as image codes, with where each came from (for messages and logs)."""
    prompts: list[str]
    chosen: torch.Tensor    # [P, N] long
    rejected: torch.Tensor  # [P, N] long
    source: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, index: Sequence[int]) -> PairBatch:
        i = torch.as_tensor(list(index), dtype=torch.long)
        return PairBatch([self.prompts[j] for j in index], self.chosen[i], self.rejected[i])

    def records(self) -> list[dict]:
        return [{"prompt": p, "chosen": w.tolist(), "rejected": l.tolist(), "source": s}
                for p, w, l, s in zip(self.prompts, self.chosen, self.rejected, self.source)]

def encode_images(images: Sequence[tuple[str, str | list]], config: cotgen.ShowoConfig,
                  magvit: cotgen.MAGVITv2 | None, image_root: str | os.PathLike, what: str, batch: int = 16,
                  progress: Callable[[str], None] | None = None) -> tuple[list[torch.Tensor | None], list[str]]:
    """Images as codes. Each item is (where, value): a token list is checked and used as it is; an image path
    (relative to `image_root`) is loaded, preprocessed as Show-o's `image_transform` and encoded with MAGVIT-v2,
    as the released DPO code does with its PNG paths (so a likelihood is that of encode(PNG), not of the
    tokens that made the image). Returns (codes [N] or None per item, problems "where: why")."""
    N, K = config.num_vq_tokens, config.codebook_size
    root = Path(image_root)
    codes: list[torch.Tensor | None] = [None] * len(images)
    problems: list[str] = []
    todo: list[int] = []
    for i, (where, v) in enumerate(images):
        if not isinstance(v, list):
            todo.append(i)
        elif len(v) != N or min(v) < 0 or max(v) >= K:
            problems.append(f"{where} must hold {N} image tokens in [0, {K}) (got {len(v)} in [{min(v)}, {max(v)}])")
        else:
            codes[i] = torch.tensor(v, dtype=torch.long)
    if todo and magvit is None:
        raise DataError(f"{what} names image files but no MAGVIT-v2 was given to encode them")
    for start in range(0, len(todo), batch):
        chunk, pixels = [], []
        for i in todo[start:start + batch]:
            try:
                image = data.load_image(root / images[i][1])
                pixels.append(cotgen.image_to_pixels(image, magvit.image_size(N)))
                chunk.append(i)
            except (FileNotFoundError, ValueError) as e:
                problems.append(f"{images[i][0]} {e}")
        if pixels:
            with torch.inference_mode():
                got = magvit.get_code(torch.cat(pixels).to(magvit.device)).cpu()
            for i, c in zip(chunk, got):
                codes[i] = c.clone()
        if progress is not None:
            progress(f"encoded {min(start + batch, len(todo))}/{len(todo)} images")
    return codes, problems

def encode_couples(couples: Sequence[tuple[tuple[str, str | list], tuple[str, str | list]]],
                   config: cotgen.ShowoConfig, magvit: cotgen.MAGVITv2 | None, image_root: str | os.PathLike, what: str,
                   same: Callable[[int], str], progress: Callable[[str], None] | None = None
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor, list[str]]:
    """Two images per record, `couples[r] = ((where, image), (where, image))`, as codes (`encode_images`). An
    image several records share (the same `where`: a "yes" image of reflect.json) is encoded once and its
    problem reported once. Returns (the usable records' indices, their first and their second images [P, N],
    problems); a record whose two images are the same tokens carries nothing to learn and gives the problem
    `same(r)`."""
    images: dict[str, str | list] = {}
    for couple in couples:
        for where, image in couple:
            images.setdefault(where, image)
    encoded, problems = encode_images(list(images.items()), config, magvit, image_root, what, progress=progress)
    codes = dict(zip(images, encoded))
    rows, first, second = [], [], []
    for r, ((wa, _), (wb, _)) in enumerate(couples):
        a, b = codes[wa], codes[wb]
        if a is None or b is None:
            continue
        if torch.equal(a, b):
            problems.append(same(r))
        else:
            rows.append(r)
            first.append(a)
            second.append(b)
    return rows, _stack(first, config), _stack(second, config), problems

def _stack(codes: list[torch.Tensor], config: cotgen.ShowoConfig) -> torch.Tensor:
    return torch.stack(codes) if codes else torch.empty(0, config.num_vq_tokens, dtype=torch.long)

def encode_pairs(records: Sequence[data.PairRecord], config: cotgen.ShowoConfig, magvit: cotgen.MAGVITv2 | None,
                 image_root: str | os.PathLike, where: str,
                 progress: Callable[[str], None] | None = None) -> tuple[PairData, list[str]]:
    """Preference records -> image codes. Returns (pairs, one "where line N: why" per unusable record)."""
    def side(rec: data.PairRecord, name: str) -> tuple[str, str | list]:
        value = getattr(rec, name)      # problems name a token list 'chosen', an image path chosen
        return f"{where} line {rec.line}: {repr(name) if isinstance(value, list) else name}", value

    def same(r: int) -> str:
        return (f"{where} line {records[r].line}: 'chosen' and 'rejected' are the same image tokens, so the pair "
                "carries no preference")

    couples = [(side(rec, "chosen"), side(rec, "rejected")) for rec in records]
    rows, chosen, rejected, problems = encode_couples(couples, config, magvit, image_root, where, same, progress)
    kept = [records[r] for r in rows]
    return PairData([rec.prompt for rec in kept], chosen, rejected, [f"{where}:{rec.line}" for rec in kept]), problems

def sample_images(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, magvit: cotgen.MAGVITv2, prompt: str, n: int,
                  seed: int, steps: int, cfg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of one prompt from `model` (Sec. 3.1 decoding, path i seeded with derive_seed(seed, i)).
    Returns (codes [n, N] as ordinary tensors usable in training, images [n, 3, H, W] in [-1, 1])."""
    was_training = model.training
    model.eval()
    dev = model.embed_tokens.weight.device
    gens = [torch.Generator(device=dev).manual_seed(derive_seed(seed, i)) for i in range(n)]
    with torch.autocast(dev.type, enabled=False):     # sampled as at inference, outside a trainer's autocast
        codes = cotgen.generate(model, tok, prompt, n, steps=steps, cfg=cfg, generators=gens)
        with torch.inference_mode():
            images = magvit.decode_code(codes)
    model.train(was_training)
    return codes.clone(), images.clone()    # clones outside inference mode: embeddings may save them for backward

def curate_pairs(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, magvit: cotgen.MAGVITv2, score: Scorer,
                 prompts: Sequence[str], n: int = 4, *, seed: int = 0, steps: int = 18, cfg: float = 1.75,
                 per_prompt: int = 1, progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Sec. 3.3, ranking data for DPO and for each round of iterative DPO: generate n images per prompt with
    `model`, label each yes/no with the verifier, and pair a random "yes" with a random "no" (the paper: one pair
    per prompt; `per_prompt` > 1 keeps up to that many different pairs, for a world with few prompts); prompts
    whose images all get the same label are dropped. Returns (records with token lists, counts)."""
    records, dropped = [], 0
    t0 = time.time()
    for j, prompt in enumerate(prompts):
        codes, images = sample_images(model, tok, magvit, prompt, n, derive_seed(seed, "curate", j), steps, cfg)
        p_yes, yes = score(images, [prompt] * n)
        yes = torch.as_tensor(yes, dtype=torch.bool).cpu().tolist()
        # every (yes, no) pair of different images, in a random order drawn from the prompt's own generator
        pairs = [(w, l) for w in range(n) for l in range(n)
                 if yes[w] and not yes[l] and not torch.equal(codes[w], codes[l])]
        g = torch.Generator().manual_seed(derive_seed(seed, "pair", j))
        chosen = [pairs[int(i)] for i in torch.randperm(len(pairs), generator=g)[:per_prompt]]
        dropped += not chosen
        records += [{"prompt": prompt, "chosen": codes[w].tolist(), "rejected": codes[l].tolist(),
                     "p_yes_chosen": float(p_yes[w]), "p_yes_rejected": float(p_yes[l])} for w, l in chosen]
        if progress is not None:
            progress(f"curate {j + 1}/{len(prompts)} prompts  {len(records)} pairs  {dropped} dropped (labels agree)"
                     f"  {time.time() - t0:.1f}s")
    return records, {"prompts": len(prompts), "pairs": len(records), "dropped": dropped}

def verifier_scorer(verifier, decide: str = "greedy", seed: int = 0) -> Scorer:
    """The LLaVA-OneVision ORM (verifiers.Verifier) as a scorer: P("yes") of the ORM question, and the decided
    answer (`decide="sample"` draws it as the released code does, from a generator seeded with `seed`)."""
    gen = torch.Generator(device=verifier.device).manual_seed(seed) if decide == "sample" else None

    def score(images: torch.Tensor, prompts: Sequence[str]):
        judged = verifier.judge_orm(list(images.float()), list(prompts), decide=decide, generator=gen)
        return torch.tensor([j.p_yes for j in judged]), torch.tensor([j.answer == "yes" for j in judged])

    return score

def evaluator_scorer() -> Scorer:
    """A miniature world's evaluator as a scorer, the automatic labeller in place of a reward model (README: The
    paper in miniature): P("yes") is 1 for an image the evaluator accepts, else 0, judged from the pixels."""
    def score(images: torch.Tensor, prompts: Sequence[str]):
        ok = [data.judge_prompt(im, p)[0] for im, p in zip(data.to_uint8_image(images.float()), prompts)]
        return torch.tensor(ok, dtype=torch.float32), torch.tensor(ok)

    return score

# ---- 3. Reward-model guidance (Sec. 3.4) -----------------------------------------------------------------

def online_pairs(policy: cotgen.Showo, tok: cotgen.ShowoTokenizer, magvit: cotgen.MAGVITv2, score: Scorer,
                 prompts: Sequence[str], samples: int, seed: int, steps: int,
                 cfg: float) -> tuple[PairBatch | None, dict]:
    """Sec. 3.4, the online half of DPO with reward-model guidance: for each prompt-only prompt, sample
    `samples` images from the current policy, score them with the reward model, and keep the best as y_w and
    the worst as y_l (a prompt whose samples all score the same gives no pair)."""
    kept, chosen, rejected, best, worst = [], [], [], [], []
    for j, prompt in enumerate(prompts):
        codes, images = sample_images(policy, tok, magvit, prompt, samples, derive_seed(seed, j), steps, cfg)
        with torch.autocast(images.device.type, enabled=False):
            p_yes = torch.as_tensor(score(images, [prompt] * samples)[0], dtype=torch.float32).cpu()
        hi, lo = int(p_yes.argmax()), int(p_yes.argmin())
        if p_yes[hi] > p_yes[lo] and not torch.equal(codes[hi], codes[lo]):
            kept.append(prompt)
            chosen.append(codes[hi].cpu())
            rejected.append(codes[lo].cpu())
            best.append(float(p_yes[hi]))
            worst.append(float(p_yes[lo]))
    stats = {"online_pairs": len(kept), "online_p_best": sum(best) / max(1, len(best)),
             "online_p_worst": sum(worst) / max(1, len(worst))}
    if not kept:
        return None, stats
    return PairBatch(kept, torch.stack(chosen), torch.stack(rejected)), stats

# ---- 4. Self-correction (Sec. 5, PARM++) -----------------------------------------------------------------

@dataclass
class CorrectionData:
    """Self-correction groups as image codes: prompt, reflection reason, low- and high-quality image."""
    prompts: list[str]
    reasons: list[str]
    low: torch.Tensor     # [G, N] long, the image to correct
    high: torch.Tensor    # [G, N] long, the image to learn to produce
    source: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, index: Sequence[int]) -> "CorrectionData":
        i = torch.as_tensor(list(index), dtype=torch.long)
        return CorrectionData([self.prompts[j] for j in index], [self.reasons[j] for j in index], self.low[i],
                              self.high[i], [self.source[j] for j in index])

    def records(self) -> list[dict]:
        """As explicit groups with token lists (data.read_correction_records reads them back)."""
        return [{"prompt": p, "low": l.tolist(), "reason": r, "high": h.tolist(), "source": s}
                for p, r, l, h, s in zip(self.prompts, self.reasons, self.low, self.high, self.source)]

def encode_groups(records: Sequence[data.CorrectionRecord], config: cotgen.ShowoConfig,
                  magvit: cotgen.MAGVITv2 | None, image_root: str | os.PathLike, what: str,
                  progress: Callable[[str], None] | None = None) -> tuple[CorrectionData, list[str]]:
    """Self-correction groups -> image codes. Returns (groups, one problem per unusable group or image)."""
    def same(r: int) -> str:
        return (f"{records[r].low_from} the low- and high-quality images are the same image tokens, so there is "
                "nothing to correct")

    couples = [((rec.low_from, rec.low), (rec.high_from, rec.high)) for rec in records]
    rows, low, high, problems = encode_couples(couples, config, magvit, image_root, what, same, progress)
    kept = [records[r] for r in rows]
    return CorrectionData([rec.prompt for rec in kept], [rec.reason for rec in kept], low, high,
                          [rec.low_from.rsplit(":", 1)[0] for rec in kept]), problems

def correction_texts(groups: CorrectionData) -> list[str]:
    return [cotgen.self_correction_text(p, r) for p, r in zip(groups.prompts, groups.reasons)]

def correction_sequences(tok: cotgen.ShowoTokenizer, groups: CorrectionData, masked: torch.Tensor,
                         drop_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 5, one self-correction example per group in PARM++'s input format (`cotgen.self_correction_text`):

        [PAD.. <|t2i|> bos "{prompt}\\nCorrection: {reason}" eos] <|soi|> low <|eoi|> <|soi|> high, masked <|eoi|>

    Only the second image is scored: its masked slots, its <|soi|> and its <|eoi|> (as Show-o's t2i loss and
    the DPO likelihood). The low-quality image is a given condition. Text dropout replaces prompt and reason
    by the empty prompt and keeps the low-quality image: the unconditional row of PARM++'s CFG."""
    return training_sequences(tok, correction_texts(groups), groups.high, masked, drop_text, condition=groups.low)

def correction_log_likelihood(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, groups: CorrectionData,
                              generator: torch.Generator, *, cond_dropout: float = 0.1
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 5: log π(high | prompt, reason, low) under masked prediction, in `correction_sequences`' format,
    and the number of scored positions. Both [G]."""
    return masked_log_likelihood(model, tok, correction_texts(groups), groups.high, generator, cond_dropout,
                                 condition=groups.low)

def self_correction_loss(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, groups: CorrectionData,
                         generator: torch.Generator, cond_dropout: float = 0.1,
                         rows: slice = slice(None)) -> tuple[torch.Tensor, dict]:
    """Sec. 5, the self-correction fine-tuning loss of PARM++: Show-o's masked-prediction cross-entropy per
    scored token on the high-quality image, given the prompt, the reason and the low-quality image (no
    reference model). `rows`: as `masked_token_loss`."""
    return masked_token_loss(model, tok, correction_texts(groups), groups.high, generator, cond_dropout,
                             condition=groups.low, rows=rows)
