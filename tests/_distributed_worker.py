"""One torchrun process of tests/test_distributed.py: runs each command line of a JSON list in turn, as
`torchrun ... train.py ARGS` / `torchrun ... sample.py ARGS` would ("sample" first selects sample.py)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)        # as the single-process runs of the test (conftest.py)

import sample  # noqa: E402
import train  # noqa: E402

for argv in json.loads(Path(sys.argv[1]).read_text()):
    rc = sample.main(argv[1:]) if argv[0] == "sample" else train.main(argv)
    if rc != 0:
        sys.exit(f"{argv} ended with {rc}")
