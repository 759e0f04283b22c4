"""The ground floor: files, strict safetensors, tokenizers, images, records and prompts.

Nothing here knows a model. The model files (cotgen.py, verifiers.py) name the keys they want; this file
reads them strictly: a checkpoint is loaded through an explicit key map (checkpoint key -> state-dict name),
and every missing key, unexpected key and shape mismatch is reported in one message before any tensor is
read. Weights are never unpickled. Everything that writes goes through `atomic_path`, so a reader sees the
old file (or folder) or the complete new one, never half of one, and an output folder is written by one run at a
time (`folder_lock`).
"""
from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import json
import math
import os
import platform
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn

class CheckpointError(RuntimeError):
    """A checkpoint (or config, or tokenizer) cannot be used as given. The message names the file and the fix."""

class DataError(ValueError):
    """A data file (records, prompts) cannot be used as given. The message names the file and the record."""

class Unreadable(CheckpointError):
    """A weights file that cannot be read (cut short, damaged). `problem` says which and why; the message adds the
    advice for a downloaded file, which a command line replaces for a file a run of this project made."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{problem}: download it again")

class WriteError(RuntimeError):
    """Writing failed for the machine's reason, not a user's mistake: a full disk or quota, a failing or read-only
    file system. Names what was being written (as it would have been published) and the system's words."""

    def __init__(self, path: str | os.PathLike, error: OSError):
        self.path, self.error = Path(path), error
        super().__init__(f"cannot write {path}: {error.strerror or error}")

    @property
    def full(self) -> bool:
        return self.error.errno in (errno.ENOSPC, errno.EDQUOT)

# ---- dtype and device names, shared by every command line ------------------------------------------------

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
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                         "device(s): use cuda:0 .. cuda:N-1")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but this machine or torch build has no MPS: use --device cpu")
    return dev

# ---- atomic writing: the one way anything here reaches the disk ------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

# A temporary is named `.NAME.HOST.pidP.XXXX.tmp`: the next run on this host can tell the ones a killed writer
# (SIGKILL, power loss) left from a live writer's, which may be another machine's on a shared file system.
HOST = re.sub(r"[^A-Za-z0-9-]", "-", platform.node()) or "host"
TEMPORARY = re.compile(r"\.([A-Za-z0-9-]+)\.pid(\d+)\.[^.]*\.tmp$")
_swept: set[Path] = set()       # folders already rid of dead writers' temporaries by this process

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # another user's process: alive
        pass
    return True

def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove the temporaries of `atomic_path` in `folder` whose writer, a process of this host, is gone."""
    for t in Path(folder).glob(".*.tmp"):
        m = TEMPORARY.search(t.name)
        if m and m.group(1) == HOST and not _alive(int(m.group(2))):
            _remove(t)

def _temporary(path: Path, directory: bool) -> Path:
    """A new temporary name for `path` beside it (an empty folder if `directory`), once its folder is swept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.absolute() not in _swept:    # once per folder: a folder may receive thousands of files
        remove_stale_temporaries(path.parent)
        _swept.add(path.parent.absolute())
    prefix = f".{path.name}.{HOST}.pid{os.getpid()}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    return tmp

def _published(name, tmp: Path, path: Path) -> Path:
    """What `name`, a file written under the temporary `tmp`, is called once `tmp` is published as `path`."""
    try:
        return path / Path(os.fsdecode(name)).relative_to(tmp)
    except (TypeError, ValueError):     # no file name, or one outside `tmp` (the published name itself)
        return path

@contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False):
    """Yield a temporary name next to `path` (an empty folder if `directory`). On success it replaces `path`
    in one rename (an old folder is moved aside first and then deleted); on error, Ctrl-C or SIGTERM (the
    command lines raise it like Ctrl-C) it is removed. What killed writers left in the folder is removed first
    (`remove_stale_temporaries`). Files get the permissions the umask allows, as any other tool's. An OSError
    while writing (a full disk) becomes one WriteError naming the file as it would have been published."""
    path = Path(path)
    try:
        tmp = _temporary(path, directory)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if directory and path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if directory:
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, WriteError) as e:
        _remove(tmp)
        inner, error = (e.path, e.error) if isinstance(e, WriteError) else (e.filename, e)
        raise WriteError(_published(inner, tmp, path), error) from e
    except BaseException:
        _remove(tmp)
        raise

def write_json(obj, path: str | os.PathLike, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")

def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))

def save_state(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """A safetensors file (tensors made contiguous and moved to the CPU)."""
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata=metadata or {"format": "pt"})
        except SafetensorError as e:    # safetensors words a failed write as text: "... (os error 28) at path ..."
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from e

def save_png(img: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")

# ---- one run per output folder: its lock ----------------------------------------------------------------
#
# A command that owns an output folder holds an exclusive fcntl.flock on `.NAME.lock` *beside* the folder for its
# whole run, so a second run on the folder stops before any work instead of mixing its files with the first's. The
# OS drops a flock when its process ends, however it ends (SIGKILL included), so a lock is never stale: a file a
# killed run left is simply taken over. Beside, not inside: sample.py publishes its folder by renaming a temporary
# over it (a lock file inside would leave with the old folder) and keeps its parts in `.NAME.parts` beside it; a
# folder not made yet has no inside; and the folder then holds exactly the files the run wrote. The lock is per
# folder, not per process (two opens of one file conflict even in one process): a pipeline's stages, whose folders
# are sub-folders of its own, take their own locks under the pipeline's.

def lock_file(folder: str | os.PathLike) -> Path:
    """Where the lock of output folder `folder` lives: `.NAME.lock` beside it, however the folder is spelled."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock"

def _take(lock: Path, folder: Path) -> int | None:
    """An open descriptor holding `lock` (None: this file system has no locks); DataError if a live run holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, host = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
            os.close(fd)
            raise DataError(f"{folder} is in use by another run: process {pid or '?'} on host {host or '?'} holds its "
                            f"lock {lock}; wait for that run to end (or stop it), or choose another --out") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise
        try:        # its holder removes the file before letting go: then take the file that has the name now
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {HOST}\n".encode())
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)

@contextmanager
def folder_lock(folder: str | os.PathLike):
    """Hold the lock of output folder `folder` while the block runs (see above); a DataError naming the process
    and host that hold it otherwise. Yields the lock file, or None on a file system without locks (NFS without
    its lock daemon), where the run goes on unguarded."""
    lock = lock_file(folder)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = _take(lock, Path(folder))
    except OSError as e:
        raise WriteError(lock, e) from e
    try:
        yield None if fd is None else lock
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)        # while still holding it, so no other run holds a removed file
            os.close(fd)

# ---- safetensors checkpoints in the layouts users meet ---------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "pytorch_model.safetensors", "diffusion_pytorch_model.safetensors")
INDEX_SUFFIX = ".safetensors.index.json"

def _pickle_hint(d: Path) -> str:
    pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
    if not pickles:
        return ""
    return (f" It holds pickle files ({', '.join(pickles)}), which this project never loads: convert them once "
            "with `python -c \"import torch, safetensors.torch as s; "
            "s.save_file(torch.load('pytorch_model.bin'), 'pytorch_model.safetensors')\"`")

# what reading a damaged file raises (a device or memory error is never blamed on the file)
UNREADABLE = (SafetensorError, OSError)

@contextmanager
def _reading(path: Path):
    """safe_open(path) with a damaged header reported as the file's fault."""
    try:
        f = safe_open(path, framework="pt", device="cpu")
    except UNREADABLE as e:
        raise Unreadable(path, f"{path} is not a readable safetensors file ({e}); it is probably truncated or "
                               "incomplete") from e
    with f:
        yield f

def _read_tensor(f, path: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except UNREADABLE as e:
        raise Unreadable(path, f"{path} could not be read ({e}); it is probably truncated") from e

def find_weight_files(ckpt_dir: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor name of a checkpoint folder to the safetensors file holding it: a sharded
    `*.safetensors.index.json`, or one of WEIGHT_FILES (showlab/show-o and showlab/magvitv2 ship
    `pytorch_model.safetensors`)."""
    d = Path(ckpt_dir)
    if not d.exists():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory: pass the folder that holds config.json and the weights")
    indexes = sorted(d.glob("*" + INDEX_SUFFIX))
    if indexes:
        weight_map = config_field(read_config(d, indexes[0].name), "weight_map", dict, indexes[0])
        odd = next((k for k, f in weight_map.items() if not isinstance(f, str) or Path(f).name != f), None)
        if odd is not None:
            raise CheckpointError(f"{indexes[0]}: weight_map[{odd!r}] must be the file name of a shard in {d} "
                                  f"(got {weight_map[odd]!r}): re-download the index")
        missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
        if missing:
            raise CheckpointError(f"{indexes[0]} names shards that are not in {d}: {', '.join(missing)}; "
                                  "download every shard listed in the index")
        return {k: d / f for k, f in weight_map.items()}
    single = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
    if single is None:
        raise CheckpointError(f"no weights in {d}: expected {' or '.join(WEIGHT_FILES)} or a sharded "
                              f"*{INDEX_SUFFIX}.{_pickle_hint(d)}")
    with _reading(single) as f:
        return {k: single for k in f.keys()}

def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A whole safetensors file on the CPU (a training checkpoint's optimizer state)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p} not found: the checkpoint is incomplete")
    with _reading(p) as f:
        return {k: _read_tensor(f, p, k) for k in f.keys()}

def read_text(path: str | os.PathLike, what: str, error: type[Exception] = DataError) -> str:
    """The one reader of text files: UTF-8 (a leading byte-order mark is dropped). A file that cannot be read
    or is not UTF-8 raises `error` (DataError by default; CheckpointError for configs) naming it."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{what} {p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): save it "
                    "as UTF-8") from e
    except OSError as e:
        raise error(f"{what} {p} cannot be read ({e.strerror or e})") from e

def read_config(ckpt_dir: str | os.PathLike, name: str = "config.json") -> dict:
    """A JSON object file of a checkpoint folder (config.json, an index, a run's settings). A missing,
    non-UTF-8, empty or non-JSON file, or one that holds no object, is one CheckpointError naming it; read
    its fields with `config_field`."""
    path = Path(ckpt_dir) / name
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the checkpoint folder needs its {name}")
    text = read_text(path, "config", CheckpointError)
    if not text.strip():
        raise CheckpointError(f"{path} is empty: it must hold a JSON object; download or write it again")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): download or write it "
                              "again") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object {{...}}, not {_json_type(raw)}")
    return raw

