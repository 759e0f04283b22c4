import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The fixtures were computed with one thread; GEMM results (and so sampled tokens) can depend on it.
torch.set_num_threads(1)

SHARED = Path(os.environ.get("COTGEN_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def fixtures():
    """(expected tensors, expected.json, fixtures dir) of the reference set made by the original code."""
    from safetensors.torch import load_file

    if not (FIXTURES / "expected.safetensors").is_file():
        raise FileNotFoundError(f"reference fixtures not found at {FIXTURES}: set COTGEN_SHARED to the shared/ folder")
    return load_file(FIXTURES / "expected.safetensors"), json.loads((FIXTURES / "expected.json").read_text()), FIXTURES


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The built-in tiny checkpoints, written once per test session through the product's writer."""
    import data

    return data.tiny_checkpoints(tmp_path_factory.mktemp("cache"))


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
