"""DPO for Show-o (Sec. 3.3), iterative DPO, DPO with reward-model guidance (Sec. 3.4), and the self-correction
fine-tuning of PARM++ (Sec. 5).

Read next to `../shared/reference/showo.md` §6 (the released `train_dpo.py`, cited as "ref §6.x"). Five parts:
  1. The likelihood of an image under Show-o's masked prediction, and the DPO loss.
  2. Preference pairs: records -> image tokens (MAGVIT-v2), and curation with a yes/no verifier.
  3. The online reward-model term of Sec. 3.4, with a gradient.
  4. Training: AdamW with cosine warm-up, and checkpoints that resume bit for bit.
  5. Self-correction fine-tuning for PARM++ (Sec. 5), on the same training machinery.

A verifier enters only as a plain callable, `score(images, prompts) -> (p_yes [k], is_yes [k])` with images
[k, 3, H, W] in [-1, 1] as MAGVIT decodes them, so the tests can script it and the CLI wires in LLaVA-OneVision
(`verifier_scorer`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import cotgen
import data
from data import DataError

BETA = 0.1       # Sec. 3.3 / ref §6.5
IGNORE = -100    # label of positions that are not scored

Scorer = Callable[[torch.Tensor, Sequence[str]], "tuple[torch.Tensor, torch.Tensor]"]


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends on every part, so each (run seed, round, step, use) gets its own stream and
    a resumed run draws exactly what the uninterrupted one drew, without saving generator states."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# ==========================================================================================================
# 1. Likelihood under masked prediction, and the DPO loss
# ==========================================================================================================


def sample_masks(batch: int, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Show-o's training masks (ref §6.3 steps 2-3): per row t ~ U[0,1), k = max(1, round(N·cos(πt/2))) image
    tokens masked, at positions drawn uniformly without replacement. [batch, N] bool, exactly k per row."""
    t = torch.rand(batch, generator=generator)
    k = torch.clamp(torch.round(n_tokens * torch.cos(t * math.pi / 2)), min=1).long()
    order = torch.rand(batch, n_tokens, generator=generator).argsort(dim=1)   # a random permutation per row
    return order < k[:, None]


