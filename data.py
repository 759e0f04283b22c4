"""Checkpoint and tokenizer loading, tiny checkpoints, prompts and image I/O.

Everything that touches the file system lives here, so the model files (cotgen.py, verifiers.py) only hold
architecture and algorithms. Loading is strict: a checkpoint is read through an explicit key map
(checkpoint key -> module parameter), and any missing key, unexpected key or shape mismatch stops with one
message that lists them all. Weights are never unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------------------------------------
# errors


class CheckpointError(RuntimeError):
    """A checkpoint (or config, or tokenizer) cannot be used as given. The message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------
# dtype / device parsing shared by every CLI

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def parse_device(name: str | torch.device | None) -> torch.device:
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available in this torch build: use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or auto")
    return dev


# ----------------------------------------------------------------------------------------------------------
# safetensors checkpoints in the layouts users meet

WEIGHT_FILES = ("model.safetensors", "pytorch_model.safetensors", "diffusion_pytorch_model.safetensors")
INDEX_SUFFIX = ".safetensors.index.json"


def find_weight_files(ckpt_dir: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor name of a checkpoint directory to the safetensors file holding it.

    Accepts a sharded `*.safetensors.index.json`, `model.safetensors` or `pytorch_model.safetensors`
    (the name showlab/show-o and showlab/magvitv2 ship)."""
    from safetensors import safe_open

    d = Path(ckpt_dir)
    if not d.exists():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory: pass the folder that holds config.json and the weights")
    indexes = sorted(d.glob("*" + INDEX_SUFFIX))
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (no 'weight_map'): re-download it") from e
        missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {d}: {', '.join(missing)}; "
                                  "download every shard listed in the index")
        files = {k: d / f for k, f in weight_map.items()}
    else:
        single = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
        if single is None:
            pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
            hint = (f" It holds pickle files ({', '.join(pickles)}), which this project never loads: convert "
                    "them once with `python -c \"import torch, safetensors.torch as s; "
                    "s.save_file(torch.load('pytorch_model.bin'), 'pytorch_model.safetensors')\"`") if pickles else ""
            raise CheckpointError(f"no weights in {d}: expected {' or '.join(WEIGHT_FILES)} or a sharded "
                                  f"*{INDEX_SUFFIX}.{hint}")
        files = None
        try:
            with safe_open(single, framework="pt") as f:
                files = {k: single for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{single} is not a readable safetensors file ({e}); it is probably truncated "
                                  "or incomplete: download it again") from e
    return files


def read_config(ckpt_dir: str | os.PathLike, name: str = "config.json") -> dict:
    path = Path(ckpt_dir) / name
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the checkpoint folder needs its {name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def load_state(model: nn.Module, ckpt_dir: str | os.PathLike, key_map: Mapping[str, str], *,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               row_limit: Mapping[str, int] | None = None, what: str = "checkpoint") -> nn.Module:
    """Load `ckpt_dir` into `model` strictly through `key_map` (checkpoint key -> parameter/buffer name).

    `model` should be built on the meta device: every tensor is read once from the file, cast to `dtype`
    (floating tensors only) and placed on `device`, then assigned, so the weights are never held twice.
    `row_limit[key] = n` keeps only the first n rows of a checkpoint tensor (vocabulary truncation).
    Persistent buffers the model computes itself (and does not expect in the file) are left as they are."""
    from safetensors import safe_open

    files = find_weight_files(ckpt_dir)
    row_limit = dict(row_limit or {})
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    missing = sorted(k for k in key_map if k not in files)
    unexpected = sorted(k for k in files if k not in key_map)
    unknown_targets = sorted(v for v in key_map.values() if v not in targets)
    assert not unknown_targets, f"key map names parameters the module lacks: {unknown_targets[:5]}"
    not_covered = sorted(set(n for n, _ in model.named_parameters()) - set(key_map.values()))
    assert not not_covered, f"key map leaves module parameters unloaded: {not_covered[:5]}"

    mismatched = []
    shapes = {}
    by_file: dict[Path, list[str]] = {}
    for k in key_map:
        if k in files:
            by_file.setdefault(files[k], []).append(k)
    for path, keys in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                for k in keys:
                    shape = list(f.get_slice(k).get_shape())
                    if k in row_limit and shape and shape[0] >= row_limit[k]:
                        shape[0] = row_limit[k]
                    shapes[k] = shape
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download it again") from e
    for k, shape in shapes.items():
        want = list(targets[key_map[k]].shape)
        if shape != want:
            mismatched.append(f"{k}: checkpoint {shape} vs model {want}")
    if missing or unexpected or mismatched:
        parts = [f"{what} in {ckpt_dir} does not match the model built from its config:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
        parts.append("  Check that config.json belongs to these weights and that the folder is the right model.")
        raise CheckpointError("\n".join(parts))

    device = torch.device(device)
    loaded = {}
    for path, keys in by_file.items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    if k in row_limit:
                        t = t[: row_limit[k]]
                    t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                    loaded[key_map[k]] = t
        except Exception as e:
            raise CheckpointError(f"{path} could not be read ({e}); it is probably truncated: download it again") from e
    _assign(model, loaded)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"tensors left unloaded on the meta device: {left[:5]}"
    return model


def _assign(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)
        else:
            mod._buffers[leaf] = t


def save_state(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (temp name in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata or {"format": "pt"})


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success rename it to `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(obj, path: str | os.PathLike, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=indent) + "\n")


# ----------------------------------------------------------------------------------------------------------
# tokenizers (the `tokenizers` library reading a Hugging Face tokenizer.json)


def load_tokenizer(path: str | os.PathLike):
    """Load a `tokenizer.json` (a file, or a folder that holds one)."""
    from tokenizers import Tokenizer

    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise CheckpointError(f"{f} not found: the tokenizer folder needs a tokenizer.json "
                              "(download it with the model, e.g. `hf download microsoft/phi-1_5 tokenizer.json`)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f} is not a tokenizers JSON file ({e})") from e


def train_tiny_bpe(corpus: Iterable[str], vocab_size: int, *, qwen_style: bool = False):
    """A deterministic byte-level BPE tokenizer trained on `corpus` (for the built-in tiny checkpoints).

    `qwen_style` adds Qwen2's NFC normaliser; otherwise it is a GPT-2/CodeGen-style tokenizer like phi-1.5's.
    Special tokens are added by the caller in each model's own order."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if qwen_style:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return tok


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizers are trained on: GenEval-style prompts plus the verifier prompts' words."""
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white"]
    objects = ["apple", "dog", "cat", "car", "cup", "bench", "clock", "banana", "giraffe", "bowl", "chair",
               "table", "bird", "horse", "pizza", "umbrella", "kitchen", "person", "sheep", "boat"]
    lines = []
    for i, o in enumerate(objects):
        c = colors[i % len(colors)]
        lines += [f"a photo of a {o}", f"a photo of a {c} {o}", f"a photo of two {o}s",
                  f"a photo of a {o} left of a {objects[(i + 3) % len(objects)]}",
                  f"a photo of a {c} {o} and a {colors[(i + 4) % len(colors)]} {objects[(i + 7) % len(objects)]}"]
    lines += ["Does this image match the description? Please directly respond with yes or no.",
              "This image is a certain step in the text-to-image generation process with a prompt.",
              "Do you think whether the image has the potential to iterate to the image satisfied the prompt?",
              "It is not the final generated one, and will keep iterating better. Answer yes or no.",
              "You are a helpful assistant. user assistant system yes no Yes No",
              "The image does not match because the object is missing, the colour is wrong, the count is wrong."]
    return lines


# ----------------------------------------------------------------------------------------------------------
# images


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1,1] -> [B,H,W,3] uint8, truncating as Show-o's inference script does."""
    x = torch.clamp((x.detach().float() + 1.0) / 2.0, 0.0, 1.0) * 255.0
    return x.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)


