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


def read_jsonl_objects(path: str | os.PathLike, what: str, example: str) -> tuple[list[tuple[int, str, dict]], list[str]]:
    """The JSON objects of a JSONL file as (N, "FILE line N", object), and one "FILE line N: why" problem
    per line that is not a JSON object. A missing or empty file raises DataError naming `what` and the
    expected record (`example`)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} not found")
    with open(p, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise DataError(f"{what} {p} is empty: it needs one JSON record per line, {example}")
    records, problems = [], []
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
        records.append((i, where, rec))
    return records, problems


def read_pair_records(path: str | os.PathLike) -> tuple[list[PairRecord], list[str]]:
    """Read a JSONL preference file: records {"prompt", "chosen", "rejected"} (other fields are kept in
    `extra`). Returns (good records, problems), one problem per bad line as "FILE line N: why", so the caller
    can stop with all of them at once or skip them. A missing or empty file raises DataError."""
    good = []
    records, problems = read_jsonl_objects(path, "preference file",
                                           '{"prompt": ..., "chosen": IMAGE, "rejected": IMAGE}')
    for i, where, rec in records:
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


# ----------------------------------------------------------------------------------------------------------
# self-correction data (PARM++, Sec. 5): reflect.json records, and (prompt, low, reason, high) groups


@dataclass
class ReflectRecord:
    """One record of reflect.json (`train.py curate --task reflect`): an image judged against its prompt,
    "yes" (it passes) or "no" with the reason it fails. `image` is resolved to a path that exists, if any."""
    where: str          # how messages name it: "FILE record N (id 'X')"
    id: str
    image: Path
    prompt: str
    label: str
    reason: str | None


@dataclass
class CorrectionRecord:
    """One self-correction group (Sec. 5): the prompt, the low-quality image, the reflection reason and the
    high-quality image. `low`/`high` are image paths (str) or image-token lists; `low_from`/`high_from` name
    the record each image came from, so an image problem names the record that holds it."""
    prompt: str
    reason: str
    low: str | list
    high: str | list
    low_from: str
    high_from: str


def _text_field(rec: dict, key: str) -> str | None:
    v = rec.get(key)
    return v if isinstance(v, str) and v.strip() else None


def listed_records(p: Path, raw, what: str, expected: str) -> tuple[list[tuple[int, str, dict]], list[str]]:
    """The records of a parsed JSON list as (N, "FILE record N (id 'X')", record), and one problem per entry
    that is not an object. Anything but a non-empty list raises DataError naming `what` and `expected`."""
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{what} {p} must hold a non-empty JSON list of records {expected}, not "
                        f"{'an empty list' if raw == [] else type(raw).__name__}")
    records, problems = [], []
    for i, rec in enumerate(raw, 1):
        if not isinstance(rec, dict):
            problems.append(f"{p} record {i}: a record must be a JSON object")
            continue
        rid = rec.get("id")
        records.append((i, f"{p} record {i}" + (f" (id {rid!r})" if rid not in (None, "") else ""), rec))
    return records, problems


def read_reflect_records(path: str | os.PathLike) -> tuple[list[ReflectRecord], list[str]]:
    """Read reflect.json: a JSON list of {"id", "image", "prompt", "label": "yes"|"no", "reason": str|null,
    "conversations"} (the conversations are the verifier's and are not needed here). A "no" needs its reason.
    Image paths are relative to the file's folder; a bare name is also looked up under `images/` there.
    Returns (good records, problems), one "FILE record N (id 'X'): why" per bad record. A missing, empty or
    non-list file raises DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"reflection file {p} not found: it is written by `train.py curate --task reflect`")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"reflection file {p} is empty: it needs a JSON list of records "
                        '{"id", "image", "prompt", "label", "reason"}')
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"reflection file {p} is not valid JSON ({e.msg} at line {e.lineno}): it must be one JSON "
                        "list (JSONL groups go to --data)") from e
    records, problems = listed_records(p, raw, "reflection file", '{"id", "image", "prompt", "label", "reason"}')
    good = []
    for _, where, rec in records:
        rid = rec.get("id")
        why = [f"no {k!r} text" for k in ("id", "image", "prompt") if _text_field(rec, k) is None]
        label = rec.get("label")
        if label not in ("yes", "no"):
            why.append(f"unknown label {label!r} (use \"yes\" or \"no\")")
        elif label == "no" and _text_field(rec, "reason") is None:
            why.append('a "no" record needs its "reason" (the reflection text the self-correction learns from)')
        if why:
            problems.append(f"{where}: {'; '.join(why)}")
            continue
        image = p.parent / rec["image"]
        if not image.exists() and (p.parent / "images" / rec["image"]).exists():
            image = p.parent / "images" / rec["image"]
        good.append(ReflectRecord(where, rid, image, rec["prompt"], label, rec.get("reason") if label == "no" else None))
    return good, problems


