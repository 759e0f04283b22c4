"""The training commands of the paper, and the one trainer they all use.

    python train.py dpo --tiny --geneval 24 --out outputs/dpo             # curate pairs with the verifier, then DPO
    python train.py dpo --data pairs.jsonl --out outputs/dpo              # DPO on given pairs (Sec. 3.3)
    python train.py dpo --data pairs.jsonl --rounds 2 --verifier DIR ...  # iterative DPO (Sec. 3.3)
    python train.py dpo --data pairs.jsonl --reward-coef 0.1 --verifier DIR ...   # reward-model guidance (Sec. 3.4)
    python train.py selfcorrect --reflect reflect.json --out outputs/sc   # PARM++ self-correction fine-tune (Sec. 5)
    python train.py curate --task orm --num-prompts 13000 --out data/orm  # ranking data: orm|prm|parm|reflect
    python train.py orm --data data/orm/orm.json --out weights/orm_ft    # fine-tune a reward model (orm|parm)
    python train.py pretrain --world shapes --out runs/shapes/showo       # Show-o from scratch, the shapes world

Every objective (dpo.py's losses on Show-o, verifiers.sft_loss on LLaVA-OneVision) is trained by `Trainer` and
`fit`: AdamW with the paper's parameter groups, linear warm-up and cosine decay, bf16 autocast with fp32 master
weights, gradient clipping, atomic checkpoints and exact resume. A subcommand only prepares its data and picks
its loss. Generators are written in Show-o's own layout (`python sample.py --showo OUT`), verifiers in the
lmms-lab layout (`python sample.py --verifier OUT`).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import queue
import re
import shlex
import shutil
import sys
import textwrap
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

import cotgen
import data
import dpo
import sample
import verifiers
from data import CheckpointError, DataError
from dpo import derive_seed
from sample import at_least, fail, first_process, sync

# ---- 1. The trainer: one for every objective -------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything that changes the trained weights (a resumed run must match it). Defaults: DPO, Sec. 3.3 and
    the released `train_dpo.py` / `dpo.yaml`; `preset("sft")` is the released LLaVA-NeXT fine-tune of the
    reward models (the paper: one epoch, batch 8, lr 1e-5)."""
    lr: float = 1e-5
    batch_size: int = 10
    epochs: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    max_steps: int | None = None        # cap on the optimizer steps of a round (the schedule spans the cap)
    shuffle: bool = False               # the released DPO loader keeps file order
    seed: int = 10086
    max_grad_norm: float | None = None  # gradient clipping (None: none, as the DPO run)
    bf16: bool = False
    gradient_checkpointing: bool = False
    # Show-o objectives (dpo.py)
    cond_dropout: float = 0.1           # Show-o's text-condition dropout
    beta: float = dpo.BETA
    sft_coef: float = 0.0
    shared_mask: bool = False
    reward_coef: float = 0.0
    online_per_step: int = 2
    online_samples: int = 4
    gen_steps: int = 18
    gen_cfg: float = 1.75
    # the reward models (verifiers.sft_loss)
    vision_lr: float = 2e-6
    freeze_vision: bool = False
    label_rule: str = "released"
    # how the work is spread over processes (README: Many GPUs): the same numbers up to float rounding
    micro_batch: int | None = None      # examples per forward/backward pass of a process (gradient accumulation)
    fsdp: bool = False                  # shard weights, gradients and AdamW state over the processes (FSDP2)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        presets = {"dpo": {}, "selfcorrect": {},   # the paper gives no recipe for Sec. 5: DPO's is kept
                   # the shapes world: two passes over 57,600 scenes (one pass left half its objects broken)
                   "pretrain": dict(lr=2e-3, batch_size=32, epochs=2, warmup_ratio=0.055, max_grad_norm=1.0,
                                    shuffle=True, betas=(0.9, 0.99), seed=0),
                   "sft": dict(batch_size=8, warmup_ratio=0.03, weight_decay=0.0, max_grad_norm=1.0, shuffle=True,
                               seed=0)}
        # a world's verifier is trained from scratch (train.py orm --world): the pretraining-sized steps
        presets["world_sft"] = dict(presets["sft"], lr=1e-3, vision_lr=1e-3, batch_size=32, epochs=8,
                                    warmup_ratio=0.05)
        if name not in presets:
            raise ValueError(f"unknown training preset {name!r}: use one of {', '.join(presets)}")
        return cls(**{**presets[name], **overrides})

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        for name in ("gradient_checkpointing", "micro_batch", "fsdp"):   # they do not change the numbers
            d.pop(name)
        return d

def lr_factor(step: int, total: int, warmup: int) -> float:
    """Cosine schedule with linear warm-up (the released runs): step/warmup, then 0.5·(1 + cos(π·progress))."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr_of: Callable[[str], float] | None = None):
    """AdamW over the trainable parameters, one group per (peak lr, weight decay). Only biases skip weight decay:
    the released DPO no-decay list meant norms and embeddings too, but with Phi's names it matches biases alone,
    and this keeps what actually ran. `lr_of(name)` gives a parameter its own peak lr (the SigLIP tower's
    `vision_lr` in the reward-model fine-tune). Groups come main-lr first, decayed first."""
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = lr_of(name) if lr_of else cfg.lr
            wd = 0.0 if name.endswith("bias") else cfg.weight_decay
            groups.setdefault((lr != cfg.lr, wd != cfg.weight_decay, lr, wd), []).append(p)
    param_groups = [{"params": ps, "base_lr": k[2], "weight_decay": k[3]} for k, ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)

def autocast(device: torch.device, bf16: bool):
    """bf16 autocast with fp32 weights: the optimizer keeps fp32 master weights, as DeepSpeed's bf16 mode does
    for the released runs (pure bf16 weights would round most lr=1e-5 updates away)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

# An objective: (step, the batch's example indices, the step's generator[, rows]) -> (loss, stats). With `rows` (a
# slice of the batch) it computes only those examples, one process's share: its draws are still made for the whole
# batch and its loss and stats are normalised over the whole batch, so that the shares' losses and stats add up to
# the batch's. Without `rows` it computes the whole batch.
Objective = Callable[..., "tuple[torch.Tensor, dict]"]

# The model methods besides forward() through which an objective enters a model: the verifier's sft_loss starts
# with encode_images; DPO's online sampling (Paths) calls Show-o's prefix and image_logits (RasterPaths: prefix and
# next_logits). Under FSDP2 the root's parameters are gathered at each of them.
FSDP_ENTRIES = ("encode_images", "prefix", "image_logits", "next_logits")

def tell(text: str) -> None:
    """A message on stderr, from the first process only (the others would repeat it)."""
    if first_process():
        print(text, file=sys.stderr)

def empty_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose tensors are on the meta device (no memory), to be filled by load_state_dict(...,
    assign=True)."""
    memo = {id(t): torch.nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
            if isinstance(t, torch.nn.Parameter) else torch.empty_like(t, device="meta")
            for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)

def spread(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module | None:
    """Make `model` data-parallel over the processes of a torchrun job. By default every process keeps the whole
    model, made equal to the first process's (as DDP does). With cfg.fsdp, FSDP2 shards each layer of every
    nn.ModuleList and the rest of the model, with bf16 compute and fp32 gradient reduction when cfg.bf16, and
    gradients summed (not averaged: the objectives' shares add up to the batch's loss); an empty copy of the
    unsharded model is returned, which `Trainer.gathered` fills to write the model. None otherwise."""
    processes = sample.world()[1]
    if processes == 1:
        return None
    if not cfg.fsdp:
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
        return None
    skeleton = empty_copy(model)
    mesh = init_device_mesh(next(model.parameters()).device.type, (processes,))
    policy = MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32) if cfg.bf16 else MixedPrecisionPolicy()
    for layers in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name in FSDP_ENTRIES:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)    # a plain sum: gloo has no pre-multiplied sum
    return skeleton

# Memory per GPU (README: Many GPUs): the arithmetic of its table, from the shapes of a model built on the meta device
TRAINED_BYTES = 4 + 4 + 8   # per trained parameter: fp32 master weight, fp32 gradient, AdamW's two fp32 moments
QUESTION_TOKENS = 70        # the chat around the image in a verifier's training conversation: L = 730 + 70 = 800

@dataclass
class MemoryEstimate:
    """GB (10^9 bytes) per GPU of a training job, computed, not measured (README: Many GPUs prints these)."""
    params: int             # the trained model's parameters
    root: int               # those outside its transformer layers (embeddings, head, projector): FSDP2's root
    layer: int              # the largest layer's
    state: float            # weights, gradients and AdamW's moments: TRAINED_BYTES per parameter, sharded by FSDP
    reference: float        # a frozen fp32 copy of the model (DPO's reference), not sharded
    gathered: float         # FSDP2: the root in bf16 and its gradient in bf16 and fp32, and two layers in bf16
    activations: float      # what the backward pass keeps, for this GPU's share of the batch

    @property
    def total(self) -> float:
        return self.state + self.reference + self.gathered + self.activations

def activation_bytes(model: torch.nn.Module, checkpointing: bool = False) -> int:
    """Bytes the backward pass keeps per sequence in bf16: ≈ 2·L·(10·d + 4·i) per layer of L positions, width d
    and MLP width i (the block's input, q/k/v, attention output, the MLP's gate/up/product; SDPA keeps no scores),
    or with checkpointing each layer's input 2·L·d and one layer recomputed. Show-o adds its fp32 logits and their
    log-softmax (DPO's full-vocabulary likelihood); the verifier's loss reads a few answer positions only."""
    if isinstance(model, cotgen.Showo):
        c = model.config
        towers, logits = [(c.n_layer, c.seq_len, c.n_embd, c.intermediate_size)], 2 * c.seq_len * c.vocab_size * 4
    else:
        c, v = model.cfg, model.cfg.vision
        towers = [(c.n_layer, c.n_image_tokens + QUESTION_TOKENS, c.hidden_size, c.intermediate_size),
                  (v.n_layer, v.n_patches, v.hidden_size, v.intermediate_size)]
        logits = 0
    layer = [2 * L * (10 * d + 4 * i) for _, L, d, i in towers]
    if checkpointing:
        return sum(n * 2 * L * d for n, L, d, _ in towers) + max(layer) + logits
    return sum(n * a for (n, *_), a in zip(towers, layer)) + logits

def memory_estimate(model: torch.nn.Module, batch: int, *, per_example: int = 1, processes: int = 1,
                    fsdp: bool = False, reference: bool = False, checkpointing: bool = False) -> MemoryEstimate:
    """GB per GPU of training `model` (built on the meta device: only its shapes are read) on batches of `batch`
    examples of `per_example` sequences (DPO: 2, chosen and rejected) split over `processes` GPUs, replicated or
    with `fsdp` (`spread`), with a frozen fp32 `reference` copy, with or without gradient checkpointing."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    layers = [layer for m in model.modules() if isinstance(m, torch.nn.ModuleList) for layer in m]
    params, largest = count(model), max(count(layer) for layer in layers)
    root = params - sum(count(layer) for layer in layers)
    sharded = fsdp and processes > 1
    share = math.ceil(batch / processes) * per_example                     # sequences on the busiest GPU
    return MemoryEstimate(params, root, largest, state=TRAINED_BYTES * params / (processes if sharded else 1) / 1e9,
                          reference=4 * params / 1e9 if reference else 0.0,
                          gathered=((2 + 2 + 4) * root + 2 * 2 * largest) / 1e9 if sharded else 0.0,
                          activations=share * activation_bytes(model, checkpointing) / 1e9)

class Trainer:
    """One round of training `model` on an `Objective`.

    The data position and every random draw are functions of (seed, round, step), so the whole state is the
    weights, AdamW's state and the step: `state()` / `load_state()` carry exactly that, and a resumed run
    takes the very steps the uninterrupted one would have taken.

    Under torchrun each process computes its share of every batch (`parts`) and the gradients are summed over the
    processes before the step (`sum_gradients`; under --fsdp FSDP2 reduce-scatters them), so K processes take the
    steps one process takes, up to float rounding."""

    def __init__(self, model: torch.nn.Module, objective: Objective, source: Sequence[str], cfg: TrainConfig, *,
                 round_index: int = 1, lr_of: Callable[[str], float] | None = None):
        if not source:
            raise DataError("no training examples")
        self.model, self.objective, self.source, self.cfg, self.round = model, objective, list(source), cfg, round_index
        self.device = next(model.parameters()).device
        model.train()
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.skeleton = spread(model, cfg)      # not None: sharded with FSDP2
        self.optimizer = make_optimizer(model, cfg, lr_of)
        self.steps_per_epoch = math.ceil(len(self.source) / cfg.batch_size)
        self.total = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total = min(self.total, cfg.max_steps)
        self.warmup = int(cfg.warmup_ratio * self.total)
        self.max_grad_norm = cfg.max_grad_norm
        self.step = self.resumed_at = 0

    def batch_indices(self, step: int) -> list[int]:
        """The examples of optimizer step `step` (batches in file order, or a per-epoch permutation)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.source)))
        if self.cfg.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.round, "epoch", epoch))
            order = torch.randperm(len(order), generator=g).tolist()
        return order[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]

    def parts(self, size: int) -> list[tuple[slice, int]]:
        """(rows, weight) of each forward/backward pass this process makes for a batch of `size`: its share, rows
        [size·r/K, size·(r+1)/K) for process r of K, in passes of at most cfg.micro_batch examples. Under FSDP a
        process whose share is empty (a short last batch) still runs row 0 with weight 0: every process must take
        part in FSDP's collectives."""
        rank, processes = sample.world()
        lo, hi = size * rank // processes, size * (rank + 1) // processes
        step = self.cfg.micro_batch or max(1, hi - lo)
        parts = [(slice(s, min(s + step, hi)), 1) for s in range(lo, hi, step)]
        return parts or ([(slice(0, 1), 0)] if self.skeleton is not None else [])

    def train_step(self) -> dict:
        """One optimizer step on the next batch; the lr is a function of the step (no scheduler state). Each part
        draws from a generator of (seed, round, step), made anew, so every part sees the batch's draws."""
        index = self.batch_indices(self.step)
        factor = lr_factor(self.step, self.total, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.optimizer.zero_grad(set_to_none=True)
        total, stats = 0.0, Counter()
        for rows, weight in self.parts(len(index)):
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.round, self.step, "mask"))
            share = {} if rows == slice(0, len(index)) else {"rows": rows}     # the whole batch: as one process
            with autocast(self.device, self.cfg.bf16):
                loss, more = self.objective(self.step, index, g, **share)
            (loss * weight).backward()
            if weight:
                total += loss.item()
                stats.update(more)
        total, stats = self.gather(total, stats)
        if not math.isfinite(total):
            raise FloatingPointError(f"round {self.round} step {self.step}: the loss is {total} (examples "
                                     f"{', '.join(self.source[i] for i in index)}); lower --lr, or use fp32. The "
                                     "last checkpoint is intact.")
        self.sum_gradients()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        return {**stats, "lr": self.cfg.lr * factor}

    def gather(self, total: float, stats: Counter) -> tuple[float, dict]:
        """The batch's loss and stats: the sums of every process's parts (every process gets them, so that all
        stop together on a non-finite loss)."""
        if sample.world()[1] == 1:
            return total, dict(stats)
        everyone = [None] * sample.world()[1]
        dist.all_gather_object(everyone, (total, dict(stats)))
        summed = Counter()
        for _, s in everyone:
            summed.update(s)
        return sum(t for t, _ in everyone), dict(summed)

    def sum_gradients(self) -> None:
        """Sum the gradients over the processes, once per step after its backward passes: DDP's all-reduce.
        DistributedDataParallel itself reduces only the gradients of work done through its wrapper's forward(),
        and the objectives call the models' own methods (the verifier's encode_images, splice and lm; Show-o's
        forward on the unwrapped module); what is lost is DDP's overlap of the reduction with the backward pass.
        A parameter that got no gradient on any process keeps none (AdamW skips it, as in one process)."""
        if sample.world()[1] == 1 or self.skeleton is not None:
            return
        params = self.parameters()
        has = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        for p, h in zip(params, has.tolist()):
            if h:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)

    def done(self) -> bool:
        return self.step >= self.total

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trained parameters in AdamW's order (its state is keyed by this index)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # -- state, for checkpoints: AdamW's tensors go to safetensors, the rest is JSON (nothing pickled) --

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """AdamW's tensors and the trainer's JSON fields, whole (gathered under FSDP: every process calls this;
        the tensors are kept by the first process only, the one that writes them)."""
        tensors = {}
        for i, s in self.optimizer.state_dict()["state"].items():
            for k, v in s.items():
                if isinstance(v, DTensor):
                    v = v.full_tensor()     # a shard, gathered from every process: each must take part
                if first_process():
                    tensors[f"{i}.{k}"] = v.cpu() if torch.is_tensor(v) else torch.tensor(v)
        return tensors, {"round": self.round, "step": self.step, "total": self.total, "tensors": len(tensors),
                         "config": self.cfg.fingerprint()}

    def gathered(self) -> torch.nn.Module | None:
        """The whole trained model on the first process, to be written (under FSDP gathered from every process's
        shard onto the CPU, so every process calls this); None on the others."""
        if self.skeleton is None:
            return self.model if first_process() else None
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not first_process():
            return None
        model = copy.deepcopy(self.skeleton)
        model.load_state_dict(full, assign=True)
        return model

    def load_checkpoint(self, folder: Path) -> None:
        """AdamW's state and the step from a checkpoint folder (trainer.json, optimizer.safetensors), every field,
        key and shape checked before anything is loaded: a damaged file is a CheckpointError naming it, other
        settings a CheckpointMismatch."""
        meta, where = data.read_config(folder, "trainer.json"), folder / "trainer.json"
        field = lambda key, kind, *bounds: data.config_field(meta, key, kind, where, data.REQUIRED, *bounds)  # noqa
        round_index, config = field("round", int, 1), field("config", dict)     # both: the mismatch names both
        if round_index != self.round or config != self.cfg.fingerprint():
            raise CheckpointMismatch(meta, self.round, self.cfg)
        step = field("step", int, 0, self.total)
        # AdamW wants its step counters on the CPU (unless capturable); load_state_dict moves the moments itself
        tensors = data.load_tensors(folder / "optimizer.safetensors")
        count = data.config_field(meta, "tensors", int, where, len(tensors))
        state = self.optimizer_state(tensors, folder / "optimizer.safetensors")
        if len(tensors) != count:
            raise CheckpointError(f"{folder / 'optimizer.safetensors'} holds {len(tensors)} tensors but {where} "
                                  f"counts {count}")
        if self.skeleton is not None:   # FSDP: each process keeps its shard of the moments, as of their parameter
            params = self.parameters()
            for i, s in state.items():
                for k in ("exp_avg", "exp_avg_sq"):
                    s[k] = distribute_tensor(s[k].to(self.device), params[i].device_mesh, params[i].placements,
                                             src_data_rank=None)
        self.optimizer.load_state_dict({**self.optimizer.state_dict(), "state": state})
        self.step = self.resumed_at = step

    ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")      # AdamW's tensors of one parameter

    def optimizer_state(self, tensors: dict[str, torch.Tensor], where: Path) -> dict[int, dict]:
        """AdamW's state from `tensors` ("I.step", "I.exp_avg", "I.exp_avg_sq" of parameter I), checked against
        the parameters: a mis-keyed or mis-shaped file is named, never half loaded."""
        params = self.parameters()
        state: dict[int, dict] = {}
        for key, t in tensors.items():
            i, _, name = key.partition(".")
            if not i.isdigit() or int(i) >= len(params) or name not in self.ADAM_STATE:
                raise CheckpointError(f"{where} holds {key!r}, which is no AdamW state of this model's "
                                      f"{len(params)} trained parameters")
            state.setdefault(int(i), {})[name] = t
        for i, got in state.items():
            shape = params[i].shape
            if set(got) != set(self.ADAM_STATE) or got["exp_avg"].shape != shape or got["exp_avg_sq"].shape != shape \
                    or got["step"].numel() != 1:
                raise CheckpointError(f"{where}: the AdamW state of parameter {i} is incomplete or does not fit its "
                                      f"shape {list(shape)}")
        return state