def save_png(img: np.ndarray, path: str | os.PathLike) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def image_grid(images: np.ndarray, cols: int, pad: int = 2, marks: Iterable[bool] | None = None) -> np.ndarray:
    """Tile [K,H,W,3] uint8 images into one array; `marks[k]` draws a red frame (used for pruned paths)."""
    k, h, w, _ = images.shape
    rows = (k + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    marks = list(marks) if marks is not None else [False] * k
    for i in range(k):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + h, x:x + w] = images[i]
        if marks[i]:
            t = max(1, h // 32)
            out[y:y + t, x:x + w] = out[y + h - t:y + h, x:x + w] = (220, 20, 20)
            out[y:y + h, x:x + t] = out[y:y + h, x + w - t:x + w] = (220, 20, 20)
    return out


def load_image(path: str | os.PathLike):
    """Open an image file as PIL RGB, with one clear error if it is missing or cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} not found")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {p} cannot be decoded ({e}): is it a truncated or non-image file?") from e


# ----------------------------------------------------------------------------------------------------------
# built-in tiny checkpoints

TINY_VERSION = "tiny-v1"  # bump when a writer changes, so stale caches are rebuilt


def default_cache_dir() -> Path:
    return Path(os.environ.get("COTGEN_CACHE", Path.home() / ".cache" / "cotgen"))


def tiny_checkpoints(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write (once) and return the tiny random checkpoints, in the official formats, so that `--tiny` goes
    through exactly the loaders real weights go through. Keys: showo, phi, magvit, llava. Each part is
    written to a temporary folder and renamed into place, so an interrupted run leaves no half-written part."""
    import shutil

    import cotgen
    import verifiers

    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / TINY_VERSION
    parts = {"generator": cotgen.write_tiny_showo, "llava": verifiers.write_tiny_llava}
    for name, writer in parts.items():
        final = root / name
        if (final / "complete").is_file():
            continue
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            writer(tmp)
            (tmp / "complete").write_text("ok\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    gen = root / "generator"
    return {"showo": gen / "showo", "phi": gen / "phi", "magvit": gen / "magvitv2", "llava": root / "llava"}


# ----------------------------------------------------------------------------------------------------------
# preference data (DPO, Sec. 3.3): JSONL pair records, prompt lists, GenEval-template prompts


class DataError(ValueError):
    """A data file (preference pairs, prompts) cannot be used as given. The message names the file and record."""


from dataclasses import dataclass  # noqa: E402  (this section was added after the others)


@dataclass
class PairRecord:
    """One line of a preference file: `chosen`/`rejected` are image paths (str) or image-token lists (codes)."""
    line: int
    prompt: str
    chosen: str | list
    rejected: str | list
    extra: dict


def _pair_side(rec: dict, key: str) -> str | None:
    """Why rec[key] is not an image path or a token list (None when it is fine)."""
    v = rec.get(key)
    if v is None:
        return f"no {key!r} field"
    if isinstance(v, str):
        return None if v.strip() else f"{key!r} is an empty path"
    if isinstance(v, list):
        if not v:
            return f"{key!r} is an empty token list"
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return f"{key!r} is a list but not of integer image tokens"
        return None
    return f"{key!r} must be an image path or a list of image tokens, not {type(v).__name__}"


def read_pair_records(path: str | os.PathLike) -> tuple[list[PairRecord], list[str]]:
    """Read a JSONL preference file: records {"prompt", "chosen", "rejected"} (other fields are kept in
    `extra`). Returns (good records, problems), one problem per bad line as "FILE line N: why", so the caller
    can stop with all of them at once or skip them. A missing or empty file raises DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"preference file {p} not found")
    good, problems = [], []
    with open(p, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise DataError(f"preference file {p} is empty: it needs one JSON record per line, "
                        '{"prompt": ..., "chosen": IMAGE, "rejected": IMAGE}')
    for i, line in lines:
        where = f"{p} line {i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg})")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{where}: a record must be a JSON object")
            continue
        why = [w for w in (_pair_side(rec, "chosen"), _pair_side(rec, "rejected")) if w]
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            why.insert(0, "no 'prompt' text")
        if not why and rec["chosen"] == rec["rejected"]:
            why.append("'chosen' and 'rejected' are the same image")
        if why:
            problems.append(f"{where}: {'; '.join(why)}")
            continue
        extra = {k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected")}
        good.append(PairRecord(i, prompt, rec["chosen"], rec["rejected"], extra))
    return good, problems


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """A prompt file: one prompt per line (GenEval's generation_prompts.txt format); blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file {p} not found")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompt file {p} holds no prompts: write one prompt per line")
    return prompts


GENEVAL_OBJECTS = ("person", "bicycle", "car", "bus", "bench", "bird", "cat", "dog", "horse", "sheep", "giraffe",
                   "umbrella", "suitcase", "bottle", "cup", "bowl", "banana", "apple", "pizza", "chair", "couch",
                   "clock", "vase", "teddy bear")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")


def geneval_prompts(n: int | None = None) -> list[str]:
    """Prompts in GenEval's six templates (single object, two objects, counting, colours, position, colour
    attribution), interleaved so that any prefix mixes all six. A stand-in when no prompt file is at hand;
    not the 553 benchmark prompts themselves."""
    obj, col, rel = GENEVAL_OBJECTS, GENEVAL_COLORS, GENEVAL_RELATIONS
    k = len(obj)
    plural = lambda o: o + ("es" if o.endswith(("ch", "sh", "s")) else "s")
    tags = [
        [f"a photo of a {o}" for o in obj],
        [f"a photo of a {obj[i]} and a {obj[(i + 5) % k]}" for i in range(k)],
        [f"a photo of {('two', 'three', 'four')[i % 3]} {plural(obj[i])}" for i in range(k)],
        [f"a photo of a {col[i % len(col)]} {obj[i]}" for i in range(k)],
        [f"a photo of a {obj[i]} {rel[i % len(rel)]} a {obj[(i + 7) % k]}" for i in range(k)],
        [f"a photo of a {col[i % len(col)]} {obj[i]} and a {col[(i + 3) % len(col)]} {obj[(i + 11) % k]}"
         for i in range(k)],
    ]
    prompts = [t[i] for i in range(k) for t in tags]
    return prompts if n is None else prompts[:n]