def correction_groups(records: Iterable[ReflectRecord]) -> tuple[list[CorrectionRecord], list[str]]:
    """Sec. 5, self-correction groups from the PARM++ ranking data: for each prompt, every "no" image with its
    reason is paired with a "yes" image of the same prompt, the k-th "no" with the (k mod Y)-th "yes" in file
    order (deterministic, and it spreads the "no" images over the "yes" ones). Returns (groups, the prompts
    skipped because they lack a "yes" or a "no")."""
    by_prompt: dict[str, dict[str, list[ReflectRecord]]] = {}
    for r in records:
        by_prompt.setdefault(r.prompt, {"yes": [], "no": []})[r.label].append(r)
    groups, skipped = [], []
    for prompt, got in by_prompt.items():
        yes, no = got["yes"], got["no"]
        if not yes or not no:
            skipped.append(prompt)
            continue
        for k, n in enumerate(no):
            y = yes[k % len(yes)]
            groups.append(CorrectionRecord(prompt, n.reason, str(n.image), str(y.image), f"{n.where}:", f"{y.where}:"))
    return groups, skipped


def read_correction_records(path: str | os.PathLike) -> tuple[list[CorrectionRecord], list[str]]:
    """Read explicit self-correction groups, JSONL {"prompt", "low", "reason", "high"} (low/high: image paths
    relative to the caller's image root, or lists of image tokens). Returns (good records, problems), one
    "FILE line N: why" per bad line; a missing or empty file raises DataError."""
    good = []
    records, problems = read_jsonl_objects(path, "self-correction file",
                                           '{"prompt": ..., "low": IMAGE, "reason": ..., "high": IMAGE}')
    for i, where, rec in records:
        why = [f"no {k!r} text" for k in ("prompt", "reason") if _text_field(rec, k) is None]
        why += [w for w in (_pair_side(rec, "low"), _pair_side(rec, "high")) if w]
        if why:
            problems.append(f"{where}: {'; '.join(why)}")
            continue
        side = lambda s: f"{where}: {s!r}" if isinstance(rec[s], list) else f"{where}: {s}"
        good.append(CorrectionRecord(rec["prompt"], rec["reason"], rec["low"], rec["high"], side("low"), side("high")))
    return good, problems


# ----------------------------------------------------------------------------------------------------------
# verifier training data (Sec. 3.2, 4, 5): prompts from GenEval's templates, LLaVA conversation records


PROMPT_TEMPLATES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNT_WORDS = ("two", "three", "four")     # GenEval counts 2..4


def with_article(word: str) -> str:
    """GenEval's article rule: "an" before a vowel letter, else "a"."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(word: str) -> str:
    """GenEval's plural rule: "es" after a final s, else "s" (so "bus" -> "buses", "mouse" -> "mouses")."""
    return word + ("es" if word.endswith("s") else "s")


def prompt_key(prompt: str) -> str:
    """What two prompts must share to count as the same one: case, spacing and a final period are ignored."""
    return " ".join(prompt.lower().split()).rstrip(".")


def _distinct_pair(i: int, k: int) -> tuple[int, int]:
    """The i-th ordered pair (a, b), a != b, of range(k): a bijection of range(k * (k - 1))."""
    a, b = divmod(i, k - 1)
    return a, b + (b >= a)