class CheckpointMismatch(CheckpointError):
    def __init__(self, meta: dict, round_index: int, cfg: TrainConfig):
        now = cfg.fingerprint()
        diff = sorted(k for k in set(now) | set(meta["config"]) if now.get(k) != meta["config"].get(k))
        what = ", ".join(f"{k}: checkpoint {meta['config'].get(k)!r} vs now {now.get(k)!r}" for k in diff)
        if meta["round"] != round_index:
            what = f"round: checkpoint {meta['round']} vs now {round_index}" + (f"; {what}" if what else "")
        super().__init__(f"the checkpoint was made with other settings ({what}): resume with the same flags, "
                         "or start again in a new --out folder")

LATEST = "latest.json"

CHECKPOINT = re.compile(r"ckpt-r(\d+)-(\d+)")      # a checkpoint folder: round and step

def save_checkpoint(trainer: Trainer, out: Path, write_model: Callable[[torch.nn.Module, Path], None]) -> None:
    """Write the model (`write_model(model, folder)`, its own layout), AdamW's state and trainer.json as a new folder
    `ckpt-rR-SSSSSS`, point latest.json at it, then remove the older ones but the one latest.json named before:
    a crash at any moment leaves the last complete checkpoint and a latest.json that names it, and a checkpoint
    that proves unreadable has the one before it to fall back on (`resume`). Every process calls this (the state is
    gathered from all under FSDP); the first one writes, whole tensors only, so any number of processes resumes."""
    name = f"ckpt-r{trainer.round}-{trainer.step:06d}"
    tensors, meta = trainer.state()
    model = trainer.gathered()
    if model is None:
        return
    try:
        previous = latest_checkpoint(out)
    except CheckpointError:         # a damaged latest.json names nothing worth keeping
        previous = None
    with data.atomic_path(out / name, directory=True) as d:
        write_model(model, d)
        data.save_state(tensors, d / "optimizer.safetensors")
        data.write_json(meta, d / "trainer.json")
    point_latest(out, trainer, name)
    for old in out.glob("ckpt-r*"):
        if old.name not in (name, previous):
            shutil.rmtree(old, ignore_errors=True)

def point_latest(out: Path, trainer: Trainer, name: str) -> None:
    data.write_json({"checkpoint": name, "round": trainer.round, "step": trainer.step}, out / LATEST)

def latest_checkpoint(out: Path) -> str | None:
    """The checkpoint folder latest.json names (None when there is no latest.json)."""
    p = out / LATEST
    if not p.is_file():
        return None
    name = data.config_field(data.read_config(out, LATEST), "checkpoint", str, p)
    if not CHECKPOINT.fullmatch(name):
        raise CheckpointError(f"{p}: field 'checkpoint' must name a ckpt-rR-SSSSSS folder, not {name!r}")
    return name

def checkpoints(out: Path, round_index: int, label: str) -> list[Path]:
    """This round's complete checkpoints in `out`, the one latest.json names first, then newest first."""
    steps = {}
    for d in out.glob("ckpt-r*"):
        m = CHECKPOINT.fullmatch(d.name)
        if m and int(m.group(1)) == round_index and (d / "trainer.json").is_file():
            steps[d.name] = int(m.group(2))
    try:
        named = latest_checkpoint(out)
    except CheckpointError as e:
        tell(f"[{label}] {e}; the checkpoints are taken by their names instead")
        named = None
    return [out / n for n in sorted(steps, key=lambda n: (n != named, -steps[n]))]

def resume(out: Path, round_index: int, label: str, load: Callable[[Path], object],
           make_trainer: Callable[[object], Trainer]) -> Trainer | None:
    """The trainer at this round's newest usable checkpoint in `out` (None: there is none). A checkpoint that does
    not load (truncated or mis-keyed weights or optimizer state, a damaged trainer.json) is named and the one
    before it is taken, and latest.json is pointed at the one taken; other settings stop (CheckpointMismatch).
    Every process takes the same one (they read the same files), before the first rewrites latest.json."""
    found = checkpoints(out, round_index, label)
    for ckpt in found:
        try:
            trainer = make_trainer(load(ckpt))
            trainer.load_checkpoint(ckpt)
        except CheckpointMismatch:
            raise
        except CheckpointError as e:
            tell(f"[{label}] cannot resume from {ckpt}: {str(e).splitlines()[0]}")
            continue
        sync()
        if first_process():
            point_latest(out, trainer, ckpt.name)
        tell(f"[{label}] resumed from {ckpt} at step {trainer.step}/{trainer.total}")
        return trainer
    if found:
        tell(f"[{label}] no checkpoint in {out} can be resumed from: the round starts again from step 0")
    return None

def fit(trainer: Trainer, *, save: Callable[[Trainer], None] | None = None, save_every: int = 100,
        stop_after: int | None = None, log_every: int = 1, label: str = "train") -> bool:
    """Run the round to its end (True) or until `stop_after` steps of this call (False, after a checkpoint).
    `save(trainer)` is called every `save_every` steps and when stopping early."""
    progress = sample.Progress(label, trainer.total, every=log_every)
    done_here = 0
    while not trainer.done():
        stats = trainer.train_step()
        done_here += 1
        progress(trainer.step, "  ".join(f"{k} {stats[k]:.4f}" for k in ("loss", "margin", "accuracy", "online_dpo")
                                         if k in stats) + f"  lr {stats['lr']:.2e}")
        stopping = stop_after is not None and done_here >= stop_after and not trainer.done()
        if save is not None and (stopping or (save_every and trainer.step % save_every == 0 and not trainer.done())):
            save(trainer)
        if stopping:
            return False
    return True

def resume_and_fit(a, out: Path, label: str, start: Path, load: Callable[[Path], object],
                   make_trainer: Callable[[object], Trainer], write_model: Callable[[object, Path], None], *,
                   publish: Callable[[torch.nn.Module], None] | None = None, round_index: int = 1,
                   budget: int | None = None) -> Trainer:
    """The one run driver: the model from this round's latest checkpoint in `out` (or from `start`), its
    trainer (AdamW state and step restored when resuming), then `fit` with checkpoints. A round that stops early
    (`trainer.done()` is False) leaves a checkpoint to --resume from; a finished one is written by the first process
    with `publish(model)` (default: `write_model(model, out)`) and its checkpoints removed, while the others wait
    so that all may read it. Every process calls this: under FSDP the model is gathered from every shard."""
    trainer = resume(out, round_index, label, load, make_trainer)
    if trainer is None:
        trainer = make_trainer(load(start))
        tell(f"[{label}] {len(trainer.source)} examples, {trainer.total} steps of {trainer.cfg.batch_size}, from "
             f"{start}" + (f", on {sample.world()[1]} processes" if sample.world()[1] > 1 else ""))
    if budget is None or budget > 0:        # else --stop-after ran out in an earlier round
        fit(trainer, save=lambda t: save_checkpoint(t, out, write_model), save_every=a.save_every,
            stop_after=budget, log_every=a.log_every, label=label)
    if not trainer.done():
        tell(f"[{label}] stopped at step {trainer.step} with a checkpoint in {out}: continue with the same command "
             "and --resume")
        return trainer
    model = trainer.gathered()
    if model is not None:
        if publish is None:
            write_model(model, out)
        else:
            publish(model)
        for old in out.glob("ckpt-r*"):
            shutil.rmtree(old, ignore_errors=True)
        (out / LATEST).unlink(missing_ok=True)
    sync()
    return trainer

# ---- 2. Flags and checks every training command shares ---------------------------------------------------

def add_config_flags(g, d: TrainConfig, helps: dict[str, str]) -> None:
    """One flag per TrainConfig field (--field-name), typed and defaulted by `d`'s value."""
    for name, text in helps.items():
        v, flag = getattr(d, name), "--" + name.replace("_", "-")
        if isinstance(v, bool):
            g.add_argument(flag, action="store_true", help=text)
        else:
            g.add_argument(flag, type=type(v), default=v, help=f"{text} (default {v})")

def add_optim_args(p: argparse.ArgumentParser, title: str, d: TrainConfig):
    """AdamW, schedule, data order and seed, with `d`'s values as defaults."""
    g = p.add_argument_group(title)
    add_config_flags(g, d, {"lr": "AdamW peak learning rate", "batch_size": "examples per step",
                            "epochs": "passes over the data (per round for dpo --rounds)",
                            "warmup_ratio": "linear warm-up over this fraction of the steps, then cosine to 0",
                            "weight_decay": "AdamW weight decay, biases excluded", "seed": "seed of every random draw"})
    g.add_argument("--max-steps", type=int, default=None,
                   help="cap the optimizer steps (per round for dpo; the schedule spans the cap)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="bf16 = bf16 autocast with fp32 master weights; auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in the backward pass (less memory, same numbers)")
    g.add_argument("--micro-batch", type=int, default=None, metavar="N",
                   help="at most N examples per forward/backward pass of a process; the gradients of the passes "
                        "add up to the batch's (default: a process's whole share of --batch-size in one pass)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard the weights, gradients and AdamW state over the processes (FSDP2; "
                        "in bf16 precision it computes in bf16 and reduces gradients in fp32). Default: each "
                        "process holds the whole model and the gradients are all-reduced (as DDP)")
    if d.shuffle:
        g.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                       help="keep file order (default: a new order every epoch)")
    else:
        g.add_argument("--shuffle", action="store_true",
                       help="shuffle the data every epoch (the released run keeps file order)")
    return g

def add_output_args(p: argparse.ArgumentParser, out_help: str) -> None:
    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--out", required=True, help=out_help)
    g.add_argument("--save-every", type=int, default=100, help="a resumable checkpoint every N steps (default 100)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop with a checkpoint after N steps of this invocation (split a long run into jobs)")
    g.add_argument("--log-every", type=int, default=1, help="progress line every N steps (default 1)")
    g.add_argument("--skip-bad", action="store_true",
                   help="drop unusable records (and say how many) instead of stopping with the list of them")

def check_optim_args(a) -> None:
    """One clear error for each bad value of the shared flags."""
    at_least(a, 1, "batch_size", "epochs", "save_every", "log_every", "max_steps", "stop_after", "micro_batch")
    if a.batch_size < sample.world()[1]:
        fail(f"--batch-size {a.batch_size} is smaller than the {sample.world()[1]} processes: each process takes "
             "a share of every batch, so give each at least one example")
    if a.fsdp and getattr(a, "reward_coef", 0) and sample.world()[1] > 1:
        fail("--fsdp with --reward-coef: the online samples of a step are drawn by the first process alone, and a "
             "sharded model runs only on all processes together; leave out --fsdp (Show-o fits a GPU unsharded)")
    at_least(a, 0, "lr", above=True)
    at_least(a, 0, "weight_decay")
    if not 0 <= a.warmup_ratio < 1 or not 0 <= getattr(a, "cond_dropout", 0.0) <= 1:
        fail("--warmup-ratio must be in [0, 1) and --cond-dropout in [0, 1]")

def train_config(a, device: torch.device, preset: str, **fields) -> TrainConfig:
    """The TrainConfig of the command's flags (bf16 on GPU unless --precision says otherwise), `fields` on top."""
    given = {f: getattr(a, f) for f in TrainConfig.__dataclass_fields__ if hasattr(a, f)}
    given["bf16"] = a.precision == "bf16" or (a.precision == "auto" and device.type == "cuda")
    return TrainConfig.preset(preset, **{**given, **fields})

def stop_or_skip(problems: list[str], source, skip_bad: bool) -> None:
    """Every bad record of a data file in one error (training has not started), or, with --skip-bad, a count."""
    if problems and not skip_bad:
        listed = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise DataError(f"{len(problems)} unusable record(s) in {source}:\n  {listed}\n"
                        "Fix them, or pass --skip-bad to train on the others.")
    if problems:
        print(f"skipped {len(problems)} bad record(s) of {source} (--skip-bad); first: {problems[0]}", file=sys.stderr)

def resolved(path) -> str | None:
    return str(Path(path).resolve()) if path else None

def guard_out(out: Path, settings: dict, resume: bool, what: str) -> None:
    """An --out that already holds a run is continued only with --resume and the same settings."""
    if resume and not (out / "run.json").is_file():
        fail(f"--resume: {out} holds no {what} run to continue (no run.json): leave out --resume to start one")
    if (out / "run.json").is_file():
        if not resume:
            fail(f"{out} already holds a {what} run: pass --resume to continue it, or choose another --out")
        before = data.read_config(out, "run.json")
        diff = sorted(k for k in settings if settings[k] != before.get(k))
        if diff:
            fail(f"--resume with other settings than the run in {out} ({', '.join(diff)} differ): "
                 "use the same flags, or another --out")
    sync()      # every process has read --out before the first one writes there

def claim_out(out: Path, settings: dict) -> None:
    """Record the run's settings in --out before the first file of the run is written there (the first process)."""
    if first_process() and not (out / "run.json").is_file():
        data.write_json(settings, out / "run.json")

def made_once(path: Path, make: Callable[[], list[dict]], read: Callable[[Path], tuple], encode: Callable,
              config: cotgen.ShowoConfig):
    """Training data as token lists in `path`: made once (`make()` gives the records), then on every (re)start read
    back (`read(path)`: records, problems) and encoded (`encode`: dpo.encode_pairs or dpo.encode_groups, with no image
    tokenizer, as the images are tokens already), so a resumed run trains on exactly the same examples. The first
    process makes it; the others wait for it and read it."""
    if first_process() and not path.is_file():
        data.write_jsonl(make(), path)
    sync()
    records, problems = read(path)
    examples, more = encode(records, config, None, path.parent, str(path))
    problems += more
    if problems:
        raise DataError(f"{path} was written by this run but no longer reads back ({problems[0]}): delete it to make "
                        "it again")
    return examples

def read_part(path: Path, label: str) -> list[dict] | None:
    """A finished piece of a resumable run (a JSON list of records), None when there is none. A damaged one (cut
    short, edited) is named and removed, so that its piece is made again."""
    if not path.is_file():
        return None
    try:
        records = json.loads(data.read_text(path, "part file"))
        if isinstance(records, list) and all(isinstance(r, dict) for r in records):
            return records
    except (DataError, json.JSONDecodeError):
        pass
    print(f"[{label}] {path} is damaged: it is made again", file=sys.stderr)
    path.unlink()
    return None

def begin(out: Path, settings: dict, resume: bool, what: str, done: str = "config.json") -> bool:
    """Check --out against the run (`guard_out`); True when it already holds the finished result."""
    guard_out(out, settings, resume, what)
    if (out / "run.json").is_file() and (out / done).is_file():     # the result's last file is written last
        tell(f"{out} already holds the finished {what} run")
        return True
    return False

def showo_run(a) -> tuple[torch.device, Path, Path, Path | None]:
    """The device and the Show-o, phi and MAGVIT-v2 folders of a command that trains or samples Show-o (no
    MAGVIT-v2 with --world: the world's codec, sample.image_tokenizer)."""
    device = sample.device_of(a)
    if not a.world:
        showo, phi, magvit_dir = sample.resolve_weights(a)
    elif a.showo:
        showo, phi, magvit_dir = Path(a.showo), Path(a.phi) if a.phi else None, None
    else:
        fail(f"--world {a.world} needs its generator: --showo DIR, as written by `python train.py pretrain "
             f"--world {a.world} --out DIR`")
    return device, showo, cotgen.resolve_phi_dir(showo, phi), magvit_dir

def load_generator(folder: Path, phi: Path, device: torch.device) -> cotgen.Showo:
    return cotgen.load_showo(folder, phi, dtype=torch.float32, device=device)[0]    # fp32 master weights

def load_labeller(folder: Path, device: torch.device) -> verifiers.Verifier:
    """A reward model that labels images (no training): bf16 on GPU, fp32 on CPU."""
    return verifiers.load_verifier(folder, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                   device=device)

def tell_showo_written(a, out: Path, magvit_dir: Path | None, search: str = "") -> None:
    images = f"--world {a.world}" if a.world else f"--magvit {magvit_dir}"
    tell(f"wrote {out} (Show-o layout): python sample.py --showo {out} {images} {search}--prompt ...")

# ---- 3. dpo: DPO, iterative DPO and reward-model guidance (Sec. 3.3, 3.4) --------------------------------

def add_dpo_parser(sub) -> argparse.ArgumentParser:
    d = TrainConfig.preset("dpo")
    p = sub.add_parser("dpo", help="DPO, iterative DPO and DPO with reward-model guidance (Sec. 3.3, 3.4)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample.add_model_args(p, verifier="")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help='JSONL preference pairs, one {"prompt", "chosen", "rejected"} per line; chosen/rejected are '
                        "image paths (encoded with MAGVIT-v2, as released) or lists of image tokens")
    g.add_argument("--image-root", default=None, help="folder that relative image paths in --data start from "
                                                      "(default: the folder of the --data file)")
    g.add_argument("--prompts", default=None, help="prompt file (one per line) to curate pairs from; default: the "
                                                   "prompts of --data")
    g.add_argument("--geneval", type=int, default=None, metavar="N",
                   help="curate from N prompts in GenEval's six templates (data.training_prompts; with --world, N "
                        "of the world's training prompts, drawn as its pretraining draws them)")
    g.add_argument("--curate-samples", type=int, default=4, help="images generated per prompt when curating pairs "
                                                                 "(default 4)")
    g.add_argument("--pairs-per-prompt", type=int, default=1, metavar="K",
                   help="preference pairs kept per prompt when curating: up to K different (yes, no) image pairs "
                        "(default 1, as the paper; more suits a world with few distinct prompts)")
    g.add_argument("--judge", default="sample", choices=("sample", "greedy"),
                   help="how the verifier's yes/no label is decided when curating: sampled as the released code "
                        "does (default), or the most likely answer")
    add_optim_args(p, "optimisation (defaults: Sec. 3.3 and the released dpo.yaml)", d)
    g = p.add_argument_group("DPO")
    add_config_flags(g, d, {"beta": "DPO temperature β", "cond_dropout": "probability of dropping the prompt of a "
                            "training sequence, as released", "sft_coef": "weight of a cross-entropy term on the "
                            "chosen image, as released", "shared_mask": "mask chosen and rejected with one shared "
                            "ratio and positions (lower variance); by default they are masked independently, as "
                            "released"})
    g.add_argument("--rounds", type=int, default=1,
                   help="DPO rounds; round r > 1 curates new pairs with round r-1's model and trains from it, with it "
                        "as the reference (iterative DPO; the paper uses 2)")
    g = p.add_argument_group("reward-model guidance (Sec. 3.4)")
    add_config_flags(g, d, {"reward_coef": "weight of the online DPO term on the verifier's best vs worst sample of "
                            "the current policy (0 = off; the paper's guided run uses 0.1)",
                            "online_per_step": "prompts sampled for the online term each step",
                            "online_samples": "images sampled per online prompt; best and worst make the pair",
                            "gen_steps": "decoding steps when the model generates (curation, online term)",
                            "gen_cfg": "classifier-free guidance when the model generates"})
    g.add_argument("--online-prompts", default=None,
                   help="prompt-only file for the online term (default: the prompts of the round's pairs)")
    add_output_args(p, "output folder: the final model (Show-o layout), round_R/ with each round's pairs and "
                       "model, and the last checkpoint")
    return p