def _json_type(v) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)

REQUIRED = object()     # `config_field`'s default for a field the file must have
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object",
          list: "a list of integers"}

def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

def _is_kind(v, kind: type) -> bool:
    """Whether v is a `config_field` of `kind`: a bool is no number, a number must be finite, a list is a
    non-empty list of integers."""
    if kind is int:
        return _whole(v)
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind is list:
        return isinstance(v, list) and bool(v) and all(_whole(i) for i in v)
    return isinstance(v, kind)

def config_field(raw: Mapping, key: str, kind: type, where, default=REQUIRED, low=None, high=None, section=""):
    """The one typed reader of config fields: raw[key] as `kind` (int, float, bool, str, dict, or list = a list
    of integers), within [low, high] (a list's items; None: unbounded), or `default` when the field is absent
    or null (the Hugging Face way of saying "the default"). Anything else is one CheckpointError naming the
    file `where`, the field (`section` + key), the expected type and range, and what the file holds."""
    name, v = f"{section}{key}", raw.get(key)
    want = _KINDS[kind] + ("" if low is None and high is None else
                           f" in [{'-inf' if low is None else low}, {'inf' if high is None else high}]")
    if v is None:
        if default is REQUIRED:
            raise CheckpointError(f"{where}: field {name!r} is {'null' if key in raw else 'missing'}; it must be "
                                  f"{want}")
        return default
    values = v if kind is list else [v] if kind in (int, float) else []
    ok = _is_kind(v, kind) and all((low is None or x >= low) and (high is None or x <= high) for x in values)
    if not ok:
        raise CheckpointError(f"{where}: field {name!r} must be {want}, not {_json_type(v)} {json.dumps(v)[:60]}: "
                              "fix the file or download it again")
    return float(v) if kind is float else v

def _mismatch_report(what: str, ckpt_dir, missing, unexpected, mismatched) -> str:
    parts = [f"{what} in {ckpt_dir} does not match the model built from its config:"]
    for name, keys, sep in (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
                            ("shape mismatches", mismatched, "; ")):
        if keys:
            parts.append(f"  {name} ({len(keys)}): {sep.join(keys[:20])}" + (" ..." if len(keys) > 20 else ""))
    parts.append("  Check that config.json belongs to these weights and that the folder is the right model.")
    return "\n".join(parts)

def load_state(model: nn.Module, ckpt_dir: str | os.PathLike, key_map: Mapping[str, str], *,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               row_limit: Mapping[str, int] | None = None, what: str = "checkpoint") -> nn.Module:
    """Load `ckpt_dir` into `model`, built on the meta device, through `key_map` (checkpoint key ->
    state-dict name): shapes are checked from the file headers first (one message lists every missing,
    unexpected and mis-shaped key), then each tensor is read once, cast to `dtype` if floating, placed on
    `device` and handed to `load_state_dict(strict=True, assign=True)`, so weights are never held twice.
    `row_limit[key] = n` keeps the first n rows of a tensor (a vocabulary truncated to its tokenizer)."""
    files, limit = find_weight_files(ckpt_dir), row_limit or {}
    want = model.state_dict()
    by_file: dict[Path, list[str]] = {}
    for k in key_map:
        if k in files:
            by_file.setdefault(files[k], []).append(k)
    mismatched = []
    for path, keys in by_file.items():
        with _reading(path) as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in keys}
        for k, shape in shapes.items():
            if k in limit and shape and shape[0] >= limit[k]:
                shape[0] = limit[k]
            if shape != list(want[key_map[k]].shape):
                mismatched.append(f"{k}: checkpoint {shape} vs model {list(want[key_map[k]].shape)}")
    missing, unexpected = sorted(k for k in key_map if k not in files), sorted(k for k in files if k not in key_map)
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_report(what, ckpt_dir, missing, unexpected, mismatched))
    state = {}
    for path, keys in by_file.items():
        with _reading(path) as f:
            for k in keys:
                t = _read_tensor(f, path, k)[: limit.get(k)]
                # outside the file's error handling: a device or memory error here is not about the file
                state[key_map[k]] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model

# ---- tokenizers (the `tokenizers` library reading a Hugging Face tokenizer.json) -------------------------

def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A `tokenizer.json` (the file, or a folder that holds one)."""
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise CheckpointError(f"{f} not found: the tokenizer folder needs a tokenizer.json "
                              "(download it with the model, e.g. `hf download microsoft/phi-1_5 tokenizer.json`)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f} is not a tokenizers JSON file ({e})") from e

def train_tiny_bpe(corpus: Iterable[str], vocab_size: int, *, qwen_style: bool = False) -> Tokenizer:
    """A deterministic byte-level BPE tokenizer trained on `corpus` (for the built-in tiny checkpoints): GPT-2 /
    CodeGen style like phi-1.5's, or with Qwen2's NFC normaliser. Each model adds its special tokens itself."""
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
    """Text the tiny tokenizers are trained on: GenEval-style prompts plus the verifier questions' words."""
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

# ---- images ----------------------------------------------------------------------------------------------

def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1,1] -> [B,H,W,3] uint8, truncating as Show-o's inference script does."""
    x = torch.clamp((x.detach().float() + 1.0) / 2.0, 0.0, 1.0) * 255.0
    return x.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)

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

GREY = (127, 127, 127)      # what transparent pixels become: the grey LLaVA's expand2square pads with

def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, by scaling, never clipping: 16- and 32-bit integer modes (I;16, I) are scaled
    from their full range (a 16-bit PNG would otherwise turn white), float mode F from [0, 1] (or its own
    maximum when larger), a palette through its colours, LA/RGBA/PA composited on GREY, CMYK by PIL's
    conversion."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        x = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            top = 1.0 if x.max() <= 1.0 else max(255.0, float(x.max()))
        else:           # I;16 is 16-bit by definition; I (32-bit) holds 16-bit PNGs, or 8-bit values
            top = 65535.0 if im.mode.startswith("I;16") or x.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.round(x / top * 255.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        canvas = Image.new("RGB", im.size, GREY)
        canvas.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return canvas
    return im.convert("RGB") if im.mode != "RGB" else im

def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB (`to_rgb`), with one clear error if it is missing, cannot be decoded, or
    is larger than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.load()
                return to_rgb(im).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image {p} is too large to open safely ({e}): resize it below "
                         f"{Image.MAX_IMAGE_PIXELS} pixels") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {p} cannot be decoded ({e}): is it a truncated or non-image file?") from e

# ---- records: the one reader of JSON-list and JSONL data files -------------------------------------------