def _template_size(tag: str, objects, colourable, colors) -> int:
    k, p, m = len(objects), len(colourable), len(colors)
    return {"single_object": k, "two_object": k * (k - 1), "counting": k * len(COUNT_WORDS), "colors": p * m,
            "position": k * (k - 1) * len(GENEVAL_RELATIONS), "color_attr": p * (p - 1) * m * (m - 1)}[tag]


def _template_prompt(tag: str, i: int, objects, colourable, colors) -> str:
    """Prompt number i of one template (mixed-radix decoding of i; every i gives a different prompt)."""
    O, P, C = objects, colourable, colors
    if tag == "single_object":
        return f"a photo of {with_article(O[i])}"
    if tag == "two_object":
        a, b = _distinct_pair(i, len(O))
        return f"a photo of {with_article(O[a])} and {with_article(O[b])}"
    if tag == "counting":
        o, n = divmod(i, len(COUNT_WORDS))
        return f"a photo of {COUNT_WORDS[n]} {plural(O[o])}"
    if tag == "colors":
        o, c = divmod(i, len(C))
        return f"a photo of {with_article(C[c])} {P[o]}"
    if tag == "position":
        pair, r = divmod(i, len(GENEVAL_RELATIONS))
        a, b = _distinct_pair(pair, len(O))
        return f"a photo of {with_article(O[a])} {GENEVAL_RELATIONS[r]} {with_article(O[b])}"
    pair, cpair = divmod(i, len(C) * (len(C) - 1))
    (a, b), (ca, cb) = _distinct_pair(pair, len(P)), _distinct_pair(cpair, len(C))
    return f"a photo of {with_article(C[ca])} {P[a]} and {with_article(C[cb])} {P[b]}"


def _name_list(names, what: str) -> list[str]:
    names = [" ".join(str(n).split()) for n in names]
    if not names or not all(names):
        raise DataError(f"the {what} list is empty or has a blank entry: give one {what} name per line")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"the {what} list names {', '.join(dup)} more than once: each name must appear once")
    return names


def training_prompts(n: int | None = None, *, objects=GENEVAL_OBJECTS, colors=GENEVAL_COLORS,
                     exclude: Iterable[str] = (), seed: int = 0) -> list[str]:
    """Sec. 3.2, the ranking data's prompts: GenEval's six object-centred templates (single object, two
    objects, counting, colours, position, colour attribution) over an object and a colour list, with GenEval's
    wording (articles, plurals, counts 2-4, no coloured "person", two different colours in an attribution).

    Each template's prompts are taken in a seeded random order and the templates take turns, so any prefix
    mixes all six and the same arguments always give the same list; a template that runs out leaves the
    turn to the others. Prompts equal to one of `exclude` (the test prompts; case, spacing and a final period
    ignored) are skipped. n=None gives every prompt; an n larger than that raises DataError."""
    objects, colors = _name_list(objects, "object"), _name_list(colors, "colour")
    colourable = [o for o in objects if o != "person"]
    skip = {prompt_key(p) for p in exclude}
    rng = np.random.default_rng(seed)
    streams = []
    for tag in PROMPT_TEMPLATES:
        size = _template_size(tag, objects, colourable, colors)
        streams.append([tag, rng.permutation(size) if size > 0 else np.zeros(0, dtype=np.int64), 0])
    out: list[str] = []
    while n is None or len(out) < n:
        took = False
        for s in streams:
            tag, order, pos = s
            while pos < len(order):
                prompt = _template_prompt(tag, int(order[pos]), objects, colourable, colors)
                pos += 1
                if prompt_key(prompt) not in skip:
                    out.append(prompt)
                    took = True
                    break
            s[2] = pos
            if n is not None and len(out) == n:
                break
        if not took:
            break
    if n is not None and len(out) < n:
        raise DataError(f"asked for {n} prompts, but the templates give only {len(out)} over {len(objects)} objects "
                        f"and {len(colors)} colours (after excluding the test prompts): ask for fewer, or give "
                        "longer --objects / --colors lists")
    return out