def training_sequences(tok: cotgen.ShowoTokenizer, prompts: Sequence[str], codes: torch.Tensor,
                       masked: torch.Tensor, drop_text: torch.Tensor,
                       condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One masked-prediction example per row (ref §6.3 steps 4-5): the masked image slots hold [MASK]; a
    dropped text condition becomes the empty prompt. Returns ids [B, L] and labels [B, L]: the true code at
    every masked slot, the <|soi|>/<|eoi|> ids at their own positions (the released code scores them too),
    IGNORE elsewhere.

    `condition` [B, N] codes puts a previous image before the one being predicted (PARM++'s self-correction
    format, Sec. 5): it is input only, so its segment is never scored, and text dropout leaves it in place."""
    c = tok.config
    vocab = codes.cpu() + c.image_offset
    masked = masked.cpu()
    ids = tok.t2i_ids(["" if d else p for p, d in zip(prompts, drop_text.tolist())],
                      torch.where(masked, c.mask_token_id, vocab), condition=condition)
    labels = torch.full_like(ids, IGNORE)
    start = ids.shape[1] - (c.num_vq_tokens + 2)     # the predicted segment is always the last one
    labels[:, start] = tok.soi_id
    labels[:, start + 1:start + 1 + c.num_vq_tokens] = torch.where(masked, vocab, IGNORE)
    labels[:, -1] = tok.eoi_id
    return ids, labels


def image_log_likelihood(model: cotgen.Showo, ids: torch.Tensor, labels: torch.Tensor,
                         allowed: torch.Tensor) -> torch.Tensor:
    """Sec. 3.3, log π(y|x) of an image under masked prediction (Show-o's mask-token-prediction objective,
    ref §6.4): Σ_{i ∈ masked ∪ {soi, eoi}} log softmax(logits_i)[y_i], with the softmax over the full vocabulary
    and the logits of position i read at position i (no shift). A sum, not a mean. Returns [B]."""
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


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast with fp32 weights: the optimizer keeps fp32 master weights, as DeepSpeed's bf16 mode does
    for the released run (pure bf16 weights would round most lr=1e-5 updates away)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def pair_log_likelihoods(policy: cotgen.Showo, reference: cotgen.Showo, tok: cotgen.ShowoTokenizer,
                         batch: PairBatch, generator: torch.Generator, *, shared_mask: bool = False,
                         cond_dropout: float = 0.1, bf16: bool = False):
    """Sec. 3.3: log π(y_w), log π(y_l) under the policy (with gradient) and the frozen reference.

    As released (ref §6.3), chosen and rejected get independent mask ratios, masked positions and text-dropout
    draws; policy and reference see the same inputs. `shared_mask` gives both sides one draw, which lowers the
    variance of the difference as Diffusion-DPO does by sharing its noise.
    Returns ((πθ_w, πθ_l), (πref_w, πref_l), scored positions of y_w), each [B]."""
    B, N = batch.chosen.shape
    if shared_mask:
        masked = sample_masks(B, N, generator).repeat(2, 1)
        drop = (torch.rand(B, generator=generator) < cond_dropout).repeat(2)
    else:
        masked = sample_masks(2 * B, N, generator)
        drop = torch.rand(2 * B, generator=generator) < cond_dropout
    codes = torch.cat([batch.chosen, batch.rejected])
    ids, labels = training_sequences(tok, list(batch.prompts) * 2, codes, masked, drop)
    device = policy.embed_tokens.weight.device
    ids, labels = ids.to(device), labels.to(device)
    allowed = cotgen.omni_attention_mask(ids, tok.pad_id, tok.soi_id, tok.eoi_id)
    with autocast(device, bf16):
        logp = image_log_likelihood(policy, ids, labels, allowed)
        with torch.no_grad():
            logp_ref = image_log_likelihood(reference, ids, labels, allowed)
    scored = (labels[:B] != IGNORE).sum(dim=1)
    return logp.chunk(2), logp_ref.chunk(2), scored


# ==========================================================================================================
# 2. Preference pairs
# ==========================================================================================================


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


def magvit_resolution(magvit: cotgen.MAGVITv2, n_tokens: int) -> int:
    """Image side that MAGVIT-v2 turns into n_tokens codes (one downsampling per encoder level but the last)."""
    return math.isqrt(n_tokens) * 2 ** (len(magvit.config.enc_ch_mult) - 1)


def encode_images(images: Sequence[tuple[str, str | list]], config: cotgen.ShowoConfig,
                  magvit: cotgen.MAGVITv2 | None, image_root: str | os.PathLike, what: str, batch: int = 16,
                  progress: Callable[[str], None] | None = None) -> tuple[list[torch.Tensor | None], list[str]]:
    """Images as codes (ref §6.1). Each item is (where, value): a token list is checked and used as it is; an
    image path (relative to `image_root`) is loaded, preprocessed as ref §5.5 and encoded with MAGVIT-v2, as
    the released code does (so a likelihood is that of encode(PNG), not of the tokens that made the image).
    Returns (codes [N] or None per item, problems "where: why"); `what` names the source in errors."""
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
                pixels.append(cotgen.image_to_pixels(data.load_image(root / images[i][1]), magvit_resolution(magvit, N)))
                chunk.append(i)
            except (FileNotFoundError, ValueError) as e:
                problems.append(f"{images[i][0]} {e}")
        if pixels:
            dev = magvit.encoder.conv_in.weight.device
            with torch.inference_mode():
                got = magvit.get_code(torch.cat(pixels).to(dev)).cpu()
            for i, c in zip(chunk, got):
                codes[i] = c.clone()
        if progress is not None:
            progress(f"encoded {min(start + batch, len(todo))}/{len(todo)} images")
    return codes, problems


def encode_pairs(records: Sequence[data.PairRecord], config: cotgen.ShowoConfig, magvit: cotgen.MAGVITv2 | None,
                 image_root: str | os.PathLike, where: str, batch: int = 16,
                 progress: Callable[[str], None] | None = None) -> tuple[PairData, list[str]]:
    """Preference records -> image codes (`encode_images`). Returns (pairs, problems): every record that cannot
    be used gives one "where line N: why" problem."""
    items = []
    for rec in records:
        items += [(f"{where} line {rec.line}: {side!r}" if isinstance(getattr(rec, side), list)
                   else f"{where} line {rec.line}: {side}", getattr(rec, side)) for side in ("chosen", "rejected")]
    codes, problems = encode_images(items, config, magvit, image_root, where, batch, progress)
    keep = []
    for r, rec in enumerate(records):
        w, l = codes[2 * r], codes[2 * r + 1]
        if w is None or l is None:
            continue
        if torch.equal(w, l):
            problems.append(f"{where} line {rec.line}: 'chosen' and 'rejected' are the same image tokens, "
                            "so the pair carries no preference")
            continue
        keep.append(r)
    empty = torch.empty(0, config.num_vq_tokens, dtype=torch.long)
    return PairData(prompts=[records[r].prompt for r in keep],
                    chosen=torch.stack([codes[2 * r] for r in keep]) if keep else empty,
                    rejected=torch.stack([codes[2 * r + 1] for r in keep]) if keep else empty,
                    source=[f"{where}:{records[r].line}" for r in keep]), problems


def sample_images(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, magvit: cotgen.MAGVITv2, prompt: str, n: int,
                  seed: int, steps: int, cfg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of one prompt from `model` (Sec. 3.1 decoding, path i seeded with derive_seed(seed, i)).
    Returns (codes [n, N] as ordinary tensors usable in training, images [n, 3, H, W] in [-1, 1])."""
    was_training = model.training
    model.eval()
    dev = model.embed_tokens.weight.device
    gens = [torch.Generator(device=dev).manual_seed(derive_seed(seed, i)) for i in range(n)]
    codes = cotgen.generate(model, tok, prompt, n, steps=steps, cfg=cfg, generators=gens)
    with torch.inference_mode():
        images = magvit.decode_code(codes)
    model.train(was_training)
    return codes.clone(), images.clone()    # clones outside inference mode: embeddings may save them for backward


def curate_pairs(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, magvit: cotgen.MAGVITv2, score: Scorer,
                 prompts: Sequence[str], n: int = 4, *, seed: int = 0, steps: int = 18, cfg: float = 1.75,
                 progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Sec. 3.3, ranking data for DPO and for each round of iterative DPO: generate n images per prompt with
    `model`, label each yes/no with the verifier, and pair one random "yes" with one random "no"; prompts
    whose images all get the same label are dropped. Returns (records with token lists, counts)."""
    records, dropped = [], 0
    t0 = time.time()
    for j, prompt in enumerate(prompts):
        codes, images = sample_images(model, tok, magvit, prompt, n, derive_seed(seed, "curate", j), steps, cfg)
        p_yes, yes = score(images, [prompt] * n)
        yes = torch.as_tensor(yes, dtype=torch.bool).cpu()
        if yes.all() or not yes.any():
            dropped += 1
        else:
            g = torch.Generator().manual_seed(derive_seed(seed, "pair", j))
            ys, ns = yes.nonzero()[:, 0], (~yes).nonzero()[:, 0]
            w = int(ys[torch.randint(len(ys), (1,), generator=g)])
            l = int(ns[torch.randint(len(ns), (1,), generator=g)])
            if torch.equal(codes[w], codes[l]):
                dropped += 1
            else:
                records.append({"prompt": prompt, "chosen": codes[w].tolist(), "rejected": codes[l].tolist(),
                                "p_yes_chosen": float(p_yes[w]), "p_yes_rejected": float(p_yes[l])})
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
        return (torch.tensor([j.p_yes for j in judged]), torch.tensor([j.answer == "yes" for j in judged]))

    return score


# ==========================================================================================================
# 3. Reward-model guidance (Sec. 3.4)
# ==========================================================================================================


def online_pairs(policy: cotgen.Showo, tok: cotgen.ShowoTokenizer, magvit: cotgen.MAGVITv2, score: Scorer,
                 prompts: Sequence[str], samples: int, seed: int, steps: int, cfg: float) -> tuple[PairBatch | None, dict]:
    """Sec. 3.4, the online half of DPO with reward-model guidance: for each prompt-only prompt, sample
    `samples` images from the current policy, score them with the reward model, and keep the best as y_w and
    the worst as y_l (a prompt whose samples all score the same gives no pair)."""
    kept, chosen, rejected, best, worst = [], [], [], [], []
    for j, prompt in enumerate(prompts):
        codes, images = sample_images(policy, tok, magvit, prompt, samples, derive_seed(seed, j), steps, cfg)
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


# ==========================================================================================================
# 4. Training
# ==========================================================================================================


@dataclass
class OptimConfig:
    """What every Show-o fine-tune here shares and what changes its weights (a resumed run must match it).
    Defaults: Sec. 3.3 and ref §6 (the self-correction fine-tune of Sec. 5 keeps them: the paper is silent)."""
    lr: float = 1e-5
    batch_size: int = 10
    epochs: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    max_steps: int | None = None     # cap on the optimizer steps of a round (the schedule spans the cap)
    shuffle: bool = False            # the released loader keeps file order
    seed: int = 10086
    cond_dropout: float = 0.1        # Show-o's text-condition dropout (ref §6.3 step 5)
    bf16: bool = False
    gradient_checkpointing: bool = False

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        d.pop("gradient_checkpointing")   # recomputation does not change the numbers
        return d


@dataclass
class TrainConfig(OptimConfig):
    """DPO's settings on top of the shared ones (Sec. 3.3, 3.4)."""
    beta: float = BETA
    sft_coef: float = 0.0
    shared_mask: bool = False
    reward_coef: float = 0.0
    online_per_step: int = 2
    online_samples: int = 4
    gen_steps: int = 18
    gen_cfg: float = 1.75


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Cosine schedule with linear warm-up (ref §6.6): step/warmup, then 0.5·(1 + cos(π·progress)) down to 0."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (ref §6.6). Only biases skip weight decay: the released no-decay list meant norms and embeddings
    too, but with Phi's parameter names it matches biases alone, and this keeps what actually ran."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = {p: n for n, p in model.named_parameters()}
    decay = [p for p in params if not names[p].endswith("bias")]
    no_decay = [p for p in params if names[p].endswith("bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def freeze(model: cotgen.Showo) -> cotgen.Showo:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class Trainer:
    """One round of DPO (Sec. 3.3), optionally with reward-model guidance (Sec. 3.4).

    The data position and every random draw are functions of (seed, round, step), so the trainer's whole
    state is the policy, the AdamW state and the step: `state()` / `load_state()` carry exactly that."""

    max_grad_norm: float | None = None   # gradient clipping before each step (None: none, as the DPO run)

    def __init__(self, policy: cotgen.Showo, reference: cotgen.Showo, tok: cotgen.ShowoTokenizer, pairs: PairData,
                 cfg: TrainConfig, *, round_index: int = 1, magvit: cotgen.MAGVITv2 | None = None,
                 score: Scorer | None = None, online_prompts: Sequence[str] | None = None):
        if len(pairs) == 0:
            raise DataError("no preference pairs to train on")
        if cfg.reward_coef and (score is None or magvit is None):
            raise ValueError("reward-model guidance (reward_coef > 0) needs a scorer and MAGVIT-v2")
        self.reference, self.pairs, self.magvit, self.score = freeze(reference), pairs, magvit, score
        self.online_prompts = list(online_prompts) if online_prompts else list(dict.fromkeys(pairs.prompts))
        self._setup(policy, tok, pairs, cfg, round_index)

    def _setup(self, policy: cotgen.Showo, tok: cotgen.ShowoTokenizer, examples, cfg: OptimConfig,
               round_index: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """What every trainer here shares: the policy in training mode, AdamW, and the step count of the
        schedule. `examples` is anything with a length and a `source` list (where each example came from).
        `optimizer` replaces `make_optimizer`'s (a param group's "base_lr" then overrides cfg.lr for it)."""
        self.policy, self.tok, self.examples, self.cfg, self.round = policy, tok, examples, cfg, round_index
        self.device = next(policy.parameters()).device
        policy.train()
        policy.gradient_checkpointing = cfg.gradient_checkpointing
        self.optimizer = make_optimizer(policy, cfg) if optimizer is None else optimizer
        self.steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
        self.total = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total = min(self.total, cfg.max_steps)
        self.warmup = int(cfg.warmup_ratio * self.total)
        self.step = 0

    def batch_indices(self, step: int) -> list[int]:
        """The examples of optimizer step `step` (batches in file order, or a per-epoch permutation)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.examples)))
        if self.cfg.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.round, "epoch", epoch))
            order = torch.randperm(len(order), generator=g).tolist()
        return order[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]

    def loss(self, step: int) -> tuple[torch.Tensor, dict]:
        """Sec. 3.3 (+ 3.4): L = mean L_DPO + sft_coef·CE(y_w) + reward_coef·mean L_DPO(online best, worst)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, self.round, step, "mask"))
        batch = self.pairs.batch(self.batch_indices(step))
        kw = dict(shared_mask=cfg.shared_mask, cond_dropout=cfg.cond_dropout, bf16=cfg.bf16)
        (pw, pl), (rw, rl), scored = pair_log_likelihoods(self.policy, self.reference, self.tok, batch, g, **kw)
        losses, margin = dpo_loss(pw, pl, rw, rl, cfg.beta)
        loss = losses.mean()
        stats = {"dpo": loss.item(), "margin": float(margin.mean()), "accuracy": float((margin > 0).float().mean())}
        if cfg.sft_coef:
            sft = -pw.sum() / scored.sum()
            loss = loss + cfg.sft_coef * sft
            stats["sft"] = sft.item()
        if cfg.reward_coef:
            n = len(self.online_prompts)
            prompts = [self.online_prompts[(step * cfg.online_per_step + j) % n] for j in range(cfg.online_per_step)]
            online, ostats = online_pairs(self.policy, self.tok, self.magvit, self.score, prompts, cfg.online_samples,
                                          derive_seed(cfg.seed, self.round, step, "online"), cfg.gen_steps,
                                          cfg.gen_cfg)
            stats.update(ostats)
            if online is not None:
                (ow, ol), (qw, ql), _ = pair_log_likelihoods(self.policy, self.reference, self.tok, online, g, **kw)
                guide, _ = dpo_loss(ow, ol, qw, ql, cfg.beta)
                loss = loss + cfg.reward_coef * guide.mean()
                stats["online_dpo"] = guide.mean().item()
        stats["loss"] = loss.item()
        return loss, stats

    def train_step(self) -> dict:
        """One optimizer step on the next batch; the lr is a function of the step (no scheduler state)."""
        loss, stats = self.loss(self.step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"round {self.round} step {self.step}: the loss is {loss.item()} "
                                     f"(examples {', '.join(self.examples.source[i] for i in self.batch_indices(self.step))}"
                                     "); lower --lr, or use fp32. The last checkpoint is intact.")
        factor = lr_factor(self.step, self.total, self.warmup)
        lr = self.cfg.lr * factor
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("base_lr", self.cfg.lr) * factor
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        stats["lr"] = lr
        return stats

    def done(self) -> bool:
        return self.step >= self.total

    # -- state, for checkpoints: AdamW's tensors go to safetensors, the rest is JSON (nothing pickled) --

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {}
        for i, s in self.optimizer.state_dict()["state"].items():
            for k, v in s.items():
                tensors[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        return tensors, {"round": self.round, "step": self.step, "total": self.total,
                         "config": self.cfg.fingerprint()}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["round"] != self.round or meta["config"] != self.cfg.fingerprint():
            raise CheckpointMismatch(meta, self.round, self.cfg)
        state: dict[int, dict] = {}
        for key, t in tensors.items():
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = t
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)
        self.step = meta["step"]


class CheckpointMismatch(data.CheckpointError):
    def __init__(self, meta: dict, round_index: int, cfg: TrainConfig):
        now = cfg.fingerprint()
        diff = sorted(k for k in set(now) | set(meta["config"]) if now.get(k) != meta["config"].get(k))
        what = ", ".join(f"{k}: checkpoint {meta['config'].get(k)!r} vs now {now.get(k)!r}" for k in diff)
        if meta["round"] != round_index:
            what = f"round: checkpoint {meta['round']} vs now {round_index}" + (f"; {what}" if what else "")
        super().__init__(f"the checkpoint was made with other settings ({what}): resume with the same flags, "
                         "or start again in a new --out folder")


def write_showo_dir(model: cotgen.Showo, out: str | os.PathLike, like_dir: str | os.PathLike,
                    phi_dir: str | os.PathLike) -> None:
    """Show-o's own layout (config.json + pytorch_model.safetensors [+ inference_config.yaml]), loadable by
    `cotgen.load_showo` and `sample.py --showo`. config.json's llm_model_path is set to the absolute phi folder
    used in training, because the copied relative path ("../phi" in the tiny model) would point elsewhere."""
    out = Path(out)
    cotgen.save_showo(model, out)
    raw = data.read_config(like_dir)
    raw["llm_model_path"] = str(Path(phi_dir).resolve())
    data.write_json(raw, out / "config.json")
    yaml = Path(like_dir) / "inference_config.yaml"
    if yaml.is_file():
        with data.atomic_path(out / yaml.name) as tmp:
            tmp.write_bytes(yaml.read_bytes())


def publish_dir(build: Callable[[Path], None], target: Path) -> None:
    """Build a folder under a temporary name next to `target`, then rename it into place, so a reader sees
    either the old folder or the complete new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


LATEST = "latest.json"


def save_checkpoint(trainer: Trainer, out: str | os.PathLike, like_dir, phi_dir,
                    write_model: Callable[[Path], None] | None = None) -> Path:
    """Write the policy (Show-o layout), AdamW's state (optimizer.safetensors) and trainer.json as a new folder
    `ckpt-rR-SSSSSS`, then point latest.json at it and remove older ones. `write_model(folder)` writes another
    model's layout instead (the verifier fine-tunes, verifiers.save_verifier)."""
    out = Path(out)
    name = f"ckpt-r{trainer.round}-{trainer.step:06d}"
    tensors, meta = trainer.state()

    def build(d: Path):
        if write_model is not None:
            write_model(d)
        else:
            write_showo_dir(trainer.policy, d, like_dir, phi_dir)
        data.save_state(tensors, d / "optimizer.safetensors")
        data.write_json(meta, d / "trainer.json")

    publish_dir(build, out / name)
    data.write_json({"checkpoint": name, "round": trainer.round, "step": trainer.step}, out / LATEST)
    for old in out.glob("ckpt-r*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return out / name


def latest_checkpoint(out: str | os.PathLike) -> dict | None:
    """latest.json of `out` with the checkpoint folder resolved (None when there is none)."""
    p = Path(out) / LATEST
    if not p.is_file():
        return None
    info = json.loads(p.read_text())
    info["dir"] = Path(out) / info["checkpoint"]
    if not (info["dir"] / "trainer.json").is_file():
        raise data.CheckpointError(f"{p} points at {info['dir']}, which is incomplete: delete {p} to start the "
                                   "round again")
    return info


def load_checkpoint_into(trainer: Trainer, ckpt_dir: str | os.PathLike) -> None:
    """Restore the policy weights, AdamW state and step saved by `save_checkpoint`. Weights are copied into
    the existing parameters, which the optimizer holds."""
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    meta = json.loads((d / "trainer.json").read_text())
    keys = cotgen.showo_key_map(trainer.policy.config)
    weights = load_file(d / "pytorch_model.safetensors")
    trainer.policy.load_state_dict({keys[k]: v for k, v in weights.items()}, strict=True)
    # AdamW wants its step counters on the CPU (unless capturable); load_state_dict moves the moments itself
    trainer.load_state(load_file(d / "optimizer.safetensors", device="cpu"), meta)


class Progress:
    """One line per logged step on stderr: loss, reward margin and preference accuracy (DPO), lr, speed."""

    def __init__(self, label: str, total: int, every: int = 1):
        self.label, self.total, self.every, self.t0, self.n = label, total, max(1, every), time.time(), 0

    def __call__(self, step: int, stats: dict) -> None:
        self.n += 1
        if step % self.every and step != self.total:
            return
        rate = (time.time() - self.t0) / self.n
        online = (f"  online {stats['online_dpo']:.4f} ({stats['online_pairs']} pairs)"
                  if "online_dpo" in stats else "")
        pref = f"  margin {stats['margin']:+.4f}  acc {stats['accuracy']:.2f}" if "margin" in stats else ""
        print(f"[{self.label}] step {step}/{self.total}  loss {stats['loss']:.4f}{pref}  "
              f"lr {stats['lr']:.2e}{online}  {rate:.2f}s/step  "
              f"eta {rate * (self.total - step) / 60:.1f}min", file=sys.stderr, flush=True)


def train(trainer: Trainer, *, save: Callable[[Trainer], None] | None = None, save_every: int = 100,
          stop_after: int | None = None, log_every: int = 1, label: str = "dpo") -> bool:
    """Run the round to its end (True) or until `stop_after` steps of this call (False, after a checkpoint).
    `save(trainer)` is called every `save_every` steps and when stopping early."""
    progress = Progress(label, trainer.total, log_every)
    done_here = 0
    while not trainer.done():
        stats = trainer.train_step()
        done_here += 1
        progress(trainer.step, stats)
        stopping = stop_after is not None and done_here >= stop_after and not trainer.done()
        if save is not None and (stopping or (save_every and trainer.step % save_every == 0 and not trainer.done())):
            save(trainer)
        if stopping:
            return False
    return True


@torch.no_grad()
def preference_stats(policy: cotgen.Showo, reference: cotgen.Showo, tok: cotgen.ShowoTokenizer, pairs: PairData,
                     draws: int = 4, seed: int = 0, beta: float = BETA) -> dict:
    """Mean reward margin and preference accuracy of `policy` over `pairs`, averaged over `draws` shared masks
    without text dropout (an evaluation, so the same masks for every model compared)."""
    was = policy.training
    policy.eval()
    margins = []
    for d in range(draws):
        g = torch.Generator().manual_seed(derive_seed(seed, "eval", d))
        (pw, pl), (rw, rl), _ = pair_log_likelihoods(policy, reference, tok, pairs.batch(range(len(pairs))), g,
                                                     shared_mask=True, cond_dropout=0.0)
        margins.append(dpo_loss(pw, pl, rw, rl, beta)[1])
    policy.train(was)
    m = torch.stack(margins).mean(0)
    return {"margin": float(m.mean()), "accuracy": float((m > 0).float().mean())}


# ==========================================================================================================
# 5. Self-correction fine-tuning (Sec. 5, PARM++)
# ==========================================================================================================


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
    """Self-correction groups -> image codes (`encode_images`). An image several groups share (a "yes" image
    of reflect.json) is encoded once, and a problem with it is reported once, naming its record. Returns
    (groups, problems)."""
    slot: dict[str, int] = {}
    items: list[tuple[str, str | list]] = []
    for rec in records:
        for where, image in ((rec.low_from, rec.low), (rec.high_from, rec.high)):
            if where not in slot:
                slot[where] = len(items)
                items.append((where, image))
    codes, problems = encode_images(items, config, magvit, image_root, what, progress=progress)
    keep = []
    for rec in records:
        low, high = codes[slot[rec.low_from]], codes[slot[rec.high_from]]
        if low is None or high is None:
            continue
        if torch.equal(low, high):
            problems.append(f"{rec.low_from} the low- and high-quality images are the same image tokens, so there "
                            "is nothing to correct")
            continue
        keep.append((rec, low, high))
    empty = torch.empty(0, config.num_vq_tokens, dtype=torch.long)
    return CorrectionData(prompts=[r.prompt for r, _, _ in keep], reasons=[r.reason for r, _, _ in keep],
                          low=torch.stack([l for _, l, _ in keep]) if keep else empty,
                          high=torch.stack([h for _, _, h in keep]) if keep else empty,
                          source=[r.low_from.rsplit(":", 1)[0] for r, _, _ in keep]), problems


def correction_sequences(tok: cotgen.ShowoTokenizer, groups: CorrectionData, masked: torch.Tensor,
                         drop_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 5, one self-correction example per group in PARM++'s input format (`cotgen.self_correction_text`):

        [PAD.. <|t2i|> bos "{prompt}\\nCorrection: {reason}" eos] <|soi|> low <|eoi|> <|soi|> high, masked <|eoi|>

    Only the second image is scored: its masked slots, its <|soi|> and its <|eoi|> (as Show-o's t2i loss and
    the DPO likelihood). The low-quality image is a given condition. Text dropout replaces prompt and reason
    by the empty prompt and keeps the low-quality image: the unconditional row of PARM++'s CFG."""
    texts = [cotgen.self_correction_text(p, r) for p, r in zip(groups.prompts, groups.reasons)]
    return training_sequences(tok, texts, groups.high, masked, drop_text, condition=groups.low)


def correction_log_likelihood(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, groups: CorrectionData,
                              generator: torch.Generator, *, cond_dropout: float = 0.1,
                              bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 5: log π(high | prompt, reason, low) under masked prediction (a cosine-schedule fraction of the
    high-quality image masked, `sample_masks`), and the number of scored positions. Both [G]."""
    G, N = groups.high.shape
    masked = sample_masks(G, N, generator)
    drop = torch.rand(G, generator=generator) < cond_dropout
    ids, labels = correction_sequences(tok, groups, masked, drop)
    device = model.embed_tokens.weight.device
    ids, labels = ids.to(device), labels.to(device)
    allowed = cotgen.omni_attention_mask(ids, tok.pad_id, tok.soi_id, tok.eoi_id)
    with autocast(device, bf16):
        logp = image_log_likelihood(model, ids, labels, allowed)
    return logp, (labels != IGNORE).sum(dim=1)


class SelfCorrectionTrainer(Trainer):
    """Sec. 5, self-correction fine-tuning of Show-o: Show-o's masked-prediction loss (cross-entropy per scored
    token, averaged over the batch) on the high-quality image given the prompt, the reason and the low-quality
    image. No reference model. Batching, schedule, checkpoints and exact resume are DPO's (`Trainer`)."""

    def __init__(self, policy: cotgen.Showo, tok: cotgen.ShowoTokenizer, groups: CorrectionData, cfg: OptimConfig):
        if len(groups) == 0:
            raise DataError("no self-correction groups to train on")
        self._setup(policy, tok, groups, cfg, round_index=1)

    def loss(self, step: int) -> tuple[torch.Tensor, dict]:
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.round, step, "mask"))
        logp, scored = correction_log_likelihood(self.policy, self.tok, self.examples.batch(self.batch_indices(step)),
                                                 g, cond_dropout=self.cfg.cond_dropout, bf16=self.cfg.bf16)
        loss = -logp.sum() / scored.sum()
        return loss, {"loss": loss.item()}


@torch.no_grad()
def correction_loss(model: cotgen.Showo, tok: cotgen.ShowoTokenizer, groups: CorrectionData, draws: int = 4,
                    seed: int = 0, batch: int = 16) -> float:
    """The self-correction loss of `model` on `groups`: cross-entropy per scored token, over `draws` mask draws
    fixed by `seed` and without text dropout (an evaluation: every model compared sees the same masks)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for d in range(draws):
        g = torch.Generator().manual_seed(derive_seed(seed, "eval", d))
        for start in range(0, len(groups), batch):
            logp, scored = correction_log_likelihood(model, tok, groups.batch(range(start, min(start + batch,
                                                                                              len(groups)))),
                                                     g, cond_dropout=0.0)
            total -= float(logp.sum())
            count += int(scored.sum())
    model.train(was)
    return total / count