def read_records(path: str | os.PathLike, what: str, expected: str, form: str = "lines",
                 hint: str = "") -> tuple[list[tuple[int, str, dict]], list[str]]:
    """The JSON objects of a data file as (N, where, record) with `where` = "FILE line N" (form "lines", JSONL)
    or "FILE record N (id 'X')" (form "list", one JSON list; form "auto": by the .jsonl suffix), and one
    "where: why" problem per entry that is not an object, so a caller can stop with all of them at once or
    skip them. A missing, empty or unparsable file raises DataError naming `what` and the `expected` record."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} not found{hint}")
    text = read_text(p, what)
    if not text.strip():
        need = "one JSON record per line" if form == "lines" else "a JSON list of records"
        raise DataError(f"{what} {p} is empty: it needs {need}, {expected}")
    lines = form == "lines" or (form == "auto" and p.suffix == ".jsonl")
    entries, problems = [], []
    if lines:
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((i, f"{p} line {i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    problems.append(f"{p} line {i}: not valid JSON ({e.msg})")
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{what} {p} is not valid JSON ({e.msg} at line {e.lineno}): it must be one JSON list "
                            f"of records {expected}") from e
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{what} {p} must hold a non-empty JSON list of records {expected}, not "
                            f"{'an empty list' if raw == [] else type(raw).__name__}")
        for i, rec in enumerate(raw, 1):
            rid = rec.get("id") if isinstance(rec, dict) else None
            entries.append((i, f"{p} record {i}" + (f" (id {rid!r})" if rid not in (None, "") else ""), rec))
    records = []
    for i, where, rec in entries:
        if isinstance(rec, dict):
            records.append((i, where, rec))
        else:
            problems.append(f"{where}: a record must be a JSON object")
    return records, problems

def _text(rec: dict, key: str) -> str | None:
    v = rec.get(key)
    return v if isinstance(v, str) and v.strip() else None

def _image_problem(rec: dict, key: str) -> str | None:
    """Why rec[key] is not an image path or a list of image tokens (None when it is fine)."""
    v = rec.get(key)
    if v is None:
        return f"no {key!r} field"
    if isinstance(v, str):
        return None if v.strip() else f"{key!r} is an empty path"
    if isinstance(v, list):
        if not v:
            return f"{key!r} is an empty token list"
        if not all(_whole(t) for t in v):
            return f"{key!r} is a list but not of integer image tokens"
        return None
    return f"{key!r} must be an image path or a list of image tokens, not {type(v).__name__}"

def _problems(rec: dict, texts: Sequence[str], images: Sequence[str] = ()) -> list[str]:
    """What is wrong with rec: each field of `texts` without text, then each of `images` without an image."""
    why = [f"no {k!r} text" for k in texts if _text(rec, k) is None]
    return why + [w for w in (_image_problem(rec, k) for k in images) if w]

def read_prompts(path: str | os.PathLike) -> list[str]:
    """A prompt file: one prompt per line (GenEval's generation_prompts.txt format); blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file {p} not found")
    prompts = [line.strip() for line in read_text(p, "prompt file").splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompt file {p} holds no prompts: write one prompt per line")
    return prompts

@dataclass
class PairRecord:
    """One line of a preference file (Sec. 3.3): `chosen`/`rejected` are image paths or image-token lists."""
    line: int
    prompt: str
    chosen: str | list
    rejected: str | list
    extra: dict

def read_pair_records(path: str | os.PathLike) -> tuple[list[PairRecord], list[str]]:
    """A JSONL preference file of {"prompt", "chosen", "rejected"} (other fields kept in `extra`). Returns
    (good records, one "FILE line N: why" per bad line)."""
    records, problems = read_records(path, "preference file", '{"prompt": ..., "chosen": IMAGE, "rejected": IMAGE}')
    good = []
    for i, where, rec in records:
        why = _problems(rec, ["prompt"], ["chosen", "rejected"])
        if not why and rec["chosen"] == rec["rejected"]:
            why.append("'chosen' and 'rejected' are the same image")
        if why:
            problems.append(f"{where}: {'; '.join(why)}")
            continue
        extra = {k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected")}
        good.append(PairRecord(i, rec["prompt"], rec["chosen"], rec["rejected"], extra))
    return good, problems

# ---- self-correction data (PARM++, Sec. 5): reflect.json records, and (prompt, low, reason, high) groups ----

@dataclass
class ReflectRecord:
    """One record of reflect.json (`train.py curate --task reflect`): an image judged against its prompt, "yes"
    (it passes) or "no" with the reason it fails. `image` is resolved to a path that exists, if any."""
    where: str          # how messages name it: "FILE record N (id 'X')"
    id: str
    image: Path
    prompt: str
    label: str
    reason: str | None

@dataclass
class CorrectionRecord:
    """One self-correction group (Sec. 5): the prompt, the low-quality image, the reflection reason and the
    high-quality image (paths or token lists); `low_from`/`high_from` name the record each image came from."""
    prompt: str
    reason: str
    low: str | list
    high: str | list
    low_from: str
    high_from: str

def read_reflect_records(path: str | os.PathLike) -> tuple[list[ReflectRecord], list[str]]:
    """reflect.json: a JSON list of {"id", "image", "prompt", "label": "yes"|"no", "reason"}; a "no" needs its
    reason. Images are relative to the file's folder (a bare name is also looked up under `images/`)."""
    p = Path(path)
    records, problems = read_records(p, "reflection file", '{"id", "image", "prompt", "label", "reason"}', "list",
                                     hint=": it is written by `train.py curate --task reflect`")
    good = []
    for _, where, rec in records:
        why = _problems(rec, ["id", "image", "prompt"])
        label = rec.get("label")
        if label not in ("yes", "no"):
            why.append(f"unknown label {label!r} (use \"yes\" or \"no\")")
        elif label == "no" and _text(rec, "reason") is None:
            why.append('a "no" record needs its "reason" (the reflection text the self-correction learns from)')
        if why:
            problems.append(f"{where}: {'; '.join(why)}")
            continue
        image = p.parent / rec["image"]
        if not image.exists() and (p.parent / "images" / rec["image"]).exists():
            image = p.parent / "images" / rec["image"]
        reason = rec.get("reason") if label == "no" else None
        good.append(ReflectRecord(where, rec["id"], image, rec["prompt"], label, reason))
    return good, problems

def correction_groups(records: Iterable[ReflectRecord]) -> tuple[list[CorrectionRecord], list[str]]:
    """Sec. 5, self-correction groups from the PARM++ ranking data: for each prompt, the k-th "no" image with its
    reason is paired with the (k mod Y)-th "yes" image of the same prompt, in file order (deterministic, and it
    spreads the "no" images over the "yes" ones). Returns (groups, prompts skipped for lack of a yes or a no)."""
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
    """Explicit self-correction groups, JSONL {"prompt", "low", "reason", "high"} (images: paths or token lists)."""
    records, problems = read_records(path, "self-correction file",
                                     '{"prompt": ..., "low": IMAGE, "reason": ..., "high": IMAGE}')
    good = []
    for _, where, rec in records:
        why = _problems(rec, ["prompt", "reason"], ["low", "high"])
        if why:
            problems.append(f"{where}: {'; '.join(why)}")
            continue
        side = lambda s: f"{where}: {s!r}" if isinstance(rec[s], list) else f"{where}: {s}"  # noqa: E731
        good.append(CorrectionRecord(rec["prompt"], rec["reason"], rec["low"], rec["high"], side("low"), side("high")))
    return good, problems

def read_reasons(path: str | os.PathLike) -> dict[str, str]:
    """A reasons file for PARM++'s reflection data: JSONL {"id" or "image", "reason"} (e.g. written by a
    stronger model). Returns {id or image: reason}; a bad line raises DataError naming it."""
    records, problems = read_records(path, "reasons file", '{"id" or "image": ..., "reason": "..."}')
    for _, where, rec in records:
        key, reason = rec.get("id", rec.get("image")), rec.get("reason")
        if not isinstance(key, str) or not isinstance(reason, str) or not reason.strip():
            problems.append(f'{where}: each line must be {{"id" or "image": ..., "reason": "..."}} with a '
                            "non-empty reason")
    if problems:
        raise DataError(problems[0])
    return {rec.get("id", rec.get("image")): rec["reason"].strip() for _, _, rec in records}

# ---- verifier training data (Sec. 3.2, 4, 5): LLaVA conversation records ---------------------------------

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
    """LLaVA training data as `train.py curate` writes it: a JSON list (or .jsonl) of {"id", "image",
    "conversations"}. Images are relative to `image_root` (default: the file's folder) and must exist."""
    p = Path(path)
    root = Path(image_root) if image_root is not None else p.parent
    records, problems = read_records(p, "training data", '{"id", "image", "conversations"}', "auto",
                                     hint=": make it with `train.py curate`")
    good = []
    for i, where, rec in records:
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
        rid = rec.get("id")
        good.append(Conversation(where, str(rid if rid is not None else i), root / image,
                                 [t["value"] for t in rec["conversations"]]))
    return good, problems

# ---- prompts: the one generator, GenEval's six templates in GenEval's wording (prompts/create_prompts.py)

PROMPT_TEMPLATES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_OBJECTS = ("person", "bicycle", "car", "bus", "bench", "bird", "cat", "dog", "horse", "sheep", "giraffe",
                   "umbrella", "suitcase", "bottle", "cup", "bowl", "banana", "apple", "pizza", "chair", "couch",
                   "clock", "vase", "teddy bear")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = ("two", "three", "four")     # GenEval counts 2..4

def with_article(word: str) -> str:
    """GenEval's article rule: "an" before a vowel letter, else "a" (a spelling test: "an orange", "a umbrella"
    would be wrong, "an umbrella" is what it writes)."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"

def plural(word: str) -> str:
    """GenEval's plural rule: "es" after a final s, else "s" (so "buses", but also "benchs" and "sheeps")."""
    return word + ("es" if word.endswith("s") else "s")

def prompt_key(prompt: str) -> str:
    """What two prompts must share to count as the same one: case, spacing and a final period are ignored."""
    return " ".join(prompt.lower().split()).rstrip(".")

def _item(cls: str, count: int = 1, color: str | None = None, position=None) -> dict:
    item = {"class": cls, "count": count}
    if color is not None:
        item["color"] = color
    if position is not None:
        item["position"] = list(position)
    return item

def make_spec(tag: str, classes: Sequence[str], colors: Sequence[str] = (), count: int = 1,
              relation: str | None = None) -> dict:
    """A spec in GenEval's metadata form (GenEval's evaluation_metadata.jsonl): keys tag, include, exclude (counting
    only), prompt.  `classes` are in prompt order; for position the FIRST-named class is the placed one, and GenEval
    lists the reference (second-named) first in `include`, the placed one second with "position": [relation, 0]."""
    if tag == "single_object":
        include = [_item(classes[0])]
    elif tag == "two_object":
        include = [_item(classes[0]), _item(classes[1])]
    elif tag == "counting":
        include = [_item(classes[0], count)]
    elif tag == "colors":
        include = [_item(classes[0], color=colors[0])]
    elif tag == "position":
        include = [_item(classes[1]), _item(classes[0], position=(relation, 0))]
    elif tag == "color_attr":
        include = [_item(classes[0], color=colors[0]), _item(classes[1], color=colors[1])]
    else:
        raise ValueError(f"unknown GenEval tag {tag!r}: use one of {', '.join(PROMPT_TEMPLATES)}")
    spec = {"tag": tag, "include": include}
    if tag == "counting":
        spec["exclude"] = [_item(classes[0], count + 1)]
    spec["prompt"] = prompt_of(spec)
    return spec

def prompt_of(spec: dict) -> str:
    """GenEval's wording (GenEval's prompts/create_prompts.py): "a photo of " + the template, articles and plurals
    by GenEval's naive rules (data.with_article / data.plural), counts as words, relations as bare "left of" etc."""
    tag, inc = spec["tag"], spec["include"]
    if tag == "single_object":
        return f"a photo of {with_article(inc[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {with_article(inc[0]['class'])} and {with_article(inc[1]['class'])}"
    if tag == "counting":
        return f"a photo of {COUNT_WORDS[inc[0]['count'] - 2]} {plural(inc[0]['class'])}"
    if tag == "colors":
        return f"a photo of {with_article(inc[0]['color'])} {inc[0]['class']}"
    if tag == "position":
        placed, ref = inc[1], inc[0]
        return f"a photo of {with_article(placed['class'])} {placed['position'][0]} {with_article(ref['class'])}"
    a, b = inc
    return f"a photo of {with_article(a['color'])} {a['class']} and {with_article(b['color'])} {b['class']}"

def _distinct_pair(i: int, k: int) -> tuple[int, int]:
    """The i-th ordered pair (a, b), a != b, of range(k): a bijection of range(k * (k - 1))."""
    a, b = divmod(i, k - 1)
    return a, b + (b >= a)

def _template_size(tag: str, objects, colourable, colors) -> int:
    k, p, m = len(objects), len(colourable), len(colors)
    return {"single_object": k, "two_object": k * (k - 1), "counting": k * len(COUNT_WORDS), "colors": p * m,
            "position": k * (k - 1) * len(GENEVAL_RELATIONS), "color_attr": p * (p - 1) * m * (m - 1)}[tag]

def template_prompt(tag: str, i: int, objects, colourable, colors) -> str:
    """Prompt number i of one template (mixed-radix decoding of i; every i gives a different prompt)."""
    O, P, C = objects, colourable, colors
    if tag == "single_object":
        return make_spec(tag, [O[i]])["prompt"]
    if tag == "counting":
        o, n = divmod(i, len(COUNT_WORDS))
        return make_spec(tag, [O[o]], count=n + 2)["prompt"]
    if tag == "colors":
        o, c = divmod(i, len(C))
        return make_spec(tag, [P[o]], [C[c]])["prompt"]
    radix = {"two_object": 1, "position": len(GENEVAL_RELATIONS), "color_attr": len(C) * (len(C) - 1)}[tag]
    pair, rest = divmod(i, radix)
    a, b = _distinct_pair(pair, len(P if tag == "color_attr" else O))
    if tag == "two_object":
        return make_spec(tag, [O[a], O[b]])["prompt"]
    if tag == "position":
        return make_spec(tag, [O[a], O[b]], relation=GENEVAL_RELATIONS[rest])["prompt"]
    ca, cb = _distinct_pair(rest, len(C))
    return make_spec(tag, [P[a], P[b]], [C[ca], C[cb]])["prompt"]

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
    """Sec. 3.2, the ranking data's prompts (and every other prompt list this project makes): GenEval's six
    object-centred templates over an object and a colour list, in GenEval's wording (articles, plurals, counts
    2-4, no coloured "person", two different colours in an attribution).

    Each template's prompts are taken in a seeded random order and the templates take turns, so any prefix
    mixes all six and the same arguments always give the same list; a template that runs out leaves the turn
    to the others. Prompts equal to one of `exclude` (the test prompts; `prompt_key`) are skipped. n=None
    gives every prompt; an n larger than that raises DataError."""
    objects, colors = _name_list(objects, "object"), _name_list(colors, "colour")
    colourable = [o for o in objects if o != "person"]
    skip = {prompt_key(p) for p in exclude}
    rng = np.random.default_rng(seed)
    orders = {tag: iter(rng.permutation(_template_size(tag, objects, colourable, colors)))
              for tag in PROMPT_TEMPLATES}
    out: list[str] = []
    while orders and (n is None or len(out) < n):
        for tag, order in list(orders.items()):     # a turn: the next kept prompt of each template
            for i in order:
                prompt = template_prompt(tag, int(i), objects, colourable, colors)
                if prompt_key(prompt) not in skip:
                    out.append(prompt)
                    break
            else:
                del orders[tag]                     # it ran out
            if n is not None and len(out) == n:
                break
    if n is not None and len(out) < n:
        raise DataError(f"asked for {n} prompts, but the templates give only {len(out)} over {len(objects)} objects "
                        f"and {len(colors)} colours (after excluding the test prompts): ask for fewer, or give "
                        "longer --objects / --colors lists")
    return out

# ---- the shapes world: a GenEval you can train on a laptop -----------------------------------------------

# A scene is 1-4 objects on a GRID x GRID cell grid; an object is a shape class drawn at cell resolution in one of
# GenEval's ten colours, on a grey background no object uses; an image is the grid upsampled to CELL_PX pixels
# per cell. The grid is a SLOTS x SLOTS lattice of SLOT x SLOT-cell slots and every object sits in its own slot,
# so objects never touch in a ground-truth scene. Prompts and specs follow GenEval's six templates, wording and
# metadata; the evaluator reads pixels only (colour snapping, connected components, template matching) and
# applies GenEval's rules; QuadrantCodec is the image tokenizer, one code per quarter of a slot, with MAGVIT-v2's
# interface.

SLOT = 5           # cells per slot side: a shape of at most 4x4 cells and a free row and column
SLOTS = 3          # slots per side: 9 image tokens
GRID = SLOT * SLOTS  # cells per side: 15
CELL_PX = 8        # pixels per cell: 120 x 120 images

BACKGROUND = "background"
# code 0 = background, codes 1..10 = GenEval's colours in GenEval's order (GenEval's prompts/create_prompts.py)
PALETTE_NAMES = (BACKGROUND,) + GENEVAL_COLORS
PALETTE = np.array([
    (150, 150, 150),   # background: a mid grey, far from black and white
    (220, 40, 40),     # red
    (245, 140, 20),    # orange
    (245, 225, 40),    # yellow
    (40, 170, 60),     # green
    (40, 80, 220),     # blue
    (140, 50, 180),    # purple
    (250, 150, 200),   # pink
    (125, 75, 30),     # brown
    (20, 20, 20),      # black
    (250, 250, 250),   # white
], dtype=np.uint8)

def _template(rows: Sequence[str]) -> np.ndarray:
    return np.array([[ch == "#" for ch in r] for r in rows], dtype=bool)

# Seven shapes, each at most 4x4 cells (so one fits a slot with a free row and column); pairwise template
# IoU at its best shift is at most 0.75 (test_shapes checks it), and every shape is one 8-connected piece
SHAPES = {
    "square": _template(["###", "###", "###"]),
    "circle": _template([".##.", "####", "####", ".##."]),            # a 4x4 square with the corners cut
    "triangle": _template(["#...", "##..", "###.", "####"]),
    "cross": _template([".#.", "###", ".#."]),
    "bar": _template(["####"]),
    "ring": _template(["####", "#..#", "#..#", "####"]),
    "arch": _template(["####", "#..#", "#..#"]),
}
SHAPE_NAMES = tuple(SHAPES)

@dataclass(frozen=True)
class Obj:
    """One object: a shape in a colour with its top-left cell at (row, col)."""
    shape: str
    color: str
    row: int
    col: int

    def box(self) -> tuple[int, int, int, int]:
        """Cell box (r0, c0, r1, c1), end exclusive."""
        h, w = SHAPES[self.shape].shape
        return self.row, self.col, self.row + h, self.col + w

    @property
    def slot(self) -> int:
        """The slot (raster order) holding the object's top-left cell."""
        return (self.row // SLOT) * SLOTS + self.col // SLOT

def paint(objects: Iterable[Obj], grid: int = GRID) -> np.ndarray:
    """Objects -> the [grid, grid] map of palette codes (0 = background)."""
    cells = np.zeros((grid, grid), dtype=np.int64)
    for o in objects:
        r0, c0, r1, c1 = o.box()
        cells[r0:r1, c0:c1][SHAPES[o.shape]] = PALETTE_NAMES.index(o.color)
    return cells

def cells_to_image(cells: np.ndarray, cell_px: int = CELL_PX) -> np.ndarray:
    """[G, G] codes -> [G*px, G*px, 3] uint8: every cell a px x px block of its palette colour."""
    return np.repeat(np.repeat(PALETTE[cells], cell_px, axis=0), cell_px, axis=1)

def render(objects: Iterable[Obj], grid: int = GRID, cell_px: int = CELL_PX) -> np.ndarray:
    return cells_to_image(paint(objects, grid), cell_px)

# The world's static clarity rule (train.clarity_label, Sec. 4), read off its baseline generator's curve of clear
# step images as the paper read Show-o's: "no" before step A, "yes" after step B (README: the paper in miniature)
WORLD_CLARITY = (9, 10)

# ---- the shapes world: prompts, specs, evaluation and training sets, scene sampling ----------------------

# GenEval's prompt counts per tag (GenEval's prompts/create_prompts.py), which `eval_specs` scales
GENEVAL_COUNTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                  "color_attr": 100}

def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))

def parse_prompt(prompt: str, shapes: Sequence[str] = SHAPE_NAMES) -> dict:
    """The spec of a prompt written in GenEval's wording (the inverse of `prompt_of`); ValueError otherwise."""
    s, c = _alternation(shapes), _alternation(GENEVAL_COLORS)
    o, r, n = f"an? ({s})", _alternation(GENEVAL_RELATIONS), _alternation(COUNT_WORDS)
    body = prompt.removeprefix("a photo of ")
    forms = [("color_attr", rf"an? ({c}) ({s}) and an? ({c}) ({s})"), ("colors", rf"an? ({c}) ({s})"),
             ("position", rf"{o} ({r}) {o}"), ("two_object", rf"{o} and {o}"), ("single_object", o),
             ("counting", rf"({n}) (\S.*)")]
    for tag, pattern in forms:
        m = re.fullmatch(pattern, body)
        if not m:
            continue
        g = m.groups()
        if tag == "counting":
            cls = next((x for x in shapes if plural(x) == g[1]), None)
            spec = make_spec(tag, [cls], count=COUNT_WORDS.index(g[0]) + 2) if cls else None
        elif tag == "color_attr":
            spec = make_spec(tag, [g[1], g[3]], [g[0], g[2]])
        elif tag == "colors":
            spec = make_spec(tag, [g[1]], [g[0]])
        elif tag == "position":
            spec = make_spec(tag, [g[0], g[2]], relation=g[1])
        else:
            spec = make_spec(tag, list(g))
        if spec is not None and spec["prompt"] == prompt:
            return spec
    raise ValueError(f"{prompt!r} is not a GenEval-style prompt over the shapes {', '.join(shapes)}")

def _one_of(pool: Sequence, rng: np.random.Generator):
    """One item of `pool`, uniformly (one draw of rng.integers)."""
    return pool[int(rng.integers(len(pool)))]

def _random_spec(tag: str, rng: np.random.Generator, shapes: Sequence[str]) -> dict:
    pick = lambda k, pool: [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
    if tag == "counting":
        return make_spec(tag, pick(1, shapes), count=int(rng.integers(2, 5)))
    if tag == "colors":
        return make_spec(tag, pick(1, shapes), pick(1, GENEVAL_COLORS))
    if tag == "position":
        return make_spec(tag, pick(2, shapes), relation=_one_of(GENEVAL_RELATIONS, rng))
    if tag == "color_attr":
        return make_spec(tag, pick(2, shapes), pick(2, GENEVAL_COLORS))
    return make_spec(tag, pick(2, shapes))

EVAL_IMAGES = 784    # images per evaluation: 4x GenEval's 196 at the world's scale, so paired differences of 0.02-0.05
                     # between rows can be told apart (README: the paper in miniature)

def eval_specs(seed: int = 43, shapes: Sequence[str] = SHAPE_NAMES) -> list[dict]:
    """The held-out evaluation prompts, each with its number of images ("images"), in GenEval's proportions
    (GenEval's prompts/create_prompts.py): each tag gets its share of EVAL_IMAGES (GenEval's count of the tag /
    553). single_object is every class once; every other tag gets the prompts its share needs at 4 images each,
    but at most a third of the tag's distinct prompts (the rest stay for training), drawn at random (duplicates
    redrawn); a tag's images are spread evenly over its prompts (rounded up). With 7 shapes: 7 / 14 / 7 / 23 /
    36 / 36 = 123 prompts, 818 images; counting and single_object hold 17 images per prompt."""
    rng = np.random.default_rng(seed)
    share = lambda tag: EVAL_IMAGES * GENEVAL_COUNTS[tag] / sum(GENEVAL_COUNTS.values())  # noqa: E731
    with_images = lambda specs, tag: [{**sp, "images": math.ceil(share(tag) / len(specs))} for sp in specs]  # noqa
    out = with_images([make_spec("single_object", [shapes[i]]) for i in rng.permutation(len(shapes))],
                      "single_object")
    for tag in PROMPT_TEMPLATES[1:]:
        want = min(math.ceil(share(tag) / 4), _template_size(tag, shapes, shapes, GENEVAL_COLORS) // 3)
        specs, seen = [], set()
        while len(specs) < want:
            spec = _random_spec(tag, rng, shapes)
            if spec["prompt"] not in seen:
                seen.add(spec["prompt"])
                specs.append(spec)
        out += with_images(specs, tag)
    return out

def train_specs(exclude: Iterable[dict], shapes: Sequence[str] = SHAPE_NAMES) -> list[dict]:
    """Every GenEval-style prompt over the shapes except the evaluation prompts, with their specs. The wording
    comes from the project's one prompt generator (data.training_prompts), which drops the excluded prompts."""
    prompts = training_prompts(None, objects=list(shapes), exclude=[s["prompt"] for s in exclude])
    return [parse_prompt(p, shapes) for p in prompts]

def scene_objects(spec: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """The (shape, colour) of every object a correct image of `spec` shows: the named objects only, in the
    named colour or a random one; for position the placed object comes first."""
    inc = spec["include"]
    if spec["tag"] == "position":
        inc = [inc[1], inc[0]]
    return [(item["class"], item.get("color") or _one_of(GENEVAL_COLORS, rng))
            for item in inc for _ in range(item["count"])]

def in_slot(shape: str, color: str, slot: int) -> Obj:
    """The object drawn in slot `slot` (raster order): its shape centred in the slot's top-left 4x4 cells, so the
    slot's last row and column stay free and objects in neighbouring slots never touch."""
    h, w = SHAPES[shape].shape
    r, c = divmod(slot, SLOTS)
    return Obj(shape, color, r * SLOT + (SLOT - 1 - h) // 2, c * SLOT + (SLOT - 1 - w) // 2)

def place(items: Sequence[tuple[str, str]], rng: np.random.Generator) -> list[Obj]:
    """Random placement: every object in its own slot, the slots drawn without replacement."""
    slots = rng.choice(SLOTS * SLOTS, size=len(items), replace=False)
    return [in_slot(shape, color, int(s)) for (shape, color), s in zip(items, slots)]

def sample_scene(spec: dict, rng: np.random.Generator) -> list[Obj]:
    """A random correct scene for `spec`: its objects placed at random until the evaluator accepts the image.
    Only a position scene can be rejected (its relation may not hold): objects are exact templates, one per slot,
    with a free row and column between slots, so the others are right as placed and are not judged (test_shapes
    judges them). The cell map is judged directly: rendering then snapping gives the same cells (test_shapes)."""
    for _ in range(1000):
        objs = place(scene_objects(spec, rng), rng)
        if spec["tag"] != "position" or judge_cells(paint(objs), spec)[0]:
            return objs
    raise RuntimeError(f"no scene found for {spec['prompt']!r}")

def specs_by_tag(specs: Iterable[dict]) -> dict[str, list[dict]]:
    """The specs grouped by their GenEval tag, each group in the given order."""
    by_tag: dict[str, list[dict]] = {}
    for spec in specs:
        by_tag.setdefault(spec["tag"], []).append(spec)
    return by_tag

def draw_specs(specs: Sequence[dict], rng: np.random.Generator) -> Iterator[dict]:
    """An endless draw of specs: the template uniform over the tags present, then the prompt uniform within it
    (so the 3780 colour-attribution prompts do not swamp the 14 counting ones)."""
    by_tag = specs_by_tag(specs)
    tags = sorted(by_tag)
    while True:
        yield _one_of(by_tag[_one_of(tags, rng)], rng)

def world_prompts(n: int, seed: int) -> list[str]:
    """n of the world's training prompts (never its evaluation prompts), drawn as pretraining draws them: the
    prompts `train.py curate --world` and `dpo --world --geneval N` work on."""
    draw = draw_specs(train_specs(eval_specs()), np.random.default_rng(seed))
    return [spec["prompt"] for spec in itertools.islice(draw, n)]

def training_scenes(specs: Sequence[dict], n: int, seed: int, progress=None) -> tuple[list[str], torch.Tensor]:
    """The pretraining set: n (prompt, scene) examples, each a drawn spec (`draw_specs`) and a random correct scene
    of it (`sample_scene`). Returns the prompts and the scenes as codes [n, 36] (QuadrantCodec's). Deterministic
    in `seed`."""
    rng = np.random.default_rng(seed)
    prompts, cells = [], []
    for spec in itertools.islice(draw_specs(specs, rng), n):
        prompts.append(spec["prompt"])
        cells.append(paint(sample_scene(spec, rng)))
        if progress is not None:
            progress(len(cells))
    return prompts, torch.from_numpy(QuadrantCodec().encode_cells(np.stack(cells))).long()

def caption(objs: Iterable[Obj]) -> str:
    """What a scene shows, in the prompts' words: "a photo of a red circle and a blue square", objects in reading
    order (slot row by slot row, left to right). The world verifier learns to see by writing these."""
    ordered = sorted(objs, key=lambda o: (o.slot // SLOTS, o.col))
    return "a photo of " + " and ".join(f"{with_article(o.color)} {o.shape}" for o in ordered)

def near_miss(objs: Sequence[Obj], rng: np.random.Generator) -> list[Obj]:
    """One random edit of a scene, the kind of mistake a generator makes: an object recoloured, reshaped,
    dropped, added (half the time a copy of a present shape) or moved to a free slot."""
    items = [(o.shape, o.color, o.slot) for o in objs]
    free = sorted(set(range(SLOTS * SLOTS)) - {slot for _, _, slot in items})
    k, edit = int(rng.integers(len(items))), int(rng.integers(5))
    shape, color, slot = items[k]
    if edit == 0:
        items[k] = (shape, _one_of(GENEVAL_COLORS, rng), slot)
    elif edit == 1:
        items[k] = (_one_of(SHAPE_NAMES, rng), color, slot)
    elif edit == 2 and len(items) > 1:
        items.pop(k)
    elif edit == 3 and free:
        added = shape if rng.random() < 0.5 else _one_of(SHAPE_NAMES, rng)
        items.append((added, _one_of(GENEVAL_COLORS, rng), _one_of(free, rng)))
    elif free:
        items[k] = (shape, color, _one_of(free, rng))
    return [in_slot(sh, co, int(sl)) for sh, co, sl in items]

def verifier_scenes(n: int, seed: int) -> Iterator[tuple[np.ndarray, str, str, bool]]:
    """The world verifier's pretraining set, as LLaVA-OneVision is trained on captions and questions before the
    reward fine-tune: n painted scenes (no generator), each as (uint8 image, prompt, caption, does the evaluator
    accept the image for the prompt). The prompt is a training prompt drawn as pretraining draws them; the scene
    is a correct one half the time, a near miss of one a quarter, and a correct scene of another prompt of the
    same template otherwise, so "yes" and "no" are about equally common and only the image tells them apart."""
    rng = np.random.default_rng(seed)
    specs = train_specs(eval_specs())
    by_tag = specs_by_tag(specs)
    for spec in itertools.islice(draw_specs(specs, rng), n):
        r = rng.random()
        if r < 0.5:
            objs = sample_scene(spec, rng)
        elif r < 0.75:
            objs = near_miss(sample_scene(spec, rng), rng)
        else:
            objs = sample_scene(_one_of(by_tag[spec["tag"]], rng), rng)
        cells = paint(objs)
        yield cells_to_image(cells), spec["prompt"], caption(objs), judge_cells(cells, spec)[0]

# ---- the shapes world: the evaluator (pixels only) -------------------------------------------------------

DETECT_IOU = 0.6   # a component is an object when its best template IoU exceeds this (GenEval's 0.3 score cut)
COUNT_IOU = 0.9    # the stricter cut for the counting tag (GenEval's 0.9): with these sizes, an exact shape
POSITION_MARGIN = 0.1  # GenEval's position_threshold (GenEval's evaluation/evaluate_images.py)

@dataclass(frozen=True)
class Detection:
    """One object found in an image: its class, colour, score (template IoU), pixel box (x1, y1, x2, y2)."""
    shape: str
    color: str
    score: float
    box: tuple[float, float, float, float]
    cells: int

def snap_cells(image: np.ndarray, grid: int = GRID) -> np.ndarray:
    """[H, W, 3] uint8 -> [grid, grid] palette codes: every pixel snaps to the nearest palette colour, then
    every cell takes its most common code (ties to the lower code)."""
    h, w, _ = image.shape
    if h % grid or w % grid:
        raise ValueError(f"image {h}x{w} is not a whole number of cells on a {grid}x{grid} grid")
    d = ((image[:, :, None, :].astype(np.int32) - PALETTE[None, None].astype(np.int32)) ** 2).sum(-1)
    codes = d.argmin(-1)                                                          # [H, W]
    blocks = codes.reshape(grid, h // grid, grid, w // grid).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    votes = (blocks[..., None] == np.arange(len(PALETTE))).sum(2)                # [grid, grid, codes]
    return votes.argmax(-1)

def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean cell mask, each as a boolean mask, in raster order of first cell."""
    seen, out = np.zeros_like(mask), []
    for r, c in zip(*np.nonzero(mask)):
        if seen[r, c]:
            continue
        comp, stack = np.zeros_like(mask), [(r, c)]
        seen[r, c] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
        out.append(comp)
    return out

def best_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two cropped masks at their best relative shift (so one stray cell does not misalign them)."""
    (ha, wa), (hb, wb) = a.shape, b.shape
    canvas = np.zeros((ha + 2 * hb, wa + 2 * wb), dtype=bool)
    canvas[hb:hb + ha, wb:wb + wa] = a
    windows = np.lib.stride_tricks.sliding_window_view(canvas, b.shape)          # every shift of b over a
    best = int((windows & b).sum(axis=(2, 3)).max())
    n = int(a.sum() + b.sum())
    return best / (n - best)

def classify(comp: np.ndarray) -> tuple[str, float]:
    """The best-matching shape class of a component and its IoU (the stand-in for a detector's score)."""
    rows, cols = np.nonzero(comp)
    crop = comp[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return _classify_crop(crop.shape, crop.tobytes())

@functools.lru_cache(maxsize=1 << 16)
def _classify_crop(shape: tuple[int, int], cells: bytes) -> tuple[str, float]:
    # a pure function of the cropped mask, and a world's images repeat few of them (a painted scene's objects are
    # the templates themselves), so remembering it makes painting the pretraining scenes about 3x faster
    crop = np.frombuffer(cells, dtype=bool).reshape(shape)
    scores = {name: best_iou(crop, t) for name, t in SHAPES.items()}
    name = max(scores, key=scores.get)      # ties: the earlier class in SHAPES
    return name, scores[name]

def detect(cells: np.ndarray, threshold: float = DETECT_IOU, cell_px: float = CELL_PX) -> dict[str, list[Detection]]:
    """Per class, the objects of an image ranked like GenEval's detections (GenEval's
    evaluation/evaluate_images.py): score (template IoU) descending, then more cells, then raster order of the box.
    Each component gets its one best class (a stand-in for a detector, which GenEval filters per class: one blob
    never counts as two classes here); only scores strictly above `threshold` are kept. `cells` are snapped palette
    codes (`snap_cells`); boxes are in pixels, end exclusive."""
    found: dict[str, list[Detection]] = {}
    for code in np.unique(cells[cells > 0]):            # the colours present, in palette order
        for comp in components(cells == code):
            name, score = classify(comp)
            if score <= threshold:
                continue
            rows, cols = np.nonzero(comp)
            box = (cols.min() * cell_px, rows.min() * cell_px, (cols.max() + 1) * cell_px, (rows.max() + 1) * cell_px)
            found.setdefault(name, []).append(Detection(name, PALETTE_NAMES[code], score, box, int(comp.sum())))
    for dets in found.values():
        dets.sort(key=lambda d: (-d.score, -d.cells, d.box[1], d.box[0]))
    return found

def well_formed(cells: np.ndarray) -> bool:
    """Is every object of an image whole? Every one-colour 8-connected component of the snapped cell map matches
    a shape template with IoU >= COUNT_IOU (an exact shape at these sizes), and there is at least one. A step's
    x̂0 that mixes quadrants of different shapes or colours is not: the measure of a clear step image (Sec. 4)."""
    comps = [comp for code in range(1, len(PALETTE)) for comp in components(cells == code)]
    return bool(comps) and all(classify(comp)[1] >= COUNT_IOU for comp in comps)

def relations(a: Detection, b: Detection, margin: float = POSITION_MARGIN) -> list[str]:
    """GenEval's relative_position of placed object a to reference b (GenEval's evaluation/evaluate_images.py): box
    centres, per axis |d| shrunk by margin x (the two boxes' sizes on that axis summed), clamped at 0; no relation
    if both shrunk components are below 1e-3; else u = shrunk / |unshrunk| and left of u_x < -0.5, right of u_x >
    0.5, above u_y < -0.5, below u_y > 0.5 (y grows downward). Several may hold."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a.box, b.box
    d = np.array([(ax1 + ax2 - bx1 - bx2) / 2, (ay1 + ay2 - by1 - by2) / 2])
    size = np.array([(ax2 - ax1) + (bx2 - bx1), (ay2 - ay1) + (by2 - by1)])
    shrunk = np.sign(d) * np.maximum(np.abs(d) - margin * size, 0)
    if np.all(np.abs(shrunk) < 1e-3):
        return []
    u = shrunk / np.linalg.norm(d)
    tests = (("left of", u[0] < -0.5), ("right of", u[0] > 0.5), ("above", u[1] < -0.5), ("below", u[1] > 0.5))
    return [name for name, holds in tests if holds]

def _n_objects(n: int, cls: str) -> str:
    return f"no {cls}" if n == 0 else f"{n} {cls if n == 1 else plural(cls)}"

def _check_include(item: dict, found: dict, passed: list[bool], inc: list[dict]) -> str:
    """GenEval's include rule for one item (GenEval's evaluation/evaluate_images.py); returns "" when it holds, else
    the reason."""
    cls, n = item["class"], item["count"]
    dets = found.get(cls, [])
    if len(dets) < n:
        return f"no {cls}" if n == 1 else f"{_n_objects(len(dets), cls)} instead of {n}"
    color = item.get("color")
    if color is not None:
        wrong = [d.color for d in dets[:n] if d.color != color]
        if wrong:
            return f"the {cls} is {wrong[0]}, not {color}"
    if "position" in item:
        relation, ref = item["position"]
        if not passed[ref]:
            return ""       # the reference's own failure is already reported
        ref_cls = inc[ref]["class"]
        held = relations(dets[0], found[ref_cls][0])
        if relation not in held:
            if not held:
                return f"the {cls} is too close to the {ref_cls} to be {relation} it"
            return f"the {cls} is {' and '.join(held)} the {ref_cls}"
    return ""

def evaluate(image: np.ndarray, spec: dict, grid: int = GRID) -> tuple[bool, str]:
    """Judge an [H, W, 3] uint8 image against a GenEval spec from its pixels only (GenEval's
    evaluation/evaluate_images.py).  Every include item must hold: at least `count` detections of its class; with a
    colour, each of the top `count` detections has that colour (for colors / color_attr: the top-ranked instance,
    see `detect`); with a position, the top placed object vs the top reference object has the relation. An exclude
    item fails when there are at least `count` detections (so counting is exact N). The counting tag uses the
    stricter COUNT_IOU cut. Objects not named are ignored. Returns (correct, reason), reason "" when correct."""
    return judge_cells(snap_cells(image, grid), spec, image.shape[0] / grid)

def judge_prompt(image: np.ndarray, prompt: str) -> tuple[bool, str]:
    """`evaluate` against a prompt in GenEval's wording: the world's automatic labeller (curation, DPO pairs)."""
    return evaluate(image, parse_prompt(prompt))

def judge_cells(cells: np.ndarray, spec: dict, cell_px: float = CELL_PX) -> tuple[bool, str]:
    """`evaluate` after the pixels are snapped to cells (scene sampling uses it to skip the rendering)."""
    threshold = COUNT_IOU if spec["tag"] == "counting" else DETECT_IOU
    found = detect(cells, threshold, cell_px)
    inc, passed, reasons = spec["include"], [], []
    for item in inc:
        reason = _check_include(item, found, passed, inc)
        passed.append(not reason)
        if reason:
            reasons.append(reason)
    for item in spec.get("exclude", []):
        n = len(found.get(item["class"], []))
        if n >= item["count"]:
            reasons.append(f"{_n_objects(n, item['class'])} instead of {item['count'] - 1}")
    return not reasons, "; ".join(reasons)

# ---- the shapes world: GenEval's table -------------------------------------------------------------------

Z95 = 1.959963984540054

@dataclass(frozen=True)
class Score:
    """An accuracy with its 95% interval."""
    correct: float
    total: int
    accuracy: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.accuracy:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.total})"

def wilson(correct: int, total: int, z: float = Z95) -> Score:
    """Wilson score interval of a binomial proportion."""
    if total == 0:
        return Score(0, 0, float("nan"), 0.0, 1.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return Score(correct, total, p, max(0.0, centre - half), min(1.0, centre + half))

def geneval_table(results: Iterable[tuple[str, bool]]) -> dict[str, Score]:
    """GenEval's summary (GenEval's evaluation/summary_scores.py): per tag, correct images / images (Wilson 95%
    interval); "overall" = the unweighted mean of the six task accuracies, with a normal interval from the tasks'
    binomial variances (Agresti-Coull adjusted, so an all-correct task still has some width). Tags without images
    are left out of the table and of the mean."""
    counts: dict[str, list[int]] = {t: [0, 0] for t in PROMPT_TEMPLATES}
    for tag, ok in results:
        counts[tag][0] += bool(ok)
        counts[tag][1] += 1
    table = {t: wilson(c, n) for t, (c, n) in counts.items() if n}
    if table:
        k = len(table)
        mean = sum(s.accuracy for s in table.values()) / k
        var = sum((c + 2) / (n + 4) * (1 - (c + 2) / (n + 4)) / (n + 4) for c, n in counts.values() if n) / k ** 2
        half = Z95 * math.sqrt(var)
        total = sum(s.total for s in table.values())
        table["overall"] = Score(mean * total, total, mean, max(0.0, mean - half), min(1.0, mean + half))
    return table

def paired_difference(pairs: Sequence[tuple[Sequence[dict], Sequence[dict]]], draws: int = 4000, seed: int = 0,
                      ) -> tuple[float, float, float]:
    """How much row A's GenEval overall beats row B's, with a 95 % paired bootstrap interval: (difference, low,
    high). `pairs` holds one (A's results, B's results) per seed, each a list of image rows {"filename", "tag",
    "correct"} (sample.py's results.jsonl) over the same images, the same prompts in every seed. A draw resamples
    the evaluation prompts within each tag (a prompt with all its images, the same prompts for every seed), scores
    both rows GenEval's way (per tag the share of correct images, overall their unweighted mean) and takes the mean
    over seeds of A - B."""
    rng = np.random.default_rng(seed)
    diffs = []                      # per seed: {tag: (A's correct per prompt - B's, images per prompt)}
    for a, b in pairs:
        by_name = {r["filename"]: r for r in b}
        if set(by_name) != {r["filename"] for r in a}:
            raise ValueError("the two rows were not evaluated on the same images: a paired difference needs them")
        per_tag: dict[str, dict[str, list[int]]] = {}
        for r in a:
            cell = per_tag.setdefault(r["tag"], {}).setdefault(r["filename"].split("/")[0], [0, 0])
            cell[0] += int(r["correct"]) - int(by_name[r["filename"]]["correct"])
            cell[1] += 1
        diffs.append({t: np.array(list(prompts.values()), dtype=float).T for t, prompts in per_tag.items()})
    tags = sorted(diffs[0])
    point = np.mean([np.mean([d[t][0].sum() / d[t][1].sum() for t in tags]) for d in diffs])
    total = np.zeros(draws)
    for t in tags:
        pick = rng.integers(diffs[0][t].shape[1], size=(draws, diffs[0][t].shape[1]))   # shared by the seeds
        total += np.mean([d[t][0][pick].sum(1) / d[t][1][pick].sum(1) for d in diffs], axis=0)
    low, high = np.percentile(total / len(tags), [2.5, 97.5])
    return float(point), float(low), float(high)

def verdict_of(low: float, high: float) -> str:
    """A claim A > B judged by its interval: "holds" above 0, "reversed" below 0, else "not separated"."""
    return "holds" if low > 0 else "reversed" if high < 0 else "not separated"

def markdown_table(rows: dict[str, dict[str, Score]]) -> str:
    """GenEval's table in Markdown: one row per method, the six tasks and overall as columns, each cell the
    accuracy with its 95% interval, then the images scored."""
    cols = [*PROMPT_TEMPLATES, "overall"]
    cell = lambda s: f"{s.accuracy:.2f} [{s.low:.2f}, {s.high:.2f}]" if s is not None else "-"  # noqa: E731
    lines = ["| | " + " | ".join(cols) + " | images |", "|---" * (len(cols) + 2) + "|"]
    for name, table in rows.items():
        n = table["overall"].total if "overall" in table else 0
        lines.append(f"| {name} | " + " | ".join(cell(table.get(c)) for c in cols) + f" | {n} |")
    return "\n".join(lines)

def verdict_grid(items: Sequence[tuple[np.ndarray, str, bool, str]], cols: int = 6, scale: int = 2) -> np.ndarray:
    """A picture of judged images: each (image, prompt, correct, reason) shown `scale` times larger above its
    prompt and the evaluator's verdict, in green when correct and in red with the reason when not."""
    font = ImageFont.load_default()
    h, w = items[0][0].shape[0] * scale, items[0][0].shape[1] * scale
    cell_w, cell_h = max(w, 200) + 8, h + 48
    rows = (len(items) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (image, prompt, correct, reason) in enumerate(items):
        x, y = (i % cols) * cell_w + 4, (i // cols) * cell_h + 4
        canvas.paste(Image.fromarray(image).resize((w, h), Image.NEAREST), (x, y))
        colour = (20, 140, 40) if correct else (200, 30, 30)
        draw.rectangle((x - 2, y - 2, x + w + 1, y + h + 1), outline=colour, width=2)
        draw.text((x, y + h + 4), prompt.removeprefix("a photo of "), fill=(0, 0, 0), font=font)
        draw.text((x, y + h + 18), "yes" if correct else f"no: {reason}"[:36], fill=colour, font=font)
    return np.asarray(canvas)

def bar_chart(scores: dict[str, Score], title: str, width: int = 640, bar_h: int = 22) -> np.ndarray:
    """A horizontal bar per row: its accuracy on [0, 1], the 95% interval as a whisker, the value written."""
    font = ImageFont.load_default()
    left, top = 160, 28
    canvas = Image.new("RGB", (width, top + len(scores) * (bar_h + 8) + 24), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=(0, 0, 0), font=font)
    span = width - left - 60
    x = lambda v: left + int(round(v * span))  # noqa: E731
    for i, (name, s) in enumerate(scores.items()):
        y = top + i * (bar_h + 8)
        draw.text((8, y + 5), name, fill=(0, 0, 0), font=font)
        draw.rectangle((left, y, x(s.accuracy), y + bar_h), fill=(70, 110, 200))
        mid = y + bar_h // 2
        draw.line((x(s.low), mid, x(s.high), mid), fill=(0, 0, 0), width=2)
        for v in (s.low, s.high):
            draw.line((x(v), y + 4, x(v), y + bar_h - 4), fill=(0, 0, 0), width=2)
        draw.text((x(s.high) + 6, y + 5), f"{s.accuracy:.2f}", fill=(0, 0, 0), font=font)
    y = top + len(scores) * (bar_h + 8)
    for v in (0, 0.25, 0.5, 0.75, 1.0):       # the axis
        draw.line((x(v), y, x(v), y + 4), fill=(0, 0, 0))
        draw.text((x(v) - 8, y + 6), f"{v:g}", fill=(0, 0, 0), font=font)
    return np.asarray(canvas)

LINE_COLOURS = ((40, 80, 220), (220, 40, 40), (40, 170, 60), (245, 140, 20), (140, 50, 180), (20, 20, 20))

def line_chart(curves: dict[str, Sequence[float]], xs: Sequence[float], title: str, xlabel: str,
               width: int = 480, height: int = 300, intervals: dict[str, Sequence[tuple[float, float]]] | None = None,
               ) -> np.ndarray:
    """Curves of values on [0, 1] over the points `xs` (evenly spaced, labelled by value; a curve with fewer values
    stops early), one colour each with a legend; `intervals` (optional, per curve) draws a whisker at every point."""
    font = ImageFont.load_default()
    left, top, right, bottom = 44, 28, 16, 40 + 14 * len(curves)
    canvas = Image.new("RGB", (width, height + bottom), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=(0, 0, 0), font=font)
    x = lambda i: left + i * (width - left - right) / max(1, len(xs) - 1)  # noqa: E731
    y = lambda v: top + (1 - v) * (height - top - 8)  # noqa: E731
    for v in (0, 0.25, 0.5, 0.75, 1.0):                       # the value axis, with light grid lines
        draw.line((left, y(v), width - right, y(v)), fill=(225, 225, 225))
        draw.text((8, y(v) - 6), f"{v:.2f}", fill=(0, 0, 0), font=font)
    for i, v in enumerate(xs):
        draw.text((x(i) - 4, height - 4), f"{v:g}", fill=(0, 0, 0), font=font)
    draw.text((left, height + 10), xlabel, fill=(0, 0, 0), font=font)
    for k, (name, values) in enumerate(curves.items()):
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        points = [(x(i), y(v)) for i, v in enumerate(values)]
        draw.line(points, fill=colour, width=2)
        for i, (px, py) in enumerate(points):
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
            if intervals and name in intervals:
                lo, hi = intervals[name][i]
                draw.line((px, y(lo), px, y(hi)), fill=colour)
        draw.text((left, height + 24 + 14 * k), f"-- {name}", fill=colour, font=font)
    return np.asarray(canvas)

def captioned_rows(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]], scale: int = 1) -> np.ndarray:
    """A sheet of rows, each a title line above its tiles (image, caption below it); tiles are top-aligned."""
    font = ImageFont.load_default()
    tiles = [[(Image.fromarray(im).resize((im.shape[1] * scale, im.shape[0] * scale), Image.NEAREST), cap)
              for im, cap in row] for _, row in rows]
    heights = [max(t.height for t, _ in row) + 60 for row in tiles]
    width = max(sum(t.width + 12 for t, _ in row) for row in tiles) + 8
    canvas = Image.new("RGB", (max(width, 400), sum(heights) + 8), (255, 255, 255))
    draw, y = ImageDraw.Draw(canvas), 4
    for (title, _), row, h in zip(rows, tiles, heights):
        draw.text((6, y), title, fill=(0, 0, 0), font=font)
        x = 6
        for tile, cap in row:
            canvas.paste(tile, (x, y + 16))
            for k, line in enumerate(cap.split("\n")[:3]):
                draw.text((x, y + 20 + tile.height + 12 * k), line, fill=(60, 60, 60), font=font)
            x += tile.width + 12
        y += h
    return np.asarray(canvas)

# ---- the shapes world: the image tokenizer: one code per quarter of a slot ---------------------------------

# A slot's 4x4 shape area is four 2x2-cell quadrants and a token is one quadrant: it names the object whose quarter
# it draws (its shape and colour), so an object is four tokens and a step's x̂0, which samples every masked token on
# its own, can mix quarters of different objects: the unclear early images of Sec. 4 (Fig. 5), which a token per
# whole object could never show. The tokens go quadrant by quadrant (every slot's top-left quarter, then top-right,
# bottom-left, bottom-right): the four tokens of one slot are then always 9 apart, a relation Show-o's relative
# (rotary) positions can learn; in raster order over the 6 x 6 quarters they are 1, 5, 6 or 7 apart depending on
# where the slot is, and a Show-o trained alike left 90 % of its final images broken (README: the shapes world).
QUADRANTS = 4                 # per slot: top-left, top-right, bottom-left, bottom-right
# code 0 = an empty quadrant; code 1 + shape * 10 + colour = a quarter of that shape in that colour (SHAPES' and
# GenEval's orders): the slot contents of the world, each drawn a quarter at a time
SLOT_CONTENTS = [None] + [(s, c) for s in SHAPE_NAMES for c in GENEVAL_COLORS]

def slot_areas(cells: np.ndarray) -> np.ndarray:
    """[B, GRID, GRID] cell codes -> [B, 9, 4, 4]: every slot's 4x4 shape area, slots in raster order. A slot's free
    last row and column belong to no token: no world object reaches them."""
    areas = cells.reshape(-1, SLOTS, SLOT, SLOTS, SLOT)[:, :, :SLOT - 1, :, :SLOT - 1]
    return areas.transpose(0, 1, 3, 2, 4).reshape(len(cells), SLOTS * SLOTS, SLOT - 1, SLOT - 1)

def quarters(areas: np.ndarray) -> np.ndarray:
    """[..., 4, 4] shape areas -> [..., 4, 2, 2] their quadrants (top-left, top-right, bottom-left, bottom-right)."""
    q = areas.reshape(*areas.shape[:-2], 2, 2, 2, 2).swapaxes(-3, -2)
    return q.reshape(*areas.shape[:-2], QUADRANTS, 2, 2)

class QuadrantCodec:
    """The image tokenizer of the shapes world, with MAGVIT-v2's interface (cotgen.MAGVITv2): 36 tokens per image,
    one per quadrant of a slot (2x2 cells, 16 x 16 px), quadrant by quadrant (token q * 9 + s is quadrant q of slot
    s), each the slot content (empty, or one of 7 shapes x 10 colours: 71 codes) whose quarter it draws. get_code
    snaps the pixels to cells; a slot that shows one whole content gets its code in all four tokens, any other
    quadrant the content whose quarter differs from it in the fewest cells (ties: the lower code). So it encodes
    any image, is exact on the world's, and re-encodes what it decodes to the same pixels: a whole object is four
    equal tokens, while four tokens that disagree draw quarters of different objects."""

    def __init__(self, cell_px: int = CELL_PX):
        self.cell_px, self.tokens = cell_px, QUADRANTS * SLOTS * SLOTS
        # the tokens left to right, top to bottom over the 6 x 6 quarters: the order a raster generator makes them
        self.raster_order = [(r % 2 * 2 + c % 2) * SLOTS * SLOTS + r // 2 * SLOTS + c // 2
                             for r in range(2 * SLOTS) for c in range(2 * SLOTS)]
        self.contents = np.stack([paint([in_slot(*sc, 0)] if sc else [])[:SLOT - 1, :SLOT - 1]
                                  for sc in SLOT_CONTENTS])                        # [71, 4, 4]
        self.quarters = quarters(self.contents)                                    # [71, 4, 2, 2]
        # decoded values sit half a level above the palette, so Show-o's truncating uint8 conversion
        # ((x + 1) / 2 * 255, floored; data.to_uint8_image) gives the palette exactly
        self.levels = torch.from_numpy((PALETTE.astype(np.float32) + 0.5) / 127.5 - 1.0)

    device = torch.device("cpu")

    @property
    def codebook_size(self) -> int:
        return len(SLOT_CONTENTS)

    def image_size(self, n_tokens: int) -> int:
        """Image side of n_tokens codes (MAGVIT-v2's interface): the world's one image size."""
        return GRID * self.cell_px

    def encode_cells(self, cells: np.ndarray) -> np.ndarray:
        """[B, GRID, GRID] cell codes -> [B, 36] codes."""
        areas = slot_areas(cells)                                                   # [B, 9, 4, 4]
        whole = (areas[:, :, None] == self.contents[None, None]).all((3, 4))        # [B, 9, 71]
        codes = np.repeat(whole.argmax(2)[:, :, None], QUADRANTS, 2)               # [B, 9, 4]
        odd = ~whole.any(2)             # slots no one content fills: each quadrant takes its nearest pattern
        near = (quarters(areas[odd])[:, :, None] != self.quarters.swapaxes(0, 1)[None]).sum((3, 4))   # [M, 4, 71]
        codes[odd] = near.argmin(2)
        return codes.swapaxes(1, 2).reshape(len(cells), -1)

    def get_code(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> codes [B, 36]."""
        cells = np.stack([snap_cells(im) for im in to_uint8_image(pixels.cpu())])
        return torch.from_numpy(self.encode_cells(cells)).long().to(pixels.device)

    def decode_cells(self, codes: torch.Tensor) -> np.ndarray:
        """Codes [B, 36] -> cell codes [B, GRID, GRID]; codes outside the codebook are clamped."""
        if codes.shape[1] != self.tokens:
            raise ValueError(f"{codes.shape[1]} codes per image, expected {self.tokens} ({QUADRANTS} quadrants x "
                             f"{SLOTS * SLOTS} slots)")
        c = codes.long().cpu().clamp(0, self.codebook_size - 1).numpy().reshape(-1, QUADRANTS, SLOTS * SLOTS)
        q = self.quarters[c, np.arange(QUADRANTS)[None, :, None]]                  # [B, 4, 9, 2, 2]
        areas = q.swapaxes(1, 2).reshape(-1, SLOTS, SLOTS, 2, 2, 2, 2).transpose(0, 1, 3, 5, 2, 4, 6)
        cells = np.zeros((len(c), SLOTS, SLOT, SLOTS, SLOT), dtype=np.int64)
        cells[:, :, :SLOT - 1, :, :SLOT - 1] = areas.reshape(-1, SLOTS, SLOT - 1, SLOTS, SLOT - 1)
        return cells.reshape(-1, GRID, GRID)

    def decode_code(self, codes: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes [B, 36] -> images [B, 3, GRID * px, GRID * px] in [-1, 1]."""
        x = self.levels[torch.from_numpy(self.decode_cells(codes))].permute(0, 3, 1, 2).to(codes.device)
        return x.repeat_interleave(self.cell_px, 2).repeat_interleave(self.cell_px, 3)