@dataclass
class Conversation:
    """One LLaVA training record: an image and the turns of its conversation, human first, gpt last."""
    where: str          # how messages name it: "FILE record N (id 'X')"
    id: str
    image: Path
    turns: list[str]    # the values, alternating human, gpt, ..., gpt


def llava_record(rid: str, image: str, turns, **extra) -> dict:
    """A record in LLaVA's JSON format: {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}
    with `turns` alternating human, gpt, ...; `extra` fields (prompt, label, ...) ride along."""
    convs = [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(turns)]
    return {"id": rid, "image": image, **extra, "conversations": convs}


def _conversation_problem(rec: dict) -> str | None:
    """Why rec["conversations"] is not human/gpt turns with one <image> in the first human turn (None: fine)."""
    convs = rec.get("conversations")
    if not isinstance(convs, list) or len(convs) < 2:
        return "'conversations' must be a list of at least two turns (human, then gpt)"
    for t, turn in enumerate(convs):
        want = ("human", "gpt")[t % 2]
        if not isinstance(turn, dict) or turn.get("from") != want:
            got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            return (f"turn {t + 1} comes from {got!r} but must come from {want!r}: turns alternate human, gpt, "
                    "starting with human")
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            return f"turn {t + 1} has no 'value' text"
    if len(convs) % 2:
        return "the last turn is a human one: every human turn needs the gpt answer that follows it"
    where_images = [t for t, turn in enumerate(convs) if "<image>" in turn["value"]]
    if where_images != [0] or convs[0]["value"].count("<image>") != 1:
        return ("the conversation needs exactly one <image>, in the first human turn "
                f"(found it in turn(s) {', '.join(str(t + 1) for t in where_images) or 'none'})")
    return None


def read_conversations(path: str | os.PathLike, image_root: str | os.PathLike | None = None
                       ) -> tuple[list[Conversation], list[str]]:
    """Read LLaVA training data: a JSON list (or JSONL) of {"id", "image", "conversations"} records, as
    `train.py curate` writes them. Image paths are relative to `image_root` (default: the file's folder) or
    absolute, and must exist. Returns (good records, problems), one "FILE record N (id 'X'): why" per bad
    record; a missing, empty or unreadable file raises DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"training data {p} not found: make it with `train.py curate`")
    root = Path(image_root) if image_root is not None else p.parent
    text = p.read_text(encoding="utf-8")
    try:
        raw = [json.loads(line) for line in text.splitlines() if line.strip()] if p.suffix == ".jsonl" \
            else json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"training data {p} is not valid JSON ({e.msg} at line {e.lineno}): it must be one JSON "
                        "list of records (or .jsonl, one record per line)") from e
    records, problems = listed_records(p, raw, "training data", '{"id", "image", "conversations"}')
    good = []
    for i, where, rec in records:
        rid = rec.get("id")
        image = rec.get("image")
        if not isinstance(image, str) or not image.strip():
            why = "no 'image' path (the verifier is trained on image questions only)"
        elif not (root / image).is_file():
            why = f"image {root / image} not found (paths are relative to {root}; pass --image-root)"
        else:
            why = _conversation_problem(rec)
        if why:
            problems.append(f"{where}: {why}")
            continue
        good.append(Conversation(where, str(rid if rid is not None else i), root / image,
                                 [t["value"] for t in rec["conversations"]]))
    return good, problems


def read_reasons(path: str | os.PathLike) -> dict[str, str]:
    """A reasons file for PARM++'s reflection data: JSONL {"id" or "image", "reason"} (e.g. written by a
    stronger model). Returns {id or image: reason}; a bad line raises DataError naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"reasons file {p} not found")
    out = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {i}: not valid JSON ({e.msg})") from e
        key = rec.get("id", rec.get("image")) if isinstance(rec, dict) else None
        reason = rec.get("reason") if isinstance(rec, dict) else None
        if not isinstance(key, str) or not isinstance(reason, str) or not reason.strip():
            raise DataError(f'{p} line {i}: each line must be {{"id" or "image": ..., "reason": "..."}} with a '
                            "non-empty reason")
        out[key] = reason.strip()
    if not out:
        raise DataError(f"reasons file {p} holds no reasons")
    return out