def check_dpo_args(a) -> None:
    check_optim_args(a)
    at_least(a, 1, "rounds", "curate_samples", "pairs_per_prompt", "gen_steps", "online_per_step", "geneval")
    at_least(a, 0, "gen_cfg", "sft_coef", "reward_coef")
    at_least(a, 0, "beta", above=True)
    if a.reward_coef and a.online_samples < 2:
        fail("--online-samples must be at least 2: the online pair is the best and the worst sample")
    if a.curate_samples < 2 and (a.data is None or a.rounds > 1):
        fail("--curate-samples must be at least 2 to find a 'yes' and a 'no' image")
    if a.data is None and a.prompts is None and a.geneval is None:
        fail("give the preference data: --data PAIRS.jsonl, or prompts to curate pairs from (--prompts FILE or "
             "--geneval N)")
    if a.prompts is not None and a.geneval is not None:
        fail("--prompts and --geneval both name the curation prompts: give one")
    # what the flags name is checked now, before round 1 claims --out: a corrected rerun must not be refused
    if a.verifier is not None and not Path(a.verifier).is_dir():
        fail(f"--verifier {a.verifier} is not a folder: pass a LLaVA-OneVision checkpoint folder")
    if a.verifier is None and not a.tiny and not a.world and (a.data is None or a.rounds > 1 or a.reward_coef):
        fail("curating pairs, --rounds > 1 and --reward-coef need the yes/no reward model: pass --verifier DIR "
             "(a LLaVA-OneVision folder, e.g. the fine-tuned ORM)")
    if a.online_prompts:
        data.read_prompts(a.online_prompts)

def dpo_objective(policy: cotgen.Showo, reference: cotgen.Showo, tok: cotgen.ShowoTokenizer, pairs: dpo.PairData,
                  cfg: TrainConfig, round_index: int = 1, magvit: cotgen.MAGVITv2 | None = None,
                  score: dpo.Scorer | None = None, online_prompts: Sequence[str] | None = None) -> Objective:
    """Sec. 3.3 (+ 3.4) as the trainer's objective: `dpo.preference_loss` on the step's pairs against the frozen
    `reference`; with reward_coef > 0, each step the policy samples `online_samples` images for
    `online_per_step` prompts (taken in turn) and the reward model's best and worst make the online pairs."""
    if cfg.reward_coef and (score is None or magvit is None):
        raise ValueError("reward-model guidance (reward_coef > 0) needs a scorer and MAGVIT-v2")
    reference.requires_grad_(False).eval()
    prompts = list(online_prompts) if online_prompts else list(dict.fromkeys(pairs.prompts))

    def objective(step: int, index: Sequence[int], g: torch.Generator, rows: slice = slice(None)):
        online, stats = None, {}
        if cfg.reward_coef and not rows.start:      # the online term is the step's: the share of pair 0 takes it
            chosen = [prompts[(step * cfg.online_per_step + j) % len(prompts)] for j in range(cfg.online_per_step)]
            online, stats = dpo.online_pairs(policy, tok, magvit, score, chosen, cfg.online_samples,
                                             derive_seed(cfg.seed, round_index, step, "online"), cfg.gen_steps,
                                             cfg.gen_cfg)
        loss, more = dpo.preference_loss(policy, reference, tok, pairs.batch(index), g, beta=cfg.beta,
                                         sft_coef=cfg.sft_coef, shared_mask=cfg.shared_mask,
                                         cond_dropout=cfg.cond_dropout, online=online, reward_coef=cfg.reward_coef,
                                         rows=rows)
        return loss, {**stats, **more}

    return objective

class DPORun:
    """One `train.py dpo` invocation: for each round, its pairs (given, or curated with the verifier from the
    previous round's model) saved as round_R/pairs.jsonl, then training, then round_R/model."""

    def __init__(self, a):
        self.a = a
        self.device, self.showo, self.phi, self.magvit_dir = showo_run(a)
        self.cfg = train_config(a, self.device, "dpo")
        self.verifier_dir = sample.verifier_dir(a)
        self.out = Path(a.out)
        self.magvit = sample.image_tokenizer(a, self.magvit_dir, device=self.device)

    def settings(self) -> dict:
        """What a resumed run must share with the interrupted one (compared before anything is trained)."""
        a = self.a
        return {"train": self.cfg.fingerprint(), "showo": "tiny" if a.tiny and not a.showo else resolved(self.showo),
                "data": resolved(a.data), "prompts": resolved(a.prompts), "geneval": a.geneval, "rounds": a.rounds,
                "curate_samples": a.curate_samples, "pairs_per_prompt": a.pairs_per_prompt, "judge": a.judge,
                "skip_bad": a.skip_bad, "online_prompts": resolved(a.online_prompts), "world": a.world,
                "verifier": resolved(self.verifier_dir)}

    def scorer(self, decide: str = "greedy", seed: int = 0) -> dpo.Scorer:
        """The labeller of pairs and of the online term: the reward model, or with --world and no --verifier the
        world's evaluator (the automatic labeller the verifiers are trained on)."""
        if self.a.world and self.verifier_dir is None:
            return dpo.evaluator_scorer()
        return dpo.verifier_scorer(self.verifier, decide, seed=seed)

    @cached_property
    def verifier(self) -> verifiers.Verifier:
        if self.verifier_dir is None:
            raise CheckpointError("curating pairs, --rounds > 1 and --reward-coef need the yes/no reward model: "
                                  "pass --verifier DIR (a LLaVA-OneVision folder, e.g. the fine-tuned ORM)")
        return load_labeller(self.verifier_dir, self.device)

    def given_pairs(self, config: cotgen.ShowoConfig) -> list[dict]:
        """Round 1 from --data: every record checked and encoded before the first step, so a bad record stops
        the run here (or is skipped with --skip-bad), never mid-epoch."""
        a = self.a
        records, problems = data.read_pair_records(a.data)
        progress = sample.Progress("data", 1, seconds=2.0)
        pairs, more = dpo.encode_pairs(records, config, self.magvit, a.image_root or Path(a.data).parent,
                                       where=str(a.data), progress=progress.note)
        stop_or_skip(problems + more, a.data, a.skip_bad)
        if len(pairs) == 0:
            raise DataError(f"{a.data} has no usable preference pair")
        return pairs.records()

    def curated_pairs(self, r: int, model: cotgen.Showo, tok) -> list[dict]:
        a = self.a
        if a.prompts:
            prompts = data.read_prompts(a.prompts)
        elif a.geneval and a.world:
            prompts = data.world_prompts(a.geneval, derive_seed(a.seed, r))
        elif a.geneval:
            prompts = data.training_prompts(a.geneval)
        else:
            prompts = list(dict.fromkeys(rec.prompt for rec in data.read_pair_records(a.data)[0]))
        score = self.scorer(a.judge, derive_seed(a.seed, r, "judge"))
        records, stats = dpo.curate_pairs(model, tok, self.magvit, score, prompts, a.curate_samples,
                                          seed=derive_seed(a.seed, r), steps=a.gen_steps, cfg=a.gen_cfg,
                                          per_prompt=a.pairs_per_prompt,
                                          progress=sample.Progress(f"round {r}", 1, seconds=2.0).note)
        print(f"[round {r}] curated {stats['pairs']} pairs from {stats['prompts']} prompts ({stats['dropped']} "
              "dropped: all images got the same label)", file=sys.stderr)
        if not records and r == 1:
            raise DataError(f"curation gave no pair: for every prompt all {a.curate_samples} images got the same "
                            "label; use more --curate-samples or other prompts")
        if not records:
            print(f"[round {r}] no pair: every prompt's images got one label, so there is nothing to prefer; round "
                  f"{r} keeps round {r - 1}'s model", file=sys.stderr)
        return records

    def round_pairs(self, r: int, model: cotgen.Showo, tok) -> dpo.PairData:
        """The round's pairs, kept as token lists in round_R/pairs.jsonl."""
        def make() -> list[dict]:
            records = self.given_pairs(model.config) if r == 1 and self.a.data else self.curated_pairs(r, model, tok)
            claim_out(self.out, self.settings())
            return records

        return made_once(self.out / f"round_{r}" / "pairs.jsonl", make, data.read_pair_records, dpo.encode_pairs,
                         model.config)

    def write(self, model: cotgen.Showo, folder: Path) -> None:
        cotgen.save_showo(model, folder, self.showo, self.phi)

    def train_round(self, r: int, start: Path) -> bool:
        """Round r from the model in `start` (policy and reference). False: stopped with a checkpoint."""
        a = self.a
        reference, tok = cotgen.load_showo(start, self.phi, dtype=torch.float32, device=self.device)
        pairs = self.round_pairs(r, reference, tok)
        if len(pairs) == 0:         # a later round with nothing to prefer (`curated_pairs`): its start stands
            with data.atomic_path(self.out / f"round_{r}" / "model", directory=True) as d:
                self.write(reference, d)
            return True
        score = self.scorer() if self.cfg.reward_coef > 0 else None
        online = data.read_prompts(a.online_prompts) if a.online_prompts else None

        def make(policy: cotgen.Showo) -> Trainer:
            objective = dpo_objective(policy, reference, tok, pairs, self.cfg, r, self.magvit, score, online)
            return Trainer(policy, objective, pairs.source, self.cfg, round_index=r)

        def publish(model: cotgen.Showo) -> None:
            with data.atomic_path(self.out / f"round_{r}" / "model", directory=True) as d:
                self.write(model, d)

        budget = None if a.stop_after is None else a.stop_after - self.steps_run
        trainer = resume_and_fit(a, self.out, f"dpo round {r}/{a.rounds}", start,
                                 lambda d: load_generator(d, self.phi, self.device), make, self.write,
                                 publish=publish, round_index=r, budget=budget)
        self.steps_run += trainer.step - trainer.resumed_at
        return trainer.done()

    def __call__(self) -> int:
        a = self.a
        guard_out(self.out, self.settings(), a.resume, "DPO")
        self.steps_run, start = 0, self.showo
        for r in range(1, a.rounds + 1):
            model_dir = self.out / f"round_{r}" / "model"
            if not (model_dir / "pytorch_model.safetensors").is_file() and not self.train_round(r, start):
                return 0
            start = model_dir
        for name in ("pytorch_model.safetensors", "config.json", "inference_config.yaml"):
            if first_process() and (start / name).is_file():
                with data.atomic_path(self.out / name) as tmp:
                    shutil.copyfile(start / name, tmp)
        tell_showo_written(a, self.out, self.magvit_dir)
        return 0

def run_dpo(a) -> int:
    check_dpo_args(a)
    return DPORun(a)()

# ---- 4. selfcorrect: PARM++'s self-correcting generator (Sec. 5) -----------------------------------------

SELFCORRECT_DOC = """PARM++ self-correction fine-tuning of Show-o (Sec. 5).

    python train.py selfcorrect --reflect outputs/reflect/reflect.json --out outputs/selfcorrect
    python train.py selfcorrect --data groups.jsonl --out outputs/selfcorrect
    python sample.py --showo outputs/selfcorrect --parm++ --prompt "a photo of two dogs"

Show-o learns the high-quality image from "{prompt}\nCorrection: {reason}" and the low-quality image (a first
image segment), with its masked-prediction cross-entropy on the image it generates."""

def add_selfcorrect_parser(sub) -> argparse.ArgumentParser:
    d = TrainConfig.preset("selfcorrect")
    p = sub.add_parser("selfcorrect", help="PARM++ self-correction fine-tuning of Show-o (Sec. 5)",
                       description=SELFCORRECT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample.add_model_args(p)
    g = p.add_argument_group("data (give --reflect or --data)")
    g.add_argument("--reflect", default=None,
                   help="reflect.json written by `train.py curate --task reflect` (images relative to its folder): "
                        "each 'no' image with its reason is paired with a 'yes' image of the same prompt")
    g.add_argument("--data", default=None,
                   help='JSONL self-correction groups, one {"prompt", "low", "reason", "high"} per line; low/high '
                        "are image paths (encoded with MAGVIT-v2) or lists of image tokens")
    g.add_argument("--image-root", default=None, help="folder that relative image paths in --data start from "
                                                      "(default: the folder of the --data file)")
    g = add_optim_args(p, "optimisation (the paper gives none for Sec. 5: DPO's recipe, Sec. 3.3)", d)
    add_config_flags(g, d, {"cond_dropout": "probability of dropping prompt and reason (the low-quality image "
                            "stays), as Show-o's training drops the text"})
    add_output_args(p, "output folder: the fine-tuned Show-o (Show-o layout, for sample.py --showo OUT --parm++), "
                       "groups.jsonl (the training groups as image tokens) and the last checkpoint")
    return p

def check_selfcorrect_args(a) -> None:
    check_optim_args(a)
    if a.reflect is None and a.data is None:
        fail("give the self-correction data: --reflect REFLECT.json (written by `train.py curate --task reflect`, "
             "with --tiny too) or --data GROUPS.jsonl with {\"prompt\", \"low\", \"reason\", \"high\"} lines")
    if a.reflect is not None and a.data is not None:
        fail("--reflect and --data both name the training data: give one")
    if a.image_root is not None and a.reflect is not None:
        fail("--image-root applies to --data; the images of reflect.json are relative to its own folder")

def correction_groups(a, config: cotgen.ShowoConfig, magvit: cotgen.MAGVITv2) -> dpo.CorrectionData:
    """Read, check and encode every group before the first step (a bad record stops the run here)."""
    source = a.reflect or a.data
    if a.reflect:
        reflected, problems = data.read_reflect_records(a.reflect)
        records, skipped = data.correction_groups(reflected)
        print(f"[data] {len(records)} groups from {len(reflected)} records of {a.reflect}; {len(skipped)} "
              "prompt(s) skipped (no 'yes' or no 'no' image)", file=sys.stderr)
        root = Path(a.reflect).parent
    else:
        records, problems = data.read_correction_records(a.data)
        root = a.image_root or Path(a.data).parent
    groups, more = dpo.encode_groups(records, config, magvit, root, str(source),
                                     progress=sample.Progress("data", 1, seconds=2.0).note)
    stop_or_skip(problems + more, source, a.skip_bad)
    if len(groups) == 0:
        raise DataError(f"{source} gives no self-correction group: it needs, for some prompt, a 'no' image with "
                        "its reason and a 'yes' image" if a.reflect else f"{source} has no usable group")
    return groups

def run_selfcorrect(a) -> int:
    check_selfcorrect_args(a)
    device, showo, phi, magvit_dir = showo_run(a)
    cfg = train_config(a, device, "selfcorrect")
    out = Path(a.out)
    settings = {"train": cfg.fingerprint(), "showo": "tiny" if a.tiny and not a.showo else resolved(showo),
                "reflect": resolved(a.reflect), "data": resolved(a.data), "image_root": resolved(a.image_root),
                "skip_bad": a.skip_bad, "world": a.world}
    if begin(out, settings, a.resume, "self-correction"):
        return 0
    base, tok = cotgen.load_showo(showo, phi, dtype=torch.float32, device=device)
    if base.config.order != "masked":
        fail(f"{showo} is a {base.config.order} generator: self-correction (PARM++) is for Show-o's masked one")

    def make() -> list[dict]:
        groups = correction_groups(a, base.config, sample.image_tokenizer(a, magvit_dir, device=device))
        claim_out(out, settings)
        return groups.records()

    groups = made_once(out / "groups.jsonl", make, data.read_correction_records, dpo.encode_groups, base.config)

    def trainer_of(model: cotgen.Showo) -> Trainer:
        return Trainer(model, lambda step, index, g, rows=slice(None): dpo.self_correction_loss(  # noqa: E731
            model, tok, groups.batch(index), g, cfg.cond_dropout, rows), groups.source, cfg)

    write = lambda model, d: cotgen.save_showo(model, d, showo, phi)  # noqa: E731
    load = lambda d: base if d == showo else load_generator(d, phi, device)  # noqa: E731
    if resume_and_fit(a, out, "selfcorrect", showo, load, trainer_of, write, budget=a.stop_after).done():
        tell_showo_written(a, out, magvit_dir, "--parm++ ")
    return 0

# ---- 5. curate: ranking data for the reward models (Sec. 3.2 ORM and PRM, Sec. 4 PARM, Sec. 5 PARM++) ----

CURATE_DOC = """Ranking data for fine-tuning the reward models, in LLaVA's conversation format (Sec. 3.2, 4, 5).

    python train.py curate --task orm --num-prompts 13000 --exclude geneval/generation_prompts.txt --out data/orm
    python train.py curate --task prm|parm|reflect --prompts data/prompts.txt --out data/TASK
    python train.py curate --tiny --task orm --num-prompts 6 --samples 4 --out outputs/orm-data

Show-o generates --samples paths per prompt, each with its own seed; the --verifier labels them (orm: final
images; prm: every step, "yes" if any of --rollouts continuations ends "yes"; parm: clarity by the paper's static
rule, potential answered by the final label, plus --orm-fraction of the orm records; reflect: "yes", or "no" with
the reason). Writes OUT/TASK.json and OUT/images/; each prompt is saved as it finishes (--resume continues).

--world shapes --task scenes needs no generator: --num-prompts N painted scenes, each with a caption record and an
outcome question on a drawn prompt answered by the evaluator (data.verifier_scenes): the world verifier's
pretraining, as LLaVA-OneVision learns captions and questions before the paper fine-tunes it. Without it, a
verifier trained from scratch on the generator's images answers from the prompt alone (README)."""

CURATE_TASKS = ("orm", "prm", "parm", "reflect", "scenes")
CURATE_SAMPLES = {"orm": 50, "prm": 1, "parm": 2, "reflect": 50}   # orm: the paper's ~50; prm: one path

def add_curate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("curate", help="ranking data for ORM / PRM / PARM / PARM++ (Sec. 3.2, 4, 5)",
                       description=CURATE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=CURATE_TASKS, help="which reward model's data to make")
    sample.add_model_args(p, verifier="weights/llava-onevision-qwen2-7b-ov")
    g = p.add_argument_group("prompts (give --prompts or --num-prompts)")
    g.add_argument("--prompts", default=None, help="prompt file, one prompt per line")
    g.add_argument("--num-prompts", type=int, default=None, metavar="N",
                   help="generate N prompts from GenEval's six templates (data.training_prompts)")
    g.add_argument("--objects", default=None, help="object names for --num-prompts, one per line "
                                                   "(default: data.GENEVAL_OBJECTS)")
    g.add_argument("--colors", default=None, help="colour names for --num-prompts, one per line "
                                                  "(default: GenEval's ten colours)")
    g.add_argument("--exclude", action="append", default=[], metavar="FILE",
                   help="prompt file whose prompts are left out (GenEval's generation_prompts.txt, as the paper "
                        "filters its test prompts); may be repeated")
    g = p.add_argument_group("generation and labels")
    g.add_argument("--samples", type=int, default=None, help="paths per prompt (default: orm 50, as the paper; "
                                                             "prm 1; parm 2; reflect 50)")
    g.add_argument("--temperature", type=float, default=1.5,
                   help="start temperature of Show-o's annealed re-masking noise; higher gives more varied images "
                        "(default 1.5: the paper says 'high' and gives no value; Show-o's default is 1)")
    g.add_argument("--steps", type=int, default=18, help="decoding steps (default 18, as the paper)")
    g.add_argument("--cfg", type=float, default=1.75, help="classifier-free guidance scale (default 1.75)")
    g.add_argument("--rollouts", type=int, default=4, help="prm: continuations per step (default 4, as the paper)")
    g.add_argument("--judge", default="sample", choices=("sample", "greedy"),
                   help="how the verifier's yes/no is decided: sampled as the released code does (default), or "
                        "the most likely answer")
    g.add_argument("--judge-batch", type=int, default=16, help="images per verifier call (default 16)")
    g.add_argument("--clarity-steps", dest="clarity", type=int, nargs=2, default=None, metavar=("A", "B"),
                   help="parm: the static clarity rule, in steps of 18: 'no' before step A, 'yes' after step B, no "
                        "record between (default 10 11, the paper's; with --world, the world's own: "
                        "data.WORLD_CLARITY)")
    g.add_argument("--orm-fraction", type=float, default=0.7,
                   help="parm: share of the ORM records mixed into parm.json (default 0.7, as released)")
    g.add_argument("--reasons", default=None,
                   help='reflect: JSONL {"id" or "image", "reason"} giving the reason of every "no" image, instead '
                        "of the verifier's free text")
    g.add_argument("--max-reason-tokens", type=int, default=64,
                   help="reflect: longest reason the verifier writes, in tokens (default 64)")
    g.add_argument("--seed", type=int, default=0, help="seed of every path, prompt order and mixing (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder: TASK.json, images/, and the per-prompt parts "
                                                "while the run is under way")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    return p

def check_curate_args(a) -> None:
    at_least(a, 1, "samples", "num_prompts", "steps", "rollouts", "judge_batch", "max_reason_tokens")
    at_least(a, 0, "temperature", "cfg")
    a.clarity = list(a.clarity or (data.WORLD_CLARITY if a.world else PAPER_CLARITY))   # a list: JSON settings
    if not 1 <= a.clarity[0] <= a.clarity[1] + 1 <= 19:
        fail(f"--clarity-steps {a.clarity[0]} {a.clarity[1]}: need 1 <= A <= B + 1 <= 19 (in steps of 18)")
    if not 0 <= a.orm_fraction <= 1:
        fail(f"--orm-fraction must be in [0, 1] (got {a.orm_fraction})")
    if (a.prompts is None) == (a.num_prompts is None):
        fail("give the prompts: --prompts FILE, or --num-prompts N to generate them from GenEval's templates "
             "(not both)")
    if a.prompts is not None and (a.objects or a.colors):
        fail("--objects and --colors build the --num-prompts prompts; with --prompts FILE leave them out")
    if a.world and (a.objects or a.colors or a.reasons or a.verifier or a.tiny):
        fail(f"--world {a.world} labels with the world's evaluator and draws from its own prompts: leave out "
             "--objects, --colors, --reasons, --verifier and --tiny")
    if a.reasons is not None and a.task != "reflect":
        fail("--reasons applies to --task reflect only")
    if a.task == "prm" and a.steps < 2:
        fail("--task prm needs --steps of at least 2: the rollouts continue from an intermediate step")
    if a.task == "scenes" and not (a.world and a.num_prompts and not a.showo):
        fail("--task scenes paints a world's scenes (no generator): give --world shapes and --num-prompts N (the "
             "number of scenes), and leave out --prompts and --showo")

def curation_prompts(a) -> list[str]:
    """The prompts of a curate run: a file (test prompts left out) or the template generator."""
    exclude = [p for f in a.exclude for p in data.read_prompts(f)]
    if a.prompts:
        skip = {data.prompt_key(p) for p in exclude}
        prompts = [p for p in data.read_prompts(a.prompts) if data.prompt_key(p) not in skip]
        if not prompts:
            raise DataError(f"every prompt of {a.prompts} is in the --exclude list: nothing is left to curate")
        return prompts
    if a.world:
        return data.world_prompts(a.num_prompts, a.seed)
    kw = {}
    if a.objects:
        kw["objects"] = data.read_prompts(a.objects)
    if a.colors:
        kw["colors"] = data.read_prompts(a.colors)
    return data.training_prompts(a.num_prompts, exclude=exclude, seed=a.seed, **kw)

def prm_rollouts(model, tok, prompt: str, main_generator, rollout_generators, *, steps: int, cfg: float,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 3.2, PRM ranking data (Math-Shepherd style): decode one path, and after each step i < S branch R
    continuations from its state (`Paths.copy_state`), each with its own generator
    (`rollout_generators[i][r]`). Every continuation joins the same batch as it is made, so they all finish
    with the path. Returns the path's x̂0 at every step [S, N] and the continuations' final codes
    [S - 1, R, N] (row i: branched after step i + 1, 1-based)."""
    R = len(rollout_generators[0])
    flat = [g for per_step in rollout_generators for g in per_step]
    paths = cotgen.open_paths(model, tok, prompt, 1 + len(flat), steps=steps, cfg=cfg, temperature=temperature,
                              generators=[main_generator, *flat])
    for j in range(1, paths.n):
        paths.stop(j)                                  # a continuation waits until its step is reached
    history = []
    for step in paths:
        history.append(step.x0[0])                     # path 0, the main path, is always live and first
        i = step.step[0]
        if i + 1 < steps:
            for r in range(R):
                paths.copy_state(0, 1 + i * R + r)     # copies "not stopped" too: it runs from the next step
    return torch.stack(history), paths.final_tokens()[1:].view(steps - 1, R, -1)

def prm_labels(rollout_yes: torch.Tensor, final_yes: torch.Tensor) -> torch.Tensor:
    """Sec. 3.2: step i is "yes" if any of its continuations ends in a "yes" image ([S-1, R] bool); the last
    step has no continuation, so its label is the path's own final judgment. Returns [S] bool."""
    return torch.cat((rollout_yes.any(dim=1), final_yes.reshape(1)))

PAPER_CLARITY = (10, 11)    # Sec. 4: Show-o's first clear image comes "between steps 8 and 12 of 18": "no"
                            # before step 10, "yes" after step 11

def clarity_label(step: int, steps: int = 18, rule: tuple[int, int] = PAPER_CLARITY) -> str | None:
    """Sec. 4, the static clarity rule for 1-based step `step` of `steps`, rule = (a, b) in steps of 18: "yes"
    after step b, "no" before step a, no label from a to b (the thresholds scaled by steps/18 for other step
    counts). The paper's rule is (10, 11); a world sets its own from its curve of first clear steps
    (data.WORLD_CLARITY)."""
    first, last = rule
    if step * 18 > last * steps:
        return "yes"
    if step * 18 < first * steps:
        return "no"
    return None

def judge_codes(magvit, score, codes: torch.Tensor, prompt: str, batch: int):
    """Decode codes [k, N] and judge them with `score` (dpo.Scorer) in batches. Returns (uint8 images
    [k, H, W, 3], p_yes [k], yes [k])."""
    pics, p_yes, yes = [], [], []
    for s in range(0, codes.shape[0], batch):
        with torch.inference_mode():
            images = magvit.decode_code(codes[s:s + batch])
        p, y = score(images, [prompt] * images.shape[0])
        pics.append(data.to_uint8_image(images))
        p_yes.append(torch.as_tensor(p, dtype=torch.float32).cpu())
        yes.append(torch.as_tensor(y, dtype=torch.bool).cpu())
    return np.concatenate(pics), torch.cat(p_yes), torch.cat(yes)

def strip_no(text: str) -> str:
    """The reason in a reflection answer: a leading "no" (and the punctuation after it) is dropped."""
    return re.sub(r"^\s*no\b[\s.,:;!-]*", "", text, flags=re.IGNORECASE).strip()

class Curate:
    """One `train.py curate` invocation. Prompt j's records and images are made by `prompt_records` from seeds
    that depend only on (--seed, j), saved under OUT/.parts/, and gathered into OUT/TASK.json at the end."""

    def __init__(self, a, model, tok, magvit, score_for, explain):
        self.a, self.model, self.tok, self.magvit = a, model, tok, magvit
        self.score_for = score_for          # prompt index -> dpo.Scorer (seeded per prompt)
        self.explain = explain              # (uint8 images, prompt) -> why each is wrong (reflect)
        self.out = Path(a.out)
        self.samples = a.samples or CURATE_SAMPLES[a.task]
        self.device = model.embed_tokens.weight.device

    def gen(self, j: int, *parts) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(derive_seed(self.a.seed, j, *parts))

    @staticmethod
    def image(j: int, k: int, step: int | None = None) -> str:
        """Path k of prompt j: its image file after 1-based `step` (None: its final image), relative to --out."""
        return f"images/p{j:06d}/k{k:02d}" + ("" if step is None else f"-s{step:02d}") + ".png"

    @staticmethod
    def record_id(task: str, j: int, k: int, step: int | None = None) -> str:
        """The id of a `task` record on path k of prompt j (after 1-based `step`; None: on its final image)."""
        return f"{task}-p{j:06d}-k{k:02d}" + ("" if step is None else f"-s{step:02d}")

    @staticmethod
    def record_step(rid: str) -> int | None:
        """`record_id`'s step back from an id ("clarity-p000003-k01-s07" -> 7); None for a record on a final image
        or one curated elsewhere."""
        m = re.search(r"-s(\d+)$", rid)
        return int(m.group(1)) if m else None

    @staticmethod
    def step_record(task: str, j: int, k: int, step: int, question: Sequence[str], prompt: str, label: str) -> dict:
        """A record on path k's image after 1-based `step` (PRM, clarity, potential): `question` answered `label`."""
        return data.llava_record(Curate.record_id(task, j, k, step), Curate.image(j, k, step),
                                 [*question, label], prompt=prompt, label=label, task=task, step=step)

    def prompt_records(self, j: int, prompt: str) -> tuple[list[dict], dict[str, np.ndarray]]:
        """Prompt j's records (LLaVA format plus prompt/label/task fields) and images {relative path: uint8}."""
        if self.a.task == "prm":
            return self.prm_records(j, prompt)
        a, K, S = self.a, self.samples, self.a.steps
        _, history = cotgen.generate(self.model, self.tok, prompt, K, generators=[self.gen(j, k) for k in range(K)],
                                     history=True, steps=S, cfg=a.cfg, temperature=a.temperature)
        pics, p_yes, yes = judge_codes(self.magvit, self.score_for(j), history[:, -1], prompt, a.judge_batch)
        no = [k for k in range(K) if not yes[k]]
        reasons = {}
        if a.task == "reflect" and a.reasons is None and no:
            reasons = dict(zip(no, self.explain([pics[k] for k in no], prompt)))
        records, images = [], {}
        for k in range(K):
            label = "yes" if yes[k] else "no"
            final = self.image(j, k, S if a.task == "parm" else None)
            images[final] = pics[k]
            if a.task == "reflect":
                question = verifiers.reflection_question(prompt)
                records.append(data.llava_record(self.record_id("reflect", j, k), final, [question, label],
                                                 prompt=prompt, label=label, reason=reasons.get(k), task="reflect"))
                continue
            question = verifiers.orm_question(prompt)
            records.append(data.llava_record(self.record_id("orm", j, k), final, [question, label], prompt=prompt,
                                             label=label, task="orm", p_yes=round(float(p_yes[k]), 6)))
            if a.task == "parm":
                self.clarity_records(j, k, prompt, history[k], label, records, images)
        return records, images

    def prm_records(self, j: int, prompt: str) -> tuple[list[dict], dict[str, np.ndarray]]:
        """Sec. 3.2, PRM: every step's image of each path, labelled by the Math-Shepherd rule over rollouts."""
        a, S, score = self.a, self.a.steps, self.score_for(j)
        records, images = [], {}
        for k in range(self.samples):
            rollout_gens = [[self.gen(j, k, "rollout", i, r) for r in range(a.rollouts)] for i in range(S - 1)]
            history, finals = prm_rollouts(self.model, self.tok, prompt, self.gen(j, k), rollout_gens, steps=S,
                                           cfg=a.cfg, temperature=a.temperature)
            _, _, roll_yes = judge_codes(self.magvit, score, finals.flatten(0, 1), prompt, a.judge_batch)
            _, _, final_yes = judge_codes(self.magvit, score, history[-1:], prompt, a.judge_batch)
            labels = prm_labels(roll_yes.view(S - 1, a.rollouts), final_yes)
            for i, pic in enumerate(sample.decode_images(self.magvit, history), 1):
                images[self.image(j, k, i)] = pic
                records.append(self.step_record("prm", j, k, i, [verifiers.prm_question(prompt)], prompt,
                                                "yes" if labels[i - 1] else "no"))
        return records, images

    def clarity_records(self, j: int, k: int, prompt: str, history: torch.Tensor, label: str, records: list,
                        images: dict) -> None:
        """Sec. 4, PARM: clarity records by the static rule, and a potential record (answered by the path's final
        label) after each clear step; adds the step images not saved yet."""
        S = self.a.steps
        labelled = [(i, clarity_label(i, S, self.a.clarity)) for i in range(1, S + 1)
                    if clarity_label(i, S, self.a.clarity)]
        earlier = [i for i, _ in labelled if i < S]     # the last step's image is the final one, saved already
        if earlier:
            for i, pic in zip(earlier, sample.decode_images(self.magvit, history[[i - 1 for i in earlier]])):
                images[self.image(j, k, i)] = pic
        for i, clear in labelled:
            records.append(self.step_record("clarity", j, k, i, [verifiers.clarity_question(prompt)], prompt, clear))
            if clear == "yes":
                records.append(self.step_record("potential", j, k, i, verifiers.potential_question(prompt), prompt,
                                                label))

    def finish(self, records: list[dict]) -> list[dict]:
        """The whole run's records as TASK.json holds them: parm mixes in --orm-fraction of its ORM records
        (ceil, seeded); reflect attaches the reasons and writes each answer."""
        a = self.a
        if a.task == "parm":
            orm = [r for r in records if r["task"] == "orm"]
            g = torch.Generator().manual_seed(derive_seed(a.seed, "mix"))
            keep = set(torch.randperm(len(orm), generator=g)[:math.ceil(a.orm_fraction * len(orm))].tolist())
            kept = {id(r) for n, r in enumerate(orm) if n in keep}
            return [r for r in records if r["task"] != "orm" or id(r) in kept]
        if a.task != "reflect":
            return records
        given = data.read_reasons(a.reasons) if a.reasons else {}
        missing, out, dropped = [], [], 0
        for r in records:
            if r["label"] == "no" and a.reasons:
                r["reason"] = given.get(r["id"], given.get(r["image"]))
                if r["reason"] is None:
                    missing.append(r["id"])
                    continue
            if r["label"] == "no" and not r["reason"]:
                dropped += 1            # the verifier wrote nothing but "no": there is no reason to learn
                continue
            r["conversations"][1]["value"] = "yes" if r["label"] == "yes" else f"no. {r['reason']}"
            out.append(r)
        if missing:
            raise DataError(f"{a.reasons} has no reason for {len(missing)} \"no\" image(s): {', '.join(missing[:10])}"
                            f"{' ...' if len(missing) > 10 else ''}; add lines {{\"id\": ..., \"reason\": ...}} for "
                            "them and run again with --resume")
        if dropped:
            print(f"[curate reflect] dropped {dropped} \"no\" image(s) whose reflection gave no reason",
                  file=sys.stderr)
        return out

    def __call__(self, prompts: list[str]) -> Path:
        """Under torchrun prompt j is made by process j mod K (its seeds depend on j, not on the process); once
        every process is done, the first gathers the parts into TASK.json."""
        a, parts = self.a, self.out / ".parts"
        rank, processes = sample.world()
        mine = range(rank, len(prompts), processes)
        progress = sample.Progress(f"curate {a.task}", len(mine), unit="prompt", seconds=2.0)
        for n, j in enumerate(mine):
            part = parts / f"p{j:06d}.json"
            if read_part(part, f"curate {a.task}") is not None:
                continue
            records, images = self.prompt_records(j, prompts[j])
            for rel, pic in images.items():
                data.save_png(pic, self.out / rel)
            data.write_json(records, part, indent=None)     # last: a prompt counts as done once this exists
            progress(n + 1, f"{len(records)} records")
        sync()
        target = self.out / f"{a.task}.json"
        if not first_process():
            return target
        records = [r for j in range(len(prompts)) for r in read_part(parts / f"p{j:06d}.json", "curate")]
        records = self.finish(records)
        data.write_json(records, target, indent=1)
        shutil.rmtree(parts, ignore_errors=True)
        counts = Counter((r["task"], r["label"]) for r in records)
        summary = ", ".join(f"{t} {l} {n}" for (t, l), n in sorted(counts.items()))
        print(f"[curate {a.task}] wrote {target}: {len(records)} records from {len(prompts)} prompts ({summary})",
              file=sys.stderr)
        return target

def curate_settings(a) -> dict:
    """What a resumed curate run must share with the interrupted one."""
    keys = ("task", "num_prompts", "samples", "temperature", "steps", "cfg", "rollouts", "judge", "orm_fraction",
            "seed", "max_reason_tokens", "clarity")
    return {**{k: getattr(a, k) for k in keys}, "prompts": resolved(a.prompts), "objects": resolved(a.objects),
            "colors": resolved(a.colors), "exclude": [resolved(e) for e in a.exclude],
            "reasons_file": a.reasons is not None, "world": a.world,
            "models": [resolved(a.showo) or "tiny" * a.tiny, resolved(a.verifier) or "tiny" * a.tiny]}

def run_curate(a) -> int:
    check_curate_args(a)
    out, settings = Path(a.out), curate_settings(a)
    if begin(out, settings, a.resume, "curate", done=f"{a.task}.json"):
        return 0
    if a.task == "scenes":
        claim_out(out, settings)
        return curate_scenes(a)
    prompts = curation_prompts(a)
    if a.reasons:       # read now, so a bad reasons file stops the run before any image is generated
        data.read_reasons(a.reasons)
    device, showo, phi, magvit_dir = showo_run(a)
    model, tok = cotgen.load_showo(showo, phi, dtype=torch.float32, device=device)
    magvit = sample.image_tokenizer(a, magvit_dir, device=device)
    if a.world:     # the automatic labeller: the world's evaluator, its failure as the reason
        score_for, labeller = (lambda j: dpo.evaluator_scorer()), f"the {a.world} world's evaluator"
        explain = lambda pics, prompt: [data.judge_prompt(p, prompt)[1] for p in pics]  # noqa: E731
    else:
        score_for, explain, labeller = verifier_labeller(a, device)
    claim_out(out, settings)
    tell(f"[curate {a.task}] {len(prompts)} prompts, {a.samples or CURATE_SAMPLES[a.task]} paths each, labelled "
         f"by {labeller}")
    Curate(a, model, tok, magvit, score_for, explain)(prompts)
    return 0

def curate_scenes(a) -> int:
    """--task scenes: the world verifier's pretraining records, two per painted scene (data.verifier_scenes): its
    caption, and the outcome question (Sec. 3.2) on a drawn prompt with the evaluator's answer. The first process
    writes them all (no generator runs: about a minute for 24,000); scenes.json is written last."""
    out = Path(a.out)
    if first_process():
        records = []
        progress = sample.Progress("curate scenes", a.num_prompts, unit="scene", seconds=2.0)
        for i, (image, prompt, text, ok) in enumerate(data.verifier_scenes(a.num_prompts, a.seed)):
            name, label = f"images/s{i:06d}.png", "yes" if ok else "no"
            data.save_png(image, out / name)
            records.append(data.llava_record(f"caption-s{i:06d}", name, [verifiers.CAPTION_QUESTION, text],
                                             task="caption"))
            records.append(data.llava_record(f"orm-s{i:06d}", name, [verifiers.orm_question(prompt), label],
                                             prompt=prompt, label=label, task="orm"))
            progress(i + 1)
        data.write_json(records, out / "scenes.json", indent=1)
        yes = sum(r.get("label") == "yes" for r in records)
        tell(f"[curate scenes] wrote {out / 'scenes.json'}: {a.num_prompts} scenes, each captioned and judged "
             f"({yes} yes, {a.num_prompts - yes} no)")
    sync()
    return 0

def verifier_labeller(a, device: torch.device):
    """Curation labels from a LLaVA-OneVision verifier: (prompt index -> scorer, reflection reasons, its name)."""
    verifier_dir = sample.verifier_dir(a)
    if not verifier_dir.is_dir():
        fail(f"verifier folder {verifier_dir} not found: pass --verifier DIR (a LLaVA-OneVision checkpoint) or --tiny")
    verifier = load_labeller(verifier_dir, device)
    score_for = lambda j: dpo.verifier_scorer(verifier, a.judge, seed=derive_seed(a.seed, j, "judge"))  # noqa: E731
    explain = lambda pics, prompt: [strip_no(t) for t in verifier.reflect(pics, [prompt] * len(pics),  # noqa: E731
                                                                        a.max_reason_tokens)]
    return score_for, explain, verifier_dir

# ---- 6. orm, parm: supervised fine-tuning of the LLaVA-OneVision reward model (Sec. 3.2, 4, 5) -----------

SFT_DOC = """Fine-tune LLaVA-OneVision as a reward model on curated conversations (the released LLaVA-NeXT recipe).

    python train.py orm --data data/orm/orm.json --base weights/llava-onevision-qwen2-7b-ov --out weights/orm_ft
    python train.py parm --data data/parm/parm.json [--data data/reflect/reflect.json] --out weights/parm
    python sample.py --parm --verifier weights/parm --prompt "a photo of two dogs"

    python train.py orm --world shapes --data data/orm/orm.json --heldout data/orm1/orm.json --out runs/orm_ft

Next-token cross-entropy on the assistant turns (--labels); AdamW, lr 1e-5 (2e-6 for the SigLIP tower), cosine
with 3% warm-up, clipping at 1.0, one epoch. --out gets the lmms-lab layout (bf16) that `--verifier OUT` loads;
checkpoints keep fp32 weights, so --resume continues exactly.

--world (README: The paper in miniature) has no downloaded LLaVA to start from: the same model at the size of
LlavaConfig preset "world", with a tokenizer of the world's texts, is written untrained to OUT/init and trained from
scratch (or from a world verifier given as --base, as the pipeline starts from one pretrained on painted scenes:
`curate --world shapes --task scenes`), by default with lr 1e-3 for the LM and the tower, batch 32, 8 epochs, 5%
warm-up (the flags still override them). --heldout FILE (curated with another --seed) is judged at the end by the
saved verifier, greedily as the searches judge, and the accuracy per task (orm, prm, clarity, potential, reflect)
goes to OUT/heldout.json."""

SFT_BASE = "weights/llava-onevision-qwen2-7b-ov"
HELDOUT_TASKS = ("orm", "prm", "clarity", "potential", "reflect")
WORLD_REASONS = 300     # reflection answers in the world tokenizer's corpus: enough to hold every reason's words
# std of the world verifier's initial weights: with GPT-2's 0.02 a width-128 model starts with near-uniform
# attention (verifiers._tiny_model notes the same), and the first world ORM's p(yes) hardly moved with the image
WORLD_INIT_STD = 0.15

SFT_HELP = {"orm": "fine-tune the ORM (or PRM) on curated yes/no data (Sec. 3.2)",
            "parm": "fine-tune PARM, or PARM++ with reflect.json added (Sec. 4, 5)"}

def add_sft_parser(sub, task: str) -> argparse.ArgumentParser:
    d = TrainConfig.preset("sft")
    p = sub.add_parser(task, help=SFT_HELP[task], description=SFT_DOC,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = sample.add_model_args(p, generator=False)
    g.add_argument("--base", default=None,
                   help=f"lmms-lab LLaVA-OneVision folder to fine-tune (default: the paper's 7B base, {SFT_BASE}; "
                        "--tiny: the built-in tiny one; --world: a world verifier to start from, e.g. one trained "
                        "on `curate --task scenes` data, instead of an untrained one)")
    g.add_argument("--world", choices=sample.WORLDS, default=None,
                   help="train a miniature world's verifier (from scratch unless --base; see above)")
    g.add_argument("--save-dtype", default="bf16", choices=("bf16", "fp32"),
                   help="dtype of the saved model (default bf16, as the released checkpoints)")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="LLaVA conversation JSON (or JSONL) written by `train.py curate`; repeat to mix files")
    g.add_argument("--image-root", default=None,
                   help="folder that relative image paths start from (default: each data file's folder)")
    g.add_argument("--fraction", type=float, default=1.0,
                   help="use this share of the records, a seeded random subset (the released ORM run used 0.5 of "
                        "its orm.json; default 1)")
    g.add_argument("--labels", default=d.label_rule, choices=verifiers.LABEL_RULES,
                   help="which tokens carry the loss: 'released' = every assistant-turn token plus each newline, "
                        "<|im_start|> and <|im_end|> (LLaVA-NeXT's rule, default); 'answer' = the answers and "
                        "their closing <|im_end|> only")
    g.add_argument("--heldout", default=None, metavar="FILE",
                   help="curated conversations (another --seed's TASK.json) to judge with the trained verifier at "
                        "the end: accuracy per task, printed and written to OUT/heldout.json")
    g = add_optim_args(p, "optimisation (defaults: the released orm_ft / parm runs; --world: see above)", d)
    add_config_flags(g, d, {"vision_lr": "AdamW lr of the SigLIP tower", "freeze_vision": "keep the SigLIP tower "
                            "fixed", "max_grad_norm": "clip the gradient norm to this; 0 = no clipping"})
    add_output_args(p, "output folder: the fine-tuned verifier (lmms-lab layout, for --verifier OUT) and the last "
                       "checkpoint while training")
    # the flags whose default --world changes stay None until `sft_defaults` knows whether --world was given
    world = TrainConfig.preset("world_sft")
    p.set_defaults(**{f: None for f in TrainConfig.__dataclass_fields__
                      if p.get_default(f) is not None and getattr(world, f) != getattr(d, f)})
    return p

def sft_defaults(a) -> None:
    """Fill the flags the user left at their default with the run's preset: "world_sft" with --world, else "sft"."""
    preset = TrainConfig.preset("world_sft" if a.world else "sft")
    for f in TrainConfig.__dataclass_fields__:
        if getattr(a, f, 0) is None and getattr(preset, f) is not None:
            setattr(a, f, getattr(preset, f))

def check_sft_args(a) -> None:
    if a.world and a.tiny:
        fail(f"--world {a.world} trains its own verifier (from scratch, or from a world verifier given as --base): "
             "leave out --tiny")
    if a.heldout and not Path(a.heldout).is_file():
        fail(f"--heldout {a.heldout} not found: pass a TASK.json written by `train.py curate` (another --seed)")
    check_optim_args(a)
    at_least(a, 0, "vision_lr", above=True)
    at_least(a, 0, "max_grad_norm")
    if not 0 < a.fraction <= 1:
        fail(f"--fraction must be in (0, 1] (got {a.fraction})")

def sft_examples(a, tokenizer, cfg: TrainConfig) -> verifiers.SFTData:
    """Every --data file read, checked and tokenised before the first step (bad records stop the run here),
    then the seeded --fraction subset."""
    records, problems = [], []
    for f in a.data:
        good, bad = data.read_conversations(f, a.image_root)
        records += good
        problems += bad
    decoded = []            # every image is decoded once now, so a bad one stops the run before step 1
    for rec in records:
        try:
            data.load_image(rec.image)
            decoded.append(rec)
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"{rec.where}: {e}")
    records = decoded
    examples, more = verifiers.encode_conversations(tokenizer, records, cfg.label_rule)
    stop_or_skip(problems + more, ", ".join(a.data), a.skip_bad)
    if len(examples) == 0:
        raise DataError(f"{', '.join(a.data)} hold no usable training conversation")
    if a.fraction < 1:
        g = torch.Generator().manual_seed(derive_seed(a.seed, "fraction"))
        keep = sorted(torch.randperm(len(examples), generator=g)[:math.ceil(a.fraction * len(examples))].tolist())
        fields = ("ids", "labels", "images", "source")
        examples = verifiers.SFTData(*([getattr(examples, f)[i] for i in keep] for f in fields))
    return examples

def sft_trainer(verifier: verifiers.Verifier, examples: verifiers.SFTData, cfg: TrainConfig) -> Trainer:
    """Sec. 3.2 / 4 / 5: fine-tune the reward model on `verifiers.sft_loss`, the released parameter groups (the
    SigLIP tower at `vision_lr`, or frozen) and gradient clipping."""
    model = verifier.model
    for p in model.vision.parameters():
        p.requires_grad_(not cfg.freeze_vision)

    def objective(step: int, index: Sequence[int], g: torch.Generator, rows: slice = slice(None)):
        tokens = verifiers.sft_token_count([examples.ids[i] for i in index], [examples.labels[i] for i in index])
        mine = list(index)[rows]            # the mean is over the whole batch's tokens (`Objective`)
        pixels = verifier.pixels([data.load_image(examples.images[i]) for i in mine]).to(verifier.device)
        return verifiers.sft_loss(model, pixels, [examples.ids[i] for i in mine], [examples.labels[i] for i in mine],
                                  tokens)

    vision_lr = lambda name: cfg.vision_lr if name.startswith("vision.") else cfg.lr  # noqa: E731
    return Trainer(model, objective, examples.source, cfg, lr_of=vision_lr)

def sft_base(a, out: Path) -> Path:
    """The folder the fine-tune starts from: --base, the tiny one, the paper's 7B, or with --world and no --base
    OUT/init (from scratch)."""
    if a.world and not a.base:
        return out / "init"
    if a.world and not (Path(a.base) / "config.json").is_file():
        fail(f"--base {a.base} not found or not a verifier folder: with --world pass a world verifier that "
             "`train.py orm --world ... --out DIR` wrote, or leave --base out to train from scratch")
    base = Path(a.base or (sample.tiny_checkpoints(a.cache)["llava"] if a.tiny else SFT_BASE))
    if not base.is_dir():
        fail(f"base model folder {base} not found: download lmms-lab/llava-onevision-qwen2-7b-ov (or -0.5b-ov) there, "
             "pass --base DIR, or use --tiny")
    return base

def world_texts() -> tuple[list[str], list[str], list[str]]:
    """What the shapes world's verifier tokenizer learns (verifiers.world_tokenizer): every prompt, training and
    evaluation, so both tokenize; the evaluation prompts, whose questions cover every template; and reflection
    answers (Sec. 5) "no. <reason>", the evaluator's reason on a correct scene of a same-template prompt."""
    evaluation = data.eval_specs()
    specs = data.train_specs(evaluation) + evaluation
    by_tag = data.specs_by_tag(specs)
    rng = np.random.default_rng(0)      # a fixed draw: one tokenizer for every run of the world
    answers = []
    for spec in itertools.islice(data.draw_specs(specs, rng), WORLD_REASONS):
        other = by_tag[spec["tag"]][rng.integers(len(by_tag[spec["tag"]]))]
        correct, reason = data.judge_cells(data.paint(data.sample_scene(other, rng)), spec)
        if not correct:
            answers.append(f"no. {reason}")
    return [s["prompt"] for s in specs], [s["prompt"] for s in evaluation], answers

def world_verifier(init: Path, tok, seed: int) -> Path:
    """The untrained verifier of a world run, written once as OUT/init in the lmms-lab layout (fp32, weights
    ~ N(0, WORLD_INIT_STD): verifiers.new_llava), so that the fine-tune starts from it as from any base: the LlavaConfig
    preset "world" with `tok`'s vocabulary. The first process writes it; the others wait for it."""
    if first_process() and not (init / "config.json").is_file():
        cfg = verifiers.LlavaConfig.from_preset("world")
        cfg.vocab_size = cfg.n_vocab = tok.get_vocab_size(with_added_tokens=True)
        gen = torch.Generator().manual_seed(derive_seed(seed, "init"))
        with data.atomic_path(init, directory=True) as d:
            verifiers.write_llava(d, tok, verifiers.new_llava(cfg, gen, WORLD_INIT_STD), gen, dtype=torch.float32)
    sync()
    return init

def sft_start(a, base: Path, settings: dict, cfg: TrainConfig, device: torch.device):
    """(the verifier to fine-tune, fp32 master weights; the checked examples). --out is claimed once the data has
    been read and checked; with --world the data is tokenised by the world's tokenizer (OUT/init's when it is
    there) before the untrained verifier is written to OUT/init."""
    if not a.world or a.base:
        verifier = verifiers.load_verifier(base, dtype=torch.float32, device=device)
        examples = sft_examples(a, verifier.tokenizer, cfg)
        claim_out(Path(a.out), settings)
        return verifier, examples
    written = (base / "config.json").is_file()
    tok = data.load_tokenizer(base) if written else verifiers.world_tokenizer(*world_texts())
    examples = sft_examples(a, tok, cfg)
    claim_out(Path(a.out), settings)
    return verifiers.load_verifier(world_verifier(base, tok, a.seed), dtype=torch.float32, device=device), examples

def answer_word(text: str) -> str:
    """The yes/no of an answer: its first word, lower-cased ("no. the square is blue, not purple" -> "no")."""
    m = re.match(r"\s*([A-Za-z]+)", text)
    return m.group(1).lower() if m else ""

def heldout_records(a) -> list[tuple[data.Conversation, str, str]]:
    """--heldout's records as (record, task, answer), read and checked before any work: each asks one of the
    verifier's questions (verifiers.question_task) and is answered yes or no (a reflection: "no. <reason>")."""
    if not a.heldout:
        return []
    records, problems = data.read_conversations(a.heldout)
    usable = []
    for rec in records:
        task, answer = verifiers.question_task(rec.turns[:-1]), answer_word(rec.turns[-1])
        if task is None:
            problems.append(f"{rec.where}: asks none of the verifier's questions ({', '.join(HELDOUT_TASKS)})")
        elif answer not in ("yes", "no"):
            problems.append(f"{rec.where}: the answer {rec.turns[-1][:40]!r} starts with neither yes nor no")
        else:
            usable.append((rec, task, answer))
    stop_or_skip(problems, a.heldout, a.skip_bad)
    if not usable:
        raise DataError(f"--heldout {a.heldout} holds no usable record")
    return usable

def other_image(records: Sequence) -> list[int]:
    """For each (record, task, answer), the record whose image the control shows: for clarity, the next one
    (cyclically) asking the same question with the other answer, the same prompt's image from a step on the other
    side of the static rule; for every other task, the next one asking another question, another prompt's image
    (curated records come in groups of one prompt's images, which share the prompt and mostly the label)."""
    n, partner = len(records), []
    for i, (rec, task, answer) in enumerate(records):
        if task == "clarity":
            fits = lambda j: records[j][0].turns[:-1] == rec.turns[:-1] and records[j][2] != answer  # noqa: E731
        else:
            fits = lambda j: records[j][0].turns[:-1] != rec.turns[:-1]  # noqa: E731
        partner.append(next((j % n for j in range(i + 1, i + n) if fits(j % n)), i))
    return partner

def heldout_accuracy(verifier: verifiers.Verifier, records, batch: int = 64) -> dict[str, dict]:
    """Each record's question(s) judged as the searches judge (Sec. 3.2, 4, 5: Verifier.judge, the most likely
    first answer token, batched) against its answer. Per task: accuracy, counts, and how often "yes" was the
    answer and the judgment (a judge that always says yes scores the first share). The control
    "shuffled_accuracy" judges each question with another image (`other_image`): another prompt's, or for clarity
    the same prompt's from the other side of the rule; a verifier that answers from the prompt alone, not the
    image, scores as well there as with the right images (for clarity a judge that reads the image scores about 1
    minus its accuracy). "ranking" is what a best-of-N search needs (`pair_ranking`). For clarity,
    "judged_yes_by_step" counts [said yes, records] per step of the curated records: a static rule labels by the
    step, a judge sees only the image, so its errors show where images of both sides look alike."""
    tally: dict[str, Counter] = {}
    by_step: dict[int, list[int]] = {}       # clarity: step -> [judged yes, records], where the rule's errors lie
    other = other_image(records)
    p_yes: list[float] = []
    progress = sample.Progress("heldout", len(records), unit="record", seconds=10.0)
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        images = [data.load_image(rec.image) for rec, _, _ in chunk]
        questions = [rec.turns[:-1] for rec, _, _ in chunk]
        judged = verifier.judge(images, questions)
        shuffled = verifier.judge([data.load_image(records[other[start + i]][0].image) for i in range(len(chunk))],
                                  questions)
        p_yes += [j.p_yes for j in judged]
        for i, ((rec, task, answer), j, s) in enumerate(zip(chunk, judged, shuffled)):
            tally.setdefault(task, Counter()).update(total=1, correct=int(j.answer == answer),
                                                     answer_yes=int(answer == "yes"), judged_yes=int(j.is_yes),
                                                     shuffled_correct=int(s.answer == answer))
            if task == "clarity" and (step := Curate.record_step(getattr(rec, "id", ""))) is not None:
                by_step.setdefault(step, [0, 0])[0] += int(j.is_yes)
                by_step[step][1] += 1
            progress(start + i + 1)         # per record, so the line's rate is per record
    ranked = {task: pair_ranking([(str(rec.turns[:-1]), answer, p) for (rec, t, answer), p in zip(records, p_yes)
                                  if t == task]) for task in tally}
    report = {task: {**tally[task], "accuracy": tally[task]["correct"] / tally[task]["total"],
                     "shuffled_accuracy": tally[task]["shuffled_correct"] / tally[task]["total"],
                     "ranking": ranked[task][0], "ranking_pairs": ranked[task][1]}
              for task in HELDOUT_TASKS if task in tally}
    if "clarity" in report:
        report["clarity"]["judged_yes_by_step"] = {str(k): by_step[k] for k in sorted(by_step)}
    return report

def pair_ranking(judged: Sequence[tuple[str, str, float]]) -> tuple[float | None, int]:
    """Over every pair of records that ask the same question (one prompt's images) where one answer is "yes" and
    the other "no": the share where the "yes" image gets the higher p(yes), ties counting half; and the number of
    pairs (None, 0 without any). 0.5 is a judge blind to the image: the searches' best-of-N needs this above it."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for question, answer, p in judged:
        groups.setdefault(question, []).append((answer, p))
    wins, pairs = 0.0, 0
    for group in groups.values():
        for yes in (p for a, p in group if a == "yes"):
            for no in (p for a, p in group if a == "no"):
                wins, pairs = wins + (yes > no) + 0.5 * (yes == no), pairs + 1
    return (wins / pairs if pairs else None), pairs

def report_heldout(a, out: Path, records, device: torch.device) -> int:
    """--heldout: the saved verifier, loaded as `--verifier OUT` loads it, judges the held-out records; the
    accuracies are printed and written to OUT/heldout.json."""
    if not records or not sample.first_process():     # one process judges and writes heldout.json
        return 0
    done = out / "heldout.json"
    old = data.read_config(out, "heldout.json") if done.is_file() else {}
    if old.get("heldout") == resolved(a.heldout) and all("ranking" in t for t in old["tasks"].values()) \
            and ("clarity" not in old["tasks"] or "judged_yes_by_step" in old["tasks"]["clarity"]):
        tasks = old["tasks"]        # a finished run asked again, with every field written today: judged already
    else:
        tasks = heldout_accuracy(verifiers.load_verifier(out, device=device), records)
    for task, t in tasks.items():
        print(f"[heldout] {task}: accuracy {t['accuracy']:.3f} ({t['correct']}/{t['total']}; the answer is yes "
              f"{t['answer_yes']} times, the verifier said yes {t['judged_yes']} times); with another prompt's "
              f"image {t['shuffled_accuracy']:.3f}; ranks a prompt's yes image above its no image "
              f"{'-' if t['ranking'] is None else format(t['ranking'], '.3f')} ({t['ranking_pairs']} pairs)",
              file=sys.stderr)
    if tasks.get("clarity", {}).get("judged_yes_by_step"):
        said = (f"{k}: {y / n:.2f}" for k, (y, n) in tasks["clarity"]["judged_yes_by_step"].items())
        print(f"[heldout] clarity: share judged clear at each step ({', '.join(said)})", file=sys.stderr)
    data.write_json({"heldout": resolved(a.heldout), "verifier": resolved(out), "tasks": tasks}, done)
    return 0

def run_sft(a, task: str) -> int:
    """`train.py orm` / `train.py parm`: the fine-tune, checkpoints, resume, the saved verifier and --heldout."""
    sft_defaults(a)
    check_sft_args(a)
    device, out = sample.device_of(a), Path(a.out)
    base = sft_base(a, out)
    cfg = train_config(a, device, "world_sft" if a.world else "sft", max_grad_norm=a.max_grad_norm or None,
                       label_rule=a.labels)
    settings = {"task": task, "train": cfg.fingerprint(),
                "base": "tiny" if a.tiny else f"{a.world} world, from scratch" if a.world and not a.base
                        else resolved(base),
                "data": [resolved(f) for f in a.data], "image_root": resolved(a.image_root), "fraction": a.fraction,
                "skip_bad": a.skip_bad}
    heldout = heldout_records(a)
    if begin(out, settings, a.resume, task):
        return report_heldout(a, out, heldout, device)
    verifier, examples = sft_start(a, base, settings, cfg, device)

    def load(folder: Path) -> verifiers.Verifier:
        return verifier if folder == base else verifiers.load_verifier(folder, dtype=torch.float32, device=device)

    def write(model: verifiers.LlavaOneVision, folder: Path, dtype: torch.dtype = torch.float32) -> None:
        verifiers.save_verifier(model, verifier.tokenizer, folder, base, dtype=dtype)   # checkpoints: fp32

    saved = torch.bfloat16 if a.save_dtype == "bf16" else torch.float32
    if not resume_and_fit(a, out, task, base, load, lambda v: sft_trainer(v, examples, cfg), write,
                          publish=partial(write, folder=out, dtype=saved), budget=a.stop_after).done():
        return 0
    tell(f"wrote {out} (lmms-lab layout): python sample.py --parm --verifier {out} --prompt ...")
    return report_heldout(a, out, heldout, device)

# ---- 7. pretrain: a Show-o that learns a miniature world (README: The paper in miniature) -----------------

PRETRAIN_DOC = """Pretrain Show-o from scratch on a miniature world, with Show-o's own objective.

    python train.py pretrain --world shapes --out runs/shapes/showo
    python sample.py --world shapes --eval --showo runs/shapes/showo --out runs/shapes/eval/baseline

The same `Showo` class and t2i sequence layout as the released model, at a small width; the text tokenizer is
trained on the world's prompts and the image tokenizer is the world's quadrant codec (data.QuadrantCodec). The
objective masks a cosine-schedule fraction of the image tokens, takes the cross-entropy on them, and drops the
prompt 10% of the time so classifier-free guidance works. --out is a Show-o folder that sample.py loads.

--generator raster trains the paper's other kind of generator (Table 4, LlamaGen-style) on the same layers and
layout: causal attention over the image tokens in raster order, next-token prediction, the same prompt dropout;
its config.json says "order": "raster" with its sampling settings (--temperature, --top-k), so sample.py and the
searches decode it token by token (cotgen.RasterPaths)."""

# pretraining examples by generator: the raster generator learns from every token at every step and takes 2400
# steps of 32 instead of 3600, to fit Table 4's budget of 8 min on 2 cores (3600 took 11 min 46 s): set from that
# timing, before any of its rows was scored again
PRETRAIN_SCENES = {"masked": 57600, "raster": 38400}

# the raster generator's sampling, a world decoding setting: plain sampling (top-k 5 and temperature 0.7 scored
# within the interval of it on the seed-0 world: README, the raster generator)
RASTER_SAMPLING = dict(temperature=1.0, top_k=0)

def add_pretrain_parser(sub) -> argparse.ArgumentParser:
    d = TrainConfig.preset("pretrain")
    p = sub.add_parser("pretrain", help="pretrain Show-o from scratch on a miniature world (the shapes world)",
                       description=PRETRAIN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, choices=sample.WORLDS, help="which miniature world")
    g = p.add_argument_group("model (Show-o's architecture at a small size)")
    g.add_argument("--generator", default="masked", choices=cotgen.ORDERS,
                   help="masked: Show-o (default); raster: LlamaGen-style, token by token in raster order")
    g.add_argument("--n-embd", type=int, default=128, help="width (default 128)")
    g.add_argument("--n-layer", type=int, default=4, help="Phi blocks (default 4)")
    g.add_argument("--n-head", type=int, default=4, help="attention heads (default 4)")
    g.add_argument("--vocab", type=int, default=300, help="BPE vocabulary of the world's text tokenizer (default 300)")
    g.add_argument("--scenes", type=int, default=None,
                   help="training examples, each a prompt and a random correct scene of it, seen once an epoch in "
                        "batches of --batch-size (default: " + "; ".join(
                            f"{n} for {kind}, {n // d.batch_size} steps of {d.batch_size} an epoch"
                            for kind, n in PRETRAIN_SCENES.items()) + ")")
    g.add_argument("--temperature", type=float,
                   help=f"raster only: sampling temperature, saved in config.json (default "
                        f"{RASTER_SAMPLING['temperature']})")
    g.add_argument("--top-k", type=int, help=f"raster only: sample among the k most likely codes, saved in "
                                             f"config.json (0: all; default {RASTER_SAMPLING['top_k']})")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    g = add_optim_args(p, "optimisation", d)
    add_config_flags(g, d, {"cond_dropout": "probability of dropping the prompt (classifier-free guidance)"})
    add_output_args(p, "output folder: the trained Show-o, init/ (the untrained one, with the tokenizer in "
                       "init/phi) and the last checkpoint")
    return p

def world_generator(out: Path, a, prompts: Sequence[str]) -> Path:
    """The untrained generator of a world run, written once as OUT/init in Show-o's layout, with its tokenizer in
    OUT/init/phi: the world's prompts fix the text vocabulary and the longest text part. The first process writes
    it; the others wait for it."""
    init = out / "init"
    if first_process() and not (init / "pytorch_model.safetensors").is_file():
        tok = cotgen.phi_style_tokenizer(prompts, a.vocab)
        longest = max(len(tok.encode(p, add_special_tokens=False).ids) for p in prompts)
        codec = data.QuadrantCodec()
        config = cotgen.ShowoConfig(codebook_size=codec.codebook_size, num_vq_tokens=codec.tokens,
                                    max_seq_length=longest + 2, n_layer=a.n_layer, n_head=a.n_head,
                                    n_embd=a.n_embd, intermediate_size=4 * a.n_embd, order=a.generator,
                                    temperature=a.temperature, top_k=a.top_k,
                                    token_order=codec.raster_order if a.generator == "raster" else None)
        with data.atomic_path(init, directory=True) as d:
            cotgen.write_showo(d, d / "phi", tok, config, seed=a.seed, std=0.02)    # trained from scratch
    sync()
    return init

def sampling_defaults(a) -> None:
    """A raster generator's sampling flags (RASTER_SAMPLING for those left out); a masked one takes none."""
    for k, v in RASTER_SAMPLING.items():
        if a.generator != "raster" and getattr(a, k) is not None:
            fail(f"--{k.replace('_', '-')} is a raster generator's sampling setting: add --generator raster, or "
                 "leave it out (Show-o's masked decoding takes its temperature at sampling time)")
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))

def run_pretrain(a) -> int:
    check_optim_args(a)
    sampling_defaults(a)
    a.scenes = PRETRAIN_SCENES[a.generator] if a.scenes is None else a.scenes
    at_least(a, 1, "n_embd", "n_layer", "n_head", "vocab", "scenes")
    at_least(a, 0, "top_k", "temperature")
    if a.n_embd % a.n_head or (a.n_embd // a.n_head) % 4:
        fail(f"--n-embd {a.n_embd} must be a multiple of 4 x --n-head {a.n_head} (Phi's rotary half of each head)")
    device, out = sample.device_of(a), Path(a.out)
    cfg = train_config(a, device, "pretrain")
    settings = {"world": a.world, "train": cfg.fingerprint(), "scenes": a.scenes,
                "model": {k: getattr(a, k) for k in ("generator", "n_embd", "n_layer", "n_head", "vocab", "temperature",
                                                     "top_k")}}
    if begin(out, settings, a.resume, f"{a.world} pretraining"):
        return 0
    evaluation = data.eval_specs()
    specs = data.train_specs(evaluation)
    claim_out(out, settings)
    init = world_generator(out, a, [s["prompt"] for s in specs + evaluation])
    progress = sample.Progress("scenes", a.scenes, unit="scene", seconds=5.0)
    prompts, codes = data.training_scenes(specs, a.scenes, derive_seed(a.seed, "scenes"), progress=progress)
    tok = cotgen.load_showo(init, dtype=torch.float32, device=device)[1]

    objective = dpo.next_token_loss if a.generator == "raster" else dpo.masked_token_loss

    def make(model: cotgen.Showo) -> Trainer:
        loss = lambda step, index, g, rows=slice(None): objective(  # noqa: E731
            model, tok, [prompts[i] for i in index], codes[index], g, cfg.cond_dropout, rows=rows)
        return Trainer(model, loss, [f"scene {i}" for i in range(len(prompts))], cfg)

    write = lambda model, d: cotgen.save_showo(model, d, init, init / "phi")  # noqa: E731
    if resume_and_fit(a, out, f"pretrain {a.world}", init, lambda d: load_generator(d, None, device), make, write,
                      budget=a.stop_after).done():
        tell(f"wrote {out} (Show-o layout): python sample.py --world {a.world} --eval --showo {out} --out EVAL_DIR")
    return 0

# ---- 8. shapes: the paper's tables in miniature, every step for real (README: The paper in miniature) ------

SHAPES_DOC = """The whole method in the shapes world, from scratch, and every table and best-of-N figure of the paper
measured in it (Tables 1-5, Figures 3, 6, 7), with each claim's paired difference.

    python train.py shapes --out runs/s0 --seed 0          # one seed; run others side by side in other folders
    python train.py shapes --pool runs/s0 runs/s1 runs/s2 --out runs/pooled     # the claims over the seeds

World -> pretrain Show-o -> curate with the world's evaluator as the automatic labeller (orm, prm, parm,
reflect, and held-out sets from another seed) -> pretrain a LLaVA-OneVision on painted scenes (captions and
outcome questions, `curate --task scenes`) -> fine-tune the ORM, PRM, PARM and PARM++ verifiers from it ->
DPO and iterative DPO with pairs labelled by the automatic labeller (as the paper's Sec. 3.3: its pairs are the
ORM's ranking data), and again by the trained ORM; It. DPO's second round with Ft. ORM or PARM guidance ->
self-correction -> a raster-order generator and its DPO (Table 4) -> every row and best-of-N point, on the same
prompts and image seeds. Each stage is a `train.py` / `sample.py` command whose output folder is kept, so a killed
run continues where it stopped (run the same command again); a stage starts once the stages it reads are made, in
--workers processes (one torch thread each on a CPU). Writes OUT/results.md (claims, tables, curves,
pruning, held-out accuracies, work), scaling.png, clear_steps.png, examples.png and raster.png."""

# (table, row, generator, search flags, verifier): every row of the paper's Tables 1, 2, 3 and 5, named as the paper
# names them, and the extra rows of DPO with the trained ORM's pairs. A generator is a folder of the run. Sec. 3.3
# pairs "the ranking data for training ORM", whose yes/no is the automatic labeller's: the evaluator
SHOWO, DPO1, DPO2, SELF = "showo", "dpo/round_1/model", "dpo/round_2/model", "selfcorrect"
GUIDED_ORM, GUIDED_PARM = "dpo_guided_orm/round_1/model", "dpo_guided_parm/round_1/model"
ORM_PAIRS1, ORM_PAIRS2 = "dpo_orm/round_1/model", "dpo_orm/round_2/model"
RASTER, RASTER_DPO = "raster", "dpo_raster/round_1/model"       # Table 4: a LlamaGen-style generator
SHAPES_ROWS = (
    ("1", "Baseline", SHOWO, [], None), ("1", "Zs. ORM", SHOWO, ["--orm"], "base"),
    ("1", "Ft. ORM", SHOWO, ["--orm"], "orm"), ("1", "Zs. PRM", SHOWO, ["--prm"], "base"),
    ("1", "Ft. PRM", SHOWO, ["--prm"], "prm"), ("1", "DPO", DPO1, [], None), ("1", "It. DPO", DPO2, [], None),
    ("2", "1st integration: It. DPO, Ft. ORM guidance", GUIDED_ORM, [], None),
    ("2", "2nd integration: Ft. ORM on It. DPO", DPO2, ["--orm"], "orm"),
    ("2", "3rd integration: Ft. ORM on It. DPO, Ft. ORM guidance", GUIDED_ORM, ["--orm"], "orm"),
    ("3", "PARM", SHOWO, ["--parm"], "parm"), ("3", "PARM on It. DPO", DPO2, ["--parm"], "parm"),
    ("3", "It. DPO, PARM guidance", GUIDED_PARM, [], None),
    ("3", "PARM on It. DPO, PARM guidance", GUIDED_PARM, ["--parm"], "parm"),
    ("4", "Raster baseline", RASTER, [], None), ("4", "Raster + Zs. ORM", RASTER, ["--orm"], "base"),
    ("4", "Raster + Ft. ORM", RASTER, ["--orm"], "orm"), ("4", "Raster + DPO", RASTER_DPO, [], None),
    ("4", "Raster + PARM", RASTER, ["--parm"], "parm"),
    ("5", "Self-correction", SELF, [], None), ("5", "Self-correction + Ft. ORM", SELF, ["--orm"], "orm"),
    ("5", "Self-correction + PARM", SELF, ["--parm"], "parm"),
    ("5", "Self-correction + PARM++, no reflection", SELF, ["--parm++", "--rounds", "0"], "parmpp"),
    ("5", "Self-correction + PARM++", SELF, ["--parm++"], "parmpp"),
    ("ORM pairs", "DPO, ORM pairs", ORM_PAIRS1, [], None), ("ORM pairs", "It. DPO, ORM pairs", ORM_PAIRS2, [], None),
    ("ORM pairs", "It. DPO, ORM pairs + PARM", ORM_PAIRS2, ["--parm"], "parm"))

# (A, B, the paper's overall A - B, its words): each claim of the paper as a difference of two rows (Tables 1-3, 5)
CLAIMS = (
    ("Ft. ORM", "Baseline", 0.10, "test-time verification boosts generation (Sec. 3.2)"),
    ("Zs. ORM", "Baseline", 0.08, "a zero-shot ORM already helps (Table 1)"),
    ("Ft. ORM", "Zs. ORM", 0.02, "fine-tuning improves the ORM (Sec. 3.2)"),
    ("Ft. PRM", "Zs. PRM", 0.02, "fine-tuning improves the PRM (Sec. 3.2)"),
    ("Ft. ORM", "Ft. PRM", 0.08, "ORM beats PRM (Sec. 3.2)"),
    ("DPO", "Baseline", 0.09, "DPO improves the baseline (Sec. 3.3)"),
    ("It. DPO", "DPO", 0.03, "iterative DPO improves DPO (Sec. 3.3)"),
    ("It. DPO", "Ft. ORM", 0.02, "iterative DPO surpasses the best verifier (Sec. 3.3)"),
    ("1st integration: It. DPO, Ft. ORM guidance", "It. DPO", 0.02, "reward-model guidance adds to It. DPO (Table 2)"),
    ("2nd integration: Ft. ORM on It. DPO", "It. DPO", 0.07, "verification after DPO adds to it (Sec. 3.4)"),
    ("3rd integration: Ft. ORM on It. DPO, Ft. ORM guidance", "2nd integration: Ft. ORM on It. DPO", 0.03,
     "the 3rd integration beats the 2nd (Sec. 3.4)"),
    ("3rd integration: Ft. ORM on It. DPO, Ft. ORM guidance", "1st integration: It. DPO, Ft. ORM guidance", 0.08,
     "the 3rd integration beats the 1st (Sec. 3.4)"),
    ("PARM", "Ft. ORM", 0.04, "PARM beats the fine-tuned ORM (Sec. 4)"),
    ("PARM", "Ft. PRM", 0.12, "PARM beats the fine-tuned PRM (Sec. 4)"),
    ("PARM", "It. DPO", 0.02, "PARM beats iterative DPO (Sec. 4)"),
    ("PARM on It. DPO", "It. DPO", 0.09, "PARM adds to iterative DPO (Table 3)"),
    ("PARM on It. DPO", "2nd integration: Ft. ORM on It. DPO", 0.02, "on It. DPO, PARM beats the Ft. ORM (Table 3)"),
    ("PARM on It. DPO, PARM guidance", "PARM on It. DPO", 0.03, "PARM guidance adds to PARM on It. DPO (Table 3)"),
    ("Baseline", "Self-correction", 0.02, "self-correction fine-tuning costs the plain generator a little (Sec. 5)"),
    ("Self-correction + PARM", "Self-correction + Ft. ORM", 0.06,
     "after self-correction, PARM beats Ft. ORM (Table 5)"),
    ("Self-correction + PARM", "Self-correction + PARM++, no reflection", 0.03,
     "PARM++ without reflection is slightly below PARM (Sec. 5)"),
    ("Self-correction + PARM++", "Self-correction + PARM++, no reflection", 0.09, "reflection lifts PARM++ (Sec. 5)"),
    ("Self-correction + PARM++", "Self-correction + PARM", 0.06, "PARM++ with reflection beats PARM (Table 5)"),
    # Table 4, LlamaGen's row: the methods plug into a raster-order generator, the verifiers not retrained
    ("Raster + Zs. ORM", "Raster baseline", 0.03, "on a raster generator, a zero-shot ORM helps (Table 4)"),
    ("Raster + Ft. ORM", "Raster baseline", 0.07, "on a raster generator, the Ft. ORM helps (Table 4)"),
    ("Raster + DPO", "Raster baseline", 0.09, "on a raster generator, DPO helps (Table 4)"),
    ("Raster + PARM", "Raster baseline", 0.14, "on a raster generator, PARM helps (Table 4)"))

# Figures 3, 6 and 7: best-of-N for each verifier on three generators, over the first image of every evaluation
# prompt (path seeds as the rows', so each curve's paths are the rows' paths and N's are the first N of 20's)
CURVE_NS = (1, 2, 4, 8, 16, 20)
CURVE_GENERATORS = (("Baseline", SHOWO), ("DPO", DPO1), ("It. DPO", DPO2))
# (verifier, search flags, verifier folder, largest N): a PRM search re-branches every path at every step, so it
# shares no path with the others and judges N images a step; N = 16 and 20 would cost more than the rest together
CURVE_METHODS = (("Zs. ORM", ["--orm"], "base", 20), ("Ft. ORM", ["--orm"], "orm", 20),
                 ("Ft. PRM", ["--prm"], "prm", 8), ("PARM", ["--parm"], "parm", 20))

# stage sizes: the defaults, and --micro (a smoke run in seconds that only checks that every row is produced).
# orm_pairs: the trained ORM labels dpo_orm's pairs (not in --micro: a 2-step ORM may label every image alike)
SHAPES_SIZES = {
    "full": dict(pretrain=[], scenes=24000, curate=1000, heldout=150, prm=150, reflect=500, reflect_samples=4,
                 dpo=600, paths=8, samples=None, limit=None, steps=18, examples=4, fast=[], orm_pairs=True,
                 curve=CURVE_NS),
    # a micro generator draws a right image now and then (single objects, mostly): the reflect data takes more
    # samples, so that some prompt has a right and a wrong image to pair
    "micro": dict(pretrain=["--n-embd", "32", "--n-layer", "1", "--n-head", "2", "--vocab", "120", "--scenes", "512",
                            "--batch-size", "16", "--epochs", "1"],
                  scenes=8, curate=6, heldout=3, prm=2, reflect=96, reflect_samples=8, dpo=48, paths=2, samples=1,
                  limit=2, steps=4, examples=1, fast=["--max-steps", "2"], orm_pairs=False, curve=(1, 2)),
}

# fine-tuning the world's Show-o (DPO, self-correction): a small model trained from scratch takes a larger lr and
# more epochs than the released 1.3B recipe (seed-0 world: lr 1e-3 x 10 epochs collapsed DPO to 0.40)
SHAPES_SHOWO_TUNING = ["--lr", "3e-4", "--epochs", "6", "--batch-size", "16"]

# DPO in the world: the paper trains on 10K pairs, 600 prompts x 4 images give ~150-220, too few to move it. More
# images per prompt and up to 4 pairs from each give ~800; a larger beta and one shared mask per pair keep it from
# drifting without an SFT term. Scratch experiments, one round, judged by the evaluator on 300 training-template
# prompts x 2 images (not the evaluation prompts): seed 0 0.638 -> 0.688, seed 1 0.562 -> 0.623; with 4 images,
# 1 pair, beta 0.1 and SFT weight 1 (the earlier setting) 0.629 on seed 0; beta 2 on ~150 pairs collapsed counting
SHAPES_DPO = ["--curate-samples", "8", "--pairs-per-prompt", "4", "--beta", "2", "--shared-mask",
              "--sft-coef", "0"]

# reward-model guidance (Sec. 3.4): the paper gives no weight for its online term; 0.1 of the DPO loss
SHAPES_GUIDANCE = ["--reward-coef", "0.1"]

# PARM's data is ~24 records per path (clarity at 16 steps, potential after each clear one, 70% of the ORM
# records): half of them keeps its fine-tune near the ORM's cost
PARM_SHARE = ["--fraction", "0.5"]

# the world verifier's pretraining on painted scenes (curate --task scenes): one pass over 2 records per scene;
# saved in fp32, as every verifier fine-tune starts from it (README: why the verifiers need it)
VERIFIER_PRETRAINING = ["--epochs", "1", "--save-dtype", "fp32"]

# the verifiers' fine-tune from that base: a lower lr than from scratch keeps what the base learned to see (seed-0
# ORM data, 4000 records: lr 3e-4 ranked a prompt's "yes" image above its "no" image 0.84-0.88 of the time after
# 1-4 epochs, lr 1e-3 0.54-0.77, from scratch 0.65-0.67)
SHAPES_VERIFIER_TUNING = ["--lr", "3e-4", "--vision-lr", "3e-4", "--epochs", "2"]

def add_shapes_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("shapes", help="the paper's tables in miniature: every step in the shapes world",
                       description=SHAPES_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: one sub-folder per stage, results.md, scaling.png, "
                                                "examples.png (with --pool: where claims.md is written)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0; held-out sets use seed+1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--micro", action="store_true", help="tiny sizes everywhere: checks the plumbing in seconds")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that run the training stages (each once its inputs are made) and then evaluate "
                        "the rows, one generator each at a time (default: 2 on a CPU with 2 or more cores, 1 on a GPU)")
    p.add_argument("--pool", nargs="+", default=None, metavar="RUN",
                   help="pool finished runs (their --out folders, one per seed) into OUT/claims.md: every claim's "
                        "paired difference per seed and over all of them; trains and evaluates nothing")
    return p

def shapes_stages(o: Path, z: dict, seed: int, device: str) -> list[tuple[Path, list[str]]]:
    """(output folder, train.py arguments) of every training stage, in order."""
    w, s = ["--world", "shapes", "--device", device], ["--seed", str(seed)]
    showo, d, v = str(o / SHOWO), o / "data", o / "verifiers"

    def curate(task: str, n: int, name: str = "", k: int = seed, samples: int = 4) -> tuple[Path, list[str]]:
        return d / (name or task), ["curate", *w, "--showo", showo, "--task", task, "--num-prompts", str(n),
                                    "--samples", str(samples), "--temperature", "1", "--steps", str(z["steps"]),
                                    "--seed", str(k)]

    dpo_argv = ["dpo", *w, *s, *z["fast"], "--rounds", "2", "--geneval", str(z["dpo"]), "--gen-steps", str(z["steps"]),
                *SHAPES_SHOWO_TUNING, *SHAPES_DPO]         # no --verifier: the evaluator labels the pairs
    orm_labels = ["--verifier", str(v / "orm")] if z["orm_pairs"] else []
    # Sec. 3.4's guidance: It. DPO's second round again, from its first round on its pairs, with the online term
    guided = lambda verifier: ["dpo", *w, *s, *z["fast"], "--showo", str(o / DPO1), "--data",  # noqa: E731
                               str(o / "dpo" / "round_2" / "pairs.jsonl"), "--gen-steps", str(z["steps"]),
                               *SHAPES_SHOWO_TUNING, *SHAPES_DPO, *SHAPES_GUIDANCE, "--verifier", str(v / verifier)]
    sft = lambda task, *files: ["parm" if task == "parm" else "orm", *w, *s, "--base", str(v / "base"),  # noqa
                                *SHAPES_VERIFIER_TUNING, *z["fast"],
                                *(a for f in files for a in ("--data", str(d / f)))]
    # in an order that respects each stage's inputs, the longest chains first (pretraining -> DPO -> guided DPO):
    # `run_stages` starts the stages whose inputs are made in this order
    return [(o / SHOWO, ["pretrain", *w, *s, *z["pretrain"]]), (o / "dpo", dpo_argv + ["--showo", showo]),
            (d / "scenes", ["curate", "--world", "shapes", "--task", "scenes", "--num-prompts", str(z["scenes"]), *s]),
            (o / RASTER, ["pretrain", *w, *s, *z["pretrain"], "--generator", "raster"]),
            (o / "dpo_raster", ["dpo", *w, *s, *z["fast"], "--rounds", "1", "--geneval", str(z["dpo"]), "--gen-steps",
                                str(z["steps"]), *SHAPES_SHOWO_TUNING, *SHAPES_DPO, "--showo", str(o / RASTER)]),
            curate("orm", z["heldout"], "orm_heldout", seed + 1), curate("orm", z["curate"]),
            curate("prm", z["prm"], samples=1), curate("prm", z["heldout"] // 3, "prm_heldout", seed + 1, samples=1),
            curate("parm", z["curate"] // 4, samples=2),     # ~24 records per path: clarity at 16 steps, potential
            curate("parm", z["heldout"], "parm_heldout", seed + 1, 2),
            curate("reflect", z["reflect"], samples=z["reflect_samples"]),
            (v / "base", ["orm", *w, *s, *z["fast"], "--data", str(d / "scenes/scenes.json"), *VERIFIER_PRETRAINING,
                          "--heldout", str(d / "orm_heldout/orm.json")]),
            (v / "orm", sft("orm", "orm/orm.json") + ["--heldout", str(d / "orm_heldout/orm.json")]),
            (v / "prm", sft("orm", "prm/prm.json") + ["--heldout", str(d / "prm_heldout/prm.json")]),
            (v / "parm", sft("parm", "parm/parm.json") + [*PARM_SHARE, "--heldout", str(d / "parm_heldout/parm.json")]),
            (v / "parmpp", sft("parm", "parm/parm.json", "reflect/reflect.json") + PARM_SHARE),
            (o / "dpo_guided_orm", guided("orm")), (o / "dpo_guided_parm", guided("parm")),
            (o / "dpo_orm", dpo_argv + ["--showo", showo] + orm_labels),
            (o / SELF, ["selfcorrect", *w, *s, *z["fast"], "--showo", showo, "--reflect",
                        str(d / "reflect/reflect.json"), *SHAPES_SHOWO_TUNING])]

def stage_inputs(stages: Sequence[tuple[Path, list[str]]]) -> dict[Path, set[Path]]:
    """Each stage's folder -> the folders of the stages it reads: those its arguments name, or name a file in."""
    folders = [folder for folder, _ in stages]
    return {folder: {f for arg in argv for f in folders if f == Path(arg) or f in Path(arg).parents}
            for folder, argv in stages}

def run_stage(folder: Path, argv: list[str], pipeline: sample.Pipeline, threads: int | None) -> tuple[Path, int]:
    """One training stage as its command line (continued where a stopped run left it); (folder, exit status). On a
    CPU with `threads` = 1: a stage's weights depend on how many threads sum its gradients, so every stage runs on
    one, whichever machine and --workers, and makes the same files."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    resume = ["--resume"] if (folder / "run.json").is_file() else []
    print(f"[shapes] {argv[0]} -> {folder}", file=sys.stderr)
    try:
        return folder, main(argv + ["--out", str(folder)] + resume, pipeline)
    finally:
        torch.set_num_threads(before)

def stage_process(*args) -> tuple[Path, int]:
    """`run_stage` in a worker process: a stage's error (its one line already printed) comes back as its status."""
    try:
        return run_stage(*args)
    except SystemExit as e:
        return args[0], e.code if isinstance(e.code, int) else 1

def task_pool(workers: int) -> multiprocessing.pool.Pool:
    """`workers` spawned processes, a new one for each task: a task stopped by SIGTERM (the pool's terminate, once
    this process is stopped) returns its status and its process ends, so the terminate's join does not wait on a
    worker idling for more."""
    return multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1)

def run_stages(stages: Sequence[tuple[Path, list[str]]], pipeline: sample.Pipeline, workers: int,
               threads: int | None) -> int:
    """Every training stage, each as soon as the stages it reads are made (`stage_inputs`), in `workers` processes
    (one: in this one, in order); the exit status of the first stage that stops (0: all made)."""
    if workers == 1:
        for folder, argv in stages:
            if code := run_stage(folder, argv, pipeline, threads)[1]:
                return code
        return 0
    needs, todo, done, news = stage_inputs(stages), dict(stages), set(), queue.SimpleQueue()
    with task_pool(workers) as pool:
        while len(done) < len(stages):
            for folder in [f for f in todo if needs[f] <= done]:
                pool.apply_async(stage_process, (folder, todo.pop(folder), pipeline, threads), callback=news.put,
                                 error_callback=news.put)
            finished = news.get()
            if isinstance(finished, BaseException):
                raise finished
            if finished[1]:     # the others are stopped too (the pool is terminated): each keeps what it made
                return finished[1]
            done.add(finished[0])
    return 0

def row_folder(o: Path, row: str) -> Path:
    """Where a row of the tables is evaluated: OUT/eval/<row in lower case, "++" as "pp", other marks as "_">
    ("PARM++" -> parmpp, "It. DPO, PARM guidance" -> it_dpo_parm_guidance), one folder per row."""
    return o / "eval" / re.sub(r"[^a-z0-9]+", "_", row.lower().replace("++", "pp")).strip("_")

def curve_folder(o: Path, generator: str, method: str, n: int) -> Path:
    """Where a point of a best-of-N curve is evaluated: OUT/eval/curves/<generator>/<verifier>_n<N>."""
    return o / "eval" / "curves" / row_folder(o, generator).name / row_folder(o, f"{method} N{n}").name

def evaluations(o: Path, z: dict) -> list[tuple[Path, str, list[str], str | None, int | None]]:
    """(folder, generator, search flags with N, verifier, images per prompt) of every row and curve point, the
    rows first; each generator's own evaluations in a run (they share its decoding paths). A row without a search
    shows path 0 of each image, so it decodes that path alone: a path's steps do not depend on the paths beside it
    in a batch (test_search), and the searches of its generator decode the others."""
    rows = [(row_folder(o, name), gen, [*flags, "--paths", str(z["paths"] if flags else 1)], verifier, z["samples"])
            for _, name, gen, flags, verifier in SHAPES_ROWS]
    curves = [(curve_folder(o, g, m, n), gen, [*flags, "--paths", str(n)], verifier, 1)
              for g, gen in CURVE_GENERATORS for m, flags, verifier, most in CURVE_METHODS
              for n in z["curve"] if n <= most]
    order = list(dict.fromkeys(gen for _, gen, _, _, _ in rows))
    return sorted(rows + curves, key=lambda e: order.index(e[1]))

def evaluate_generator(o: Path, z: dict, seed: int, device: str, pipeline: sample.Pipeline, gen: str,
                       jobs: Sequence[tuple], threads: int | None = None) -> dict | None:
    """Some of one generator's rows and curve points, scored on the world's evaluation prompts (sample.py --world
    shapes --eval, the same prompts and image seeds for all), sharing one PathRecord: each decoding path is decoded
    once and every search replays it (the work a search reports is still its own). With the baseline's PARM row,
    also what `inspect_generator` measures. None: interrupted."""
    if threads:
        torch.set_num_threads(threads)
    record = None if gen in (RASTER, RASTER_DPO) else cotgen.PathRecord()   # a raster path's state is a KV cache
    for folder, _, flags, verifier, samples in jobs:
        if (folder / "scores.json").is_file():
            continue
        argv = ["--world", "shapes", "--eval", "--showo", str(o / gen), *flags, "--steps", str(z["steps"]),
                "--seed", str(seed), "--device", device, "--out", str(folder), "--overwrite"]
        argv += ["--verifier", str(o / "verifiers" / verifier)] if verifier else []
        argv += ["--samples", str(samples)] if samples else []
        argv += ["--limit", str(z["limit"])] if z["limit"] else []
        print(f"[shapes] evaluating {folder.relative_to(o / 'eval')}", file=sys.stderr)
        if sample.main(argv, pipeline, record=record):
            return None
    inspected = {row_folder(o, "PARM"): SHOWO, row_folder(o, "Raster + PARM"): RASTER}
    row = next((folder for folder, *_ in jobs if inspected.get(folder) == gen), None)
    if row is None:
        return {}
    # kept beside the rows, so that a pipeline stopped later does not finish every path again; made again when
    # its row is newer
    kept = o / "eval" / f"inspect_{row_folder(o, gen).name}.json"
    if not kept.is_file() or kept.stat().st_mtime_ns < (row / "scores.json").stat().st_mtime_ns:
        data.write_json(inspect_generator(o, z, seed, device, gen, record), kept)
    return json.loads(kept.read_text())

def evaluation_groups(o: Path, z: dict) -> list[tuple[str, list[tuple]]]:
    """The evaluations split into groups that share decoding paths, the costliest first (by paths decoded): each
    generator's searches that follow their own paths, and each PRM search alone (it re-branches every path from
    the best at every step, so it follows paths no other search does)."""
    groups: dict[tuple, list] = {}
    for job in evaluations(o, z):
        folder, gen, flags = job[:3]
        groups.setdefault((gen, str(folder) if "--prm" in flags else ""), []).append(job)
    images = {samples: sum(1 for _ in eval_images(z, 0, samples)) for samples in (z["samples"], 1)}
    paths = lambda job: images[job[4]] * int(job[2][-1]) * (2 if "--prm" in job[2] else 1)  # noqa: E731 (+ judging)
    return sorted(((gen, jobs) for (gen, _), jobs in groups.items()), key=lambda g: -sum(map(paths, g[1])))

def shapes_evaluate(o: Path, z: dict, seed: int, device: str, pipeline: sample.Pipeline, workers: int) -> dict | None:
    """Every group of evaluations (`evaluation_groups`, `evaluate_generator`), the costliest first, in `workers`
    processes of one thread each: the world's models are small, and two processes get about twice what two threads
    of one do. Returns what the inspections found; None: interrupted."""
    calls = [(o, z, seed, device, pipeline, gen, jobs, 1 if workers > 1 else None)
             for gen, jobs in evaluation_groups(o, z)]
    if workers == 1:
        results = [evaluate_generator(*call) for call in calls]
    else:
        with task_pool(workers) as pool:
            results = pool.starmap(evaluate_generator, calls, chunksize=1)
    return None if any(r is None for r in results) else {k: v for r in results for k, v in r.items()}

def read_results(folder: Path) -> list[dict]:
    """A scored evaluation's per-image rows (sample.py's results.jsonl)."""
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]

