"""Byte-level language-modelling data: a tokenizer, an embedded English corpus, and window datasets.

The embedded corpus, ``stdlib_docs``, is the documentation every Python install carries: the docstrings of a
fixed list of standard-library modules (:data:`STDLIB_MODULES`), read from their ``.py`` source with :mod:`ast`
(nothing is imported, so no module runs), in source order, each headed by its qualified name. It is real English
technical prose (0.94 MB on Python 3.11) and the same bytes on every machine with the same Python minor
version. ``text`` reads a user's plain-text file or folder of ``*.txt`` files instead.

Split rule (both sources): each document (module / file) keeps its first 90% of bytes for training and its last
10% for validation, so both sets cover every topic and never share a byte.
Training draws random contiguous windows of ``seq_len + 1`` bytes (input and the next-byte target, shifted by
one); validation tiles the validation bytes with non-overlapping windows, the same every time.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

TEXT_DATASETS = ("stdlib_docs", "text")
VOCAB_SIZE = 256
VAL_FRACTION = 0.1

STDLIB_MODULES = (
    "_pydecimal", "abc", "argparse", "ast", "asyncio.events", "asyncio.tasks", "base64", "bisect", "calendar",
    "cmd", "code", "codecs", "collections", "colorsys", "concurrent.futures._base", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "doctest", "email.message", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "importlib.metadata", "inspect",
    "ipaddress", "json", "json.decoder", "json.encoder", "locale", "logging", "logging.handlers", "mailbox",
    "mimetypes", "multiprocessing.pool", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pickle",
    "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "queue", "quopri",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
    "zipimport",
)  # fmt: skip
"""Pure-Python standard-library modules present in every CPython 3.10+ install (sorted; the corpus order)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids ``0..255``, no special tokens, nothing to train or download."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of ``ids``; a window may start or end inside a multi-byte character, shown as U+FFFD."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if any(not 0 <= v < VOCAB_SIZE for v in values):
            raise ValueError(f"byte ids must be in [0, {VOCAB_SIZE}), got {min(values)}..{max(values)}")
        return bytes(values).decode("utf-8", errors="replace")


def _module_file(stdlib: Path, module: str) -> Path | None:
    rel = Path(*module.split("."))
    for path in (stdlib / rel.with_suffix(".py"), stdlib / rel / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_docs(source: str, module: str) -> str:
    """The docstrings of one module's source (module, classes, functions, methods, nested, in source order),
    each after a line with its qualified name, e.g. ``argparse.ArgumentParser.add_argument``."""
    parts = []

    def visit(node: ast.AST, name: str) -> None:
        doc = ast.get_docstring(node)  # type: ignore[arg-type]
        if doc:
            parts.append(f"{name}\n{doc}\n\n")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{name}.{child.name}")

    visit(ast.parse(source), module)
    return "".join(parts)


@functools.lru_cache(maxsize=2)
def stdlib_docs(modules: tuple[str, ...] = STDLIB_MODULES) -> tuple[str, ...]:
    """One document per module of ``modules`` found in this interpreter's standard library (missing ones, e.g.
    removed by a distribution, are skipped with a warning, since they change the corpus).

    Cached per process: parsing the ~100 source files takes seconds and every run of a process reads the same."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, missing = [], []
    for module in modules:
        path = _module_file(stdlib, module)
        if path is None:
            missing.append(module)
            continue
        docs.append(module_docs(path.read_text(encoding="utf-8"), module))
    if missing:
        warnings.warn(
            f"stdlib_docs: {len(missing)} modules not found in {stdlib} ({', '.join(missing)}); the corpus "
            "differs from the standard one",
            RuntimeWarning,
            stacklevel=2,
        )
    if not docs:
        raise FileNotFoundError(f"no standard-library module of the corpus list found under {stdlib}")
    return tuple(docs)


def text_files(root: str | Path) -> list[bytes]:
    """The bytes of a plain-text file, or of every ``*.txt`` file under a folder (recursive, sorted by path)."""
    root = Path(root).expanduser()
    if root.is_file():
        return [root.read_bytes()]
    if not root.is_dir():
        raise FileNotFoundError(f"text data root not found: {root} (give a .txt file or a folder of them)")
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.txt files under {root}")
    return [p.read_bytes() for p in files]


def split_documents(
    docs: Sequence[str | bytes], val_fraction: float = VAL_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` uint8 byte streams: each document's first ``1 - val_fraction`` goes to train, the rest
    to val (see the module docstring for why per document)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = bytearray(), bytearray()
    for doc in docs:
        data = doc.encode("utf-8") if isinstance(doc, str) else bytes(doc)
        cut = round(len(data) * (1.0 - val_fraction))
        train += data[:cut]
        val += data[cut:]
    return _byte_tensor(train), _byte_tensor(val)


def _byte_tensor(data: bytearray) -> torch.Tensor:
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


class ByteWindows(Dataset):
    """Item ``i`` is ``(x, y)``: the ``seq_len`` bytes at offset ``i * stride`` and the same shifted by one, as
    int64 ids. ``stride=1`` makes every offset an item (training samples them); ``stride=seq_len`` tiles."""

    def __init__(self, data: torch.Tensor, seq_len: int, stride: int = 1, what: str = "text") -> None:
        if seq_len < 1 or stride < 1:
            raise ValueError(f"seq_len and stride must be >= 1, got {seq_len} and {stride}")
        if data.numel() < seq_len + 1:
            raise ValueError(
                f"{what} has {data.numel()} bytes, fewer than one window of seq_len + 1 = {seq_len + 1}; "
                "use more text or a smaller data.seq_len"
            )
        self.data, self.seq_len, self.stride = data, seq_len, stride
        self.size = (data.numel() - seq_len - 1) // stride + 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"window {index} out of range for {self.size} windows")
        start = index * self.stride
        chunk = self.data[start : start + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


class RandomWindowSampler(Sampler[int]):
    """``num_samples`` uniformly random window indices per rank and epoch, a function of (seed, epoch) only.

    Its own generator (not torch's global RNG) makes a resumed run draw the same windows; the epoch's draw is
    split ``rank::world_size`` so ranks see different windows. Call :meth:`set_epoch` as with DistributedSampler.
    """

    def __init__(self, size: int, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size < 1 or num_samples < 1:
            raise ValueError(f"need size >= 1 and num_samples >= 1, got {size} and {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.size, self.num_samples, self.seed = size, num_samples, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        draw = torch.randint(self.size, (self.num_samples * self.world_size,), generator=gen)
        return iter(draw[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples
