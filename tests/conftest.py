import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The fixtures were computed with one thread; GEMM results (and so sampled tokens) can depend on it.
torch.set_num_threads(1)

# The original code's outputs on tiny checkpoints, kept byte-identical in the repository (tests/fixtures/README.md).
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def fixtures():
    """(expected tensors, expected.json, fixtures dir) of the reference set made by the original code."""
    from safetensors.torch import load_file

    return load_file(FIXTURES / "expected.safetensors"), json.loads((FIXTURES / "expected.json").read_text()), FIXTURES


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The built-in tiny checkpoints, written once per test session through the product's writer."""
    import sample

    return sample.tiny_checkpoints(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def showo(tiny):
    """The tiny Show-o and its tokenizer (test modules that need the fixture checkpoint define their own)."""
    import cotgen

    return cotgen.load_showo(tiny["showo"], tiny["phi"])


@pytest.fixture(scope="module")
def magvit(tiny):
    import cotgen

    return cotgen.load_magvit(tiny["magvit"])


def fresh_showo(tiny):
    """A new, trainable copy of the tiny Show-o."""
    import cotgen

    return cotgen.load_showo(tiny["showo"], tiny["phi"])[0]


# ---- evaluation helpers the tests use to see that training worked (not part of the product) ----------------


@torch.no_grad()
def preference_stats(policy, reference, tok, pairs, draws: int = 4, seed: int = 0, beta: float = 0.1) -> dict:
    """Mean DPO reward margin and preference accuracy of `policy` over `pairs`, averaged over `draws` shared
    masks without text dropout (the same masks for every model compared)."""
    import dpo

    was = policy.training
    policy.eval()
    margins = []
    for d in range(draws):
        g = torch.Generator().manual_seed(dpo.derive_seed(seed, "eval", d))
        (pw, pl), (rw, rl), _ = dpo.pair_log_likelihoods(policy, reference, tok, pairs.batch(range(len(pairs))), g,
                                                         shared_mask=True, cond_dropout=0.0)
        margins.append(dpo.dpo_loss(pw, pl, rw, rl, beta)[1])
    policy.train(was)
    m = torch.stack(margins).mean(0)
    return {"margin": float(m.mean()), "accuracy": float((m > 0).float().mean())}


@torch.no_grad()
def correction_loss(model, tok, groups, draws: int = 4, seed: int = 0, batch: int = 16) -> float:
    """The self-correction cross-entropy per scored token of `model` on `groups`, over `draws` fixed mask draws
    and without text dropout."""
    import dpo

    was = model.training
    model.eval()
    total, count = 0.0, 0
    for d in range(draws):
        g = torch.Generator().manual_seed(dpo.derive_seed(seed, "eval", d))
        for start in range(0, len(groups), batch):
            logp, scored = dpo.correction_log_likelihood(model, tok, groups.batch(range(start, min(start + batch,
                                                                                                   len(groups)))),
                                                         g, cond_dropout=0.0)
            total -= float(logp.sum())
            count += int(scored.sum())
    model.train(was)
    return total / count


@torch.no_grad()
def evaluate_sft(verifier, examples, batch: int = 8) -> float:
    """Mean cross-entropy per labelled token over all of `examples` (the tokens `sft_loss` trains on)."""
    import data
    import verifiers

    was = verifier.model.training
    verifier.model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch):
        index = range(start, min(start + batch, len(examples)))
        pixels = verifier.pixels([data.load_image(examples.images[i]) for i in index]).to(verifier.device,
                                                                                          verifier.dtype)
        loss, stats = verifiers.sft_loss(verifier.model, pixels, [examples.ids[i] for i in index],
                                         [examples.labels[i] for i in index])
        total += loss.item() * stats["tokens"]
        count += stats["tokens"]
    verifier.model.train(was)
    return total / count