def scores_of(folder: Path) -> dict[str, data.Score]:
    return {k: data.Score(**v) for k, v in json.loads((folder / "scores.json").read_text()).items()}

def run_shapes(a) -> int:
    if a.pool:
        return pool_runs(a)
    at_least(a, 1, "workers")
    o, z = Path(a.out), SHAPES_SIZES["micro" if a.micro else "full"]
    device = str(sample.device_of(a))
    settings = {"shapes": "micro" if a.micro else "full", "seed": a.seed}
    guard_out(o, settings, (o / "run.json").is_file(), "shapes")   # the same command again continues it
    claim_out(o, settings)
    t0 = time.time()
    stages = shapes_stages(o, z, a.seed, device)
    # each stage locks its own folder, inside o (locked by this command): its messages name this command
    pipeline = sample.Pipeline(a.line, {folder: f"train.py {argv[0]}" for folder, argv in stages})
    workers = a.workers or (1 if device != "cpu" else min(2, os.cpu_count() or 1))
    code = run_stages(stages, pipeline, workers, 1 if device == "cpu" else None)
    if code:            # interrupted: each stage kept what it had, and the same command continues from there
        return code
    print(f"[shapes] training stages made in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    found = shapes_evaluate(o, z, a.seed, device, pipeline, workers)
    if found is None:
        return 130
    model, tok = cotgen.load_showo(o / SHOWO, None, dtype=torch.float32, device=torch.device(device))
    # once every row is scored (PARM++'s stories come from its row); the few paths shown are decoded again
    data.save_png(shapes_examples(o, z, model, tok, data.QuadrantCodec()), o / "examples.png")
    write_shapes_results(o, z, found, time.time() - t0)
    print(f"[shapes] wrote {o / 'results.md'}, scaling.png, clear_steps.png and examples.png in "
          f"{time.time() - t0:.0f} s", file=sys.stderr)
    return 0

def eval_images(z: dict, seed: int, samples: int | None = None) -> Iterator[tuple[int, int, dict, int]]:
    """(prompt k, image j, spec, seed of its path 0) of every evaluation image, as sample.py --eval makes them."""
    specs = data.eval_specs()[:z["limit"]]
    for k, spec in enumerate(specs):
        for j in range(samples or z["samples"] or spec["images"]):
            yield k, j, spec, sample.image_seed(seed, k, j)

def clear_steps(model, tok, codec, z: dict, seed: int, record: cotgen.PathRecord) -> dict[str, list[float]]:
    """Sec. 4's observation, measured in the world as the paper measured Show-o (Fig. 5): at every step 1-18, the
    share of the baseline's x̂0 images (path 0 of every evaluation image) whose every object is whole
    (data.well_formed), and the share whose evaluator verdict already equals the final image's."""
    whole, settled, n = np.zeros(z["steps"]), np.zeros(z["steps"]), 0
    for _, _, spec, s in eval_images(z, seed):
        _, history = cotgen.generate(model, tok, spec["prompt"], 1, steps=z["steps"], seed=s, history=True,
                                     record=record)
        cells = codec.decode_cells(history[0])
        verdicts = np.array([data.judge_cells(c, spec)[0] for c in cells])
        whole += [data.well_formed(c) for c in cells]
        settled += verdicts == verdicts[-1]
        n += 1
    return {"well-formed": (whole / n).tolist(), "verdict = final": (settled / n).tolist(), "images": n}

def parm_pruning(o: Path, row: str, model, tok, codec, record: cotgen.PathRecord | None) -> dict:
    """What PARM's potential assessment prunes (Sec. 4, task 2), over a PARM row's searches: every path is
    finished here, pruned ones too (for this measure only: the row's own work stops them), and the evaluator
    judges its final image. Returns the accuracy of pruned and kept paths' final images, the step each path was
    first judged clear (or never), and how many searches pruned every path."""
    stats = Counter()
    clear_at: Counter = Counter()
    for trace_file in sorted(row_folder(o, row).glob("*/traces/*.json")):
        trace = json.loads(trace_file.read_text())
        spec = json.loads((trace_file.parent.parent / "metadata.jsonl").read_text())
        finals = cotgen.generate(model, tok, trace["prompt"], trace["n"], steps=trace["steps"], cfg=trace["cfg"],
                                 seed=trace["paths"][0]["seed"], record=record)
        pruned = ["truncated" in (p["ended"] or "") for p in trace["paths"]]
        for cells, cut in zip(codec.decode_cells(finals), pruned):
            kind = "pruned" if cut else "kept"
            stats.update({f"{kind} paths": 1, f"{kind} right": int(data.judge_cells(cells, spec)[0])})
        clear_at.update(str(int(trace["clear_at"][str(i)]) + 1) if str(i) in trace["clear_at"] else "never"
                        for i in range(trace["n"]))
        stats.update(searches=1, all_pruned=int(all(pruned)))
    return {**stats, "clear_at": dict(clear_at)}

def inspect_generator(o: Path, z: dict, seed: int, device: str, gen: str, record: cotgen.PathRecord | None) -> dict:
    """Once a generator's rows are scored, from its recorded paths (nothing is decoded again): for the baseline,
    its clear-step curves and the PARM row's pruning; for the raster generator, its PARM row's pruning and
    raster.png, one path filling in step by step."""
    model, tok = cotgen.load_showo(o / gen, None, dtype=torch.float32, device=torch.device(device))
    codec = data.QuadrantCodec()
    if gen == RASTER:
        spec = data.eval_specs()[0]
        _, history = cotgen.generate(model, tok, spec["prompt"], 1, steps=z["steps"], history=True,
                                     seed=sample.image_seed(seed, 0, 0))
        pics = sample.decode_images(codec, history[0])
        data.save_png(data.captioned_rows([(f"{spec['prompt']}: the raster generator's x̂0 at every step",
                                            [(p, f"step {t + 1}") for t, p in enumerate(pics)])]), o / "raster.png")
        return {"raster pruning": parm_pruning(o, "Raster + PARM", model, tok, codec, None)}
    return {"clear": clear_steps(model, tok, codec, z, seed, record),
            "pruning": parm_pruning(o, "PARM", model, tok, codec, record)}

def claim_lines(runs: Sequence[Path], draws: int = 4000) -> list[str]:
    """The claims table: every claim's paired difference of overall scores with its 95 % bootstrap interval
    (data.paired_difference), per run (seed) and pooled over them, and the verdict of the pooled interval."""
    head = ["claim (A beats B)", "paper's Δ", *(f"Δ [95 % CI], {r.name}" for r in runs)]
    lines = ["| " + " | ".join(head + (["pooled", "verdict"] if len(runs) > 1 else ["verdict"])) + " |",
             "|---" * (len(head) + (2 if len(runs) > 1 else 1)) + "|"]
    for a, b, paper, words in CLAIMS:
        pairs = [(read_results(row_folder(r, a)), read_results(row_folder(r, b))) for r in runs]
        cells = [data.paired_difference([p], draws) for p in pairs]
        if len(runs) > 1:
            cells.append(data.paired_difference(pairs, draws))
        shown = [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in cells]
        lines.append(f"| {words}: {a} − {b} | {paper:+.2f} | " + " | ".join(shown) +
                     f" | {data.verdict_of(*cells[-1][1:])} |")
    return lines

def scaling_chart(o: Path, z: dict) -> tuple[np.ndarray, list[str]]:
    """scaling.png (one panel per generator: each verifier's best-of-N overall against N, 95 % whiskers) and its
    numbers as Markdown lines."""
    panels, lines = [], ["| generator | verifier | " + " | ".join(f"N = {n}" for n in z["curve"]) + " |",
                         "|---" * (2 + len(z["curve"])) + "|"]
    for g, _ in CURVE_GENERATORS:
        curves, whiskers = {}, {}
        for m, _, _, most in CURVE_METHODS:
            scores = [scores_of(curve_folder(o, g, m, n))["overall"] for n in z["curve"] if n <= most]
            curves[m], whiskers[m] = [s.accuracy for s in scores], [(s.low, s.high) for s in scores]
            lines.append(f"| {g} | {m} | " + " | ".join([f"{s.accuracy:.3f}" for s in scores] +
                                                       ["-"] * (len(z["curve"]) - len(scores))) + " |")
        panels.append(data.line_chart(curves, z["curve"], f"best-of-N on {g} (overall, 95% CI)", "N",
                                      intervals=whiskers))
    return np.concatenate(panels, axis=1), lines

def heldout_lines(o: Path) -> list[str]:
    lines = ["| verifier | task | accuracy | with another image (a judge blind to the image keeps its accuracy; "
             "clarity: the same prompt's image from the other side of the rule) | answer is yes (an always-yes "
             "judge scores this) | n | ranks a prompt's yes image above its no image (blind: 0.5) | pairs |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("base", "orm", "prm", "parm"):
        held = o / "verifiers" / name / "heldout.json"
        for task, r in (json.loads(held.read_text())["tasks"] if held.is_file() else {}).items():
            rank = "-" if r.get("ranking") is None else f"{r['ranking']:.3f}"
            lines.append(f"| {name} | {task} | {r['accuracy']:.3f} | {r['shuffled_accuracy']:.3f} | "
                         f"{r['answer_yes'] / r['total']:.3f} | {r['total']} | {rank} | {r.get('ranking_pairs', 0)} |")
    return lines

def search_work(folder: Path) -> dict[str, float]:
    """Mean work per image of an evaluated row, from its search traces (Show-o token-forwards, verifier tokens)."""
    traces = [json.loads(p.read_text())["work"] for p in sorted(folder.glob("*/traces/*.json"))]
    keys = ("showo_token_forwards", "verifier_tokens")
    return {k: sum(t[k] for t in traces) / len(traces) for k in keys} if traces else {}

CLEAR_CURVES = ("well-formed", "verdict = final")

def clear_lines(clear: dict, steps: int) -> list[str]:
    """`clear_steps`'s curves as a Markdown table, a column per step."""
    return [f"## When the baseline's step images clear ({clear['images']} images)", "",
            "| step | " + " | ".join(str(s) for s in range(1, steps + 1)) + " |", "|---" * (steps + 1) + "|",
            *(f"| {k} | " + " | ".join(f"{v:.2f}" for v in clear[k]) + " |" for k in CLEAR_CURVES), ""]

def pruning_lines(title: str, pruning: dict) -> list[str]:
    """`parm_pruning`'s numbers as Markdown."""
    order = lambda kv: (kv[0] == "never", int(kv[0]) if kv[0].isdigit() else 0)  # noqa: E731
    return [f"## What {title} prunes (pruned paths finished for this measure only)", "",
            f"- pruned paths end right {pruning.get('pruned right', 0)} / {pruning.get('pruned paths', 0)}; kept "
            f"paths {pruning.get('kept right', 0)} / {pruning.get('kept paths', 0)}",
            f"- searches that pruned every path: {pruning.get('all_pruned', 0)} / {pruning.get('searches', 0)}",
            "- step each path was first judged clear (its count): " +
            ", ".join(f"{k}: {v}" for k, v in sorted(pruning["clear_at"].items(), key=order)), ""]

def write_shapes_results(o: Path, z: dict, found: dict, seconds: float) -> None:
    """results.md (claims, the four tables, best-of-N, clear steps, PARM's pruning, the verifiers' held-out
    accuracies, work per image), scaling.png and clear_steps.png."""
    lines = ["# The paper in the shapes world", "", "## Claims: paired differences of overall scores", "",
             *claim_lines([o]), ""]
    for table in dict.fromkeys(t for t, *_ in SHAPES_ROWS):
        rows = {name: scores_of(row_folder(o, name)) for t, name, *_ in SHAPES_ROWS if t == table}
        title = f"Table {table}" if table.isdigit() else "DPO with the trained ORM's pairs"
        lines += [f"## {title}",
                  "", data.markdown_table(rows), ""]
    chart, numbers = scaling_chart(o, z)
    data.save_png(chart, o / "scaling.png")
    lines += ["## Best-of-N (Figures 3, 6, 7): overall on the first image of each prompt", "", *numbers, ""]
    data.save_png(data.line_chart({k: found["clear"][k] for k in CLEAR_CURVES}, range(1, z["steps"] + 1),
                                  "the baseline's step images (x̂0)", "step"), o / "clear_steps.png")
    lines += [*clear_lines(found["clear"], z["steps"]), *pruning_lines("PARM (the PARM row)", found["pruning"]),
              *pruning_lines("PARM on the raster generator (the Raster + PARM row)", found["raster pruning"]),
              "## Verifiers: held-out accuracy against the evaluator", "", *heldout_lines(o), "",
              "## Work per image", "", "| row | Show-o token-forwards | verifier tokens |", "|---|---|---|"]
    for _, name, _, flags, _ in SHAPES_ROWS:
        work = search_work(row_folder(o, name)) if flags else {}
        if work:
            lines.append(f"| {name} | {work['showo_token_forwards']:.0f} | {work['verifier_tokens']:.0f} |")
    lines += ["", f"Total time of this invocation: {seconds / 60:.1f} min."]
    with data.atomic_path(o / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")

def pool_runs(a) -> int:
    """`train.py shapes --pool RUN ... --out OUT`: the claims of finished runs (one per seed), per run and pooled,
    in OUT/claims.md. Every run must have scored every row."""
    runs = [Path(r) for r in a.pool]
    twice = sorted({str(r) for r in runs if sum(r.resolve() == q.resolve() for q in runs) > 1})
    if twice:
        fail(f"--pool names {twice[0]} twice: give each run (one per seed) once")
    for r in runs:
        missing = [name for _, name, *_ in SHAPES_ROWS if not (row_folder(r, name) / "results.jsonl").is_file()]
        if missing:
            fail(f"--pool {r}: no scored row {missing[0]!r} ({len(missing)} missing): finish that run first "
                 f"(python train.py shapes --out {r} --seed SEED)")
    seeds = [data.read_config(r, "run.json").get("seed") for r in runs]
    lines = ["# Claims of the paper in the shapes world, pooled over runs", "",
             "Runs: " + ", ".join(f"{r} (seed {s})" for r, s in zip(runs, seeds)), "", *claim_lines(runs)]
    out = Path(a.out)              # checked and locked by `start`
    with data.atomic_path(out / "claims.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"[shapes] wrote {out / 'claims.md'}", file=sys.stderr)
    return 0

EXAMPLE_TAGS = ("counting", "position", "color_attr", "two_object", "colors", "single_object")

def verdict(image: np.ndarray, prompt: str) -> str:
    """The evaluator's verdict as a tile caption: two lines of at most 20 characters, the width of a tile."""
    ok, reason = data.judge_prompt(image, prompt)
    return "yes" if ok else "\n".join(textwrap.wrap(f"no: {reason}", 20)[:2])

def correction(o: Path, k: int, prompt: str, codec) -> tuple[int, Path | None, dict | None]:
    """PARM++'s best story on evaluation prompt k, from the PARM++ row's traces: (kind, final image, its first
    reflection), kind 0 when it said "no" to a wrong image and the corrected one is right, 1 when it said "no",
    2 otherwise (no trace: (3, None, None))."""
    best: tuple[int, Path | None, dict | None] = (3, None, None)
    for trace in sorted((row_folder(o, "Self-correction + PARM++") / f"{k:05d}" / "traces").glob("*.json")):
        first = (json.loads(trace.read_text()).get("reflections") or [None])[0]
        if first is None:
            continue
        final = trace.parent.parent / "samples" / f"{trace.stem}.png"
        before = sample.decode_images(codec, torch.tensor([first["codes"]]))[0]
        fixed = not data.judge_prompt(before, prompt)[0] and data.judge_prompt(np.asarray(data.load_image(final)),
                                                                                prompt)[0]
        kind = 2 if first["answer"] != "no" else 0 if fixed else 1
        best = min(best, (kind, final, first), key=lambda b: b[0])
    return best

def parm_tiles(o: Path, k: int, prompt: str, model, tok, codec) -> tuple[list, torch.Tensor]:
    """PARM's search on evaluation prompt k's first image, from the PARM row's trace: each path's final image, and
    beside a pruned path the x̂0 PARM pruned it on; then PARM's choice. Also every path's x̂0 at every step."""
    trace = json.loads((row_folder(o, "PARM") / f"{k:05d}" / "traces" / "0000.json").read_text())
    _, history = cotgen.generate(model, tok, prompt, trace["n"], steps=trace["steps"], cfg=trace["cfg"],
                                 seed=trace["paths"][0]["seed"], history=True)
    tiles = []
    for i, path in enumerate(trace["paths"]):
        final = sample.decode_images(codec, history[i, -1:])[0]
        if "truncated" in (path["ended"] or ""):
            t = int(trace["clear_at"][str(i)])
            seen = sample.decode_images(codec, history[i, t:t + 1])[0]
            tiles += [(seen, f"path {i}: pruned\nat step {t + 1} on this"), (final, f"...it would have\n"
                                                                                 f"{verdict(final, prompt)}")]
        else:
            tiles.append((final, f"path {i} kept\n{verdict(final, prompt)}"))
    chosen = sample.decode_images(codec, history[trace["winner"], -1:])[0]
    return tiles + [(chosen, f"PARM's choice: {trace['winner']}\n{verdict(chosen, prompt)}")], history

def shapes_examples(o: Path, z: dict, model, tok, codec) -> np.ndarray:
    """examples.png: first one path's x̂0 at every step, clearing from broken to whole; then a few evaluation
    prompts, one per tag first, those where PARM++ fixed an image first: the baseline's image, PARM's paths (a
    pruned one with the x̂0 it was pruned on), PARM's choice, and from the PARM++ row its first image, the
    verifier's reason and the corrected image; every caption ends with the evaluator's verdict."""
    specs = data.eval_specs()[:z["limit"]]
    stories = {k: correction(o, k, spec["prompt"], codec) for k, spec in enumerate(specs)}
    order = sorted(stories, key=lambda k: (stories[k][0], EXAMPLE_TAGS.index(specs[k]["tag"])))
    first_of_tag: dict[str, int] = {}
    for k in order:
        first_of_tag.setdefault(specs[k]["tag"], k)
    rows, steps = [], None
    for k in list(first_of_tag.values())[:z["examples"]]:      # a dict keeps the first insertion's place
        prompt = specs[k]["prompt"]
        first = np.asarray(data.load_image(row_folder(o, "Baseline") / f"{k:05d}" / "samples" / "0000.png"))
        tiles, history = parm_tiles(o, k, prompt, model, tok, codec)
        whole = [i for i in range(len(history)) if data.well_formed(codec.decode_cells(history[i, -1:])[0])]
        if steps is None and whole:
            pics = sample.decode_images(codec, history[whole[0]])
            steps = (f"{prompt}: path {whole[0]}'s x̂0 at every step",
                     [(p, f"step {t + 1}\n{verdict(p, prompt)}") for t, p in enumerate(pics)])
        _, final, reflection = stories[k]
        if reflection is not None:
            before = sample.decode_images(codec, torch.tensor([reflection["codes"]]))[0]
            tiles.append((before, f"PARM++ 1st: {reflection['answer']}\n{verdict(before, prompt)}"))
        if reflection is not None and "reason" in reflection:
            after = np.asarray(data.load_image(final))
            tiles.append((after, f"after: {strip_no(reflection['reason'])[:13]}\n{verdict(after, prompt)}"))
        rows.append((prompt, [(first, f"baseline\n{verdict(first, prompt)}"), *tiles]))
    return data.captioned_rows(([steps] if steps else []) + rows)

# ---- the command line ------------------------------------------------------------------------------------

# one entry per subcommand: (adds its parser, runs it)
COMMANDS = {"dpo": (add_dpo_parser, run_dpo), "selfcorrect": (add_selfcorrect_parser, run_selfcorrect),
            "curate": (add_curate_parser, run_curate), "pretrain": (add_pretrain_parser, run_pretrain),
            "shapes": (add_shapes_parser, run_shapes),
            "orm": (partial(add_sft_parser, task="orm"), partial(run_sft, task="orm")),
            "parm": (partial(add_sft_parser, task="parm"), partial(run_sft, task="parm"))}

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return p

def main(argv=None, pipeline: sample.Pipeline | None = None) -> int:
    """The command line; `pipeline`: the pipeline running it as a stage, whose command continues it."""
    args = build_parser().parse_args(argv)
    args.line = shlex.join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)])   # as typed
    sample.join_processes(args)
    rerun = (f"`{pipeline.line}`" if pipeline else "the same command" if args.command == "shapes" else
             "the same command with --resume")
    return sample.command(lambda: start(args), f"{args.out} keeps its last complete checkpoint or file; {rerun} "
                          "continues", f"run {rerun}: it continues from the last complete checkpoint", pipeline)

def start(args) -> int:
    """--out checked before anything else (a folder of this command's run, or a new or empty one), then the
    subcommand, which checks its flags and files before it writes anything."""
    if args.command == "shapes" and sample.world()[1] > 1:
        fail("`train.py shapes` runs its stages in processes of its own, not under torchrun: run the stages' own "
             "commands under torchrun instead")
    out = sample.check_out(args.out)
    if out.is_dir() and any(out.iterdir()) and not (out / "run.json").is_file():
        fail(f"--out {out} holds files of no {args.command} run (no run.json): choose a new or empty folder")
    return COMMANDS[args.command][1](args)

if __name__ == "__main__":
    sys.exit(main())
