"""The training corpus: Python's standard library sources (code, comments and docstrings) from the local Python.

Deterministic: the file list is sorted, nothing is sampled. Files under test suites, IDLE, tkinter demos, encodings
tables and generated data are left out (they are mostly tables, not language). Cleaning: UTF-8 only (undecodable
files are skipped), tabs to 4 spaces, trailing whitespace removed, runs of 3+ blank lines collapsed to one blank line,
files over 400 KB skipped. Each document is prefixed by a header line `# file: <relative path>`.

Split: every 20th file of the sorted list (index % 20 == 19) is the held-out validation split; the rest train.

    corpus = build_corpus()           # Corpus(train=[Doc, ...], val=[Doc, ...], root=...)
"""
from __future__ import annotations

import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

VAL_EVERY = 20
MAX_BYTES = 400_000
EXCLUDE_PARTS = {"test", "tests", "idle_test", "idlelib", "site-packages", "__pycache__", "turtledemo", "encodings",
                 "lib2to3", "unicodedata", "pydoc_data", "config-3.11-x86_64-linux-gnu"}
EXCLUDE_NAMES = {"_pydecimal.py"}  # a near-copy of decimal's docs twice would dominate; keep the corpus varied


@dataclass(frozen=True)
class Doc:
    path: str   # relative to the stdlib root
    text: str


@dataclass(frozen=True)
class Corpus:
    root: str
    train: list[Doc]
    val: list[Doc]

    def text(self, split: str) -> str:
        """All documents of a split joined by blank lines."""
        return "\n\n".join(d.text for d in getattr(self, split))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def source_files(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if set(rel.parts[:-1]) & EXCLUDE_PARTS or rel.name in EXCLUDE_NAMES or rel.name.startswith("test_"):
            continue
        out.append(p)
    return out


def build_corpus(root: Path | None = None) -> Corpus:
    root = root or stdlib_root()
    docs: list[Doc] = []
    for p in source_files(root):
        raw = p.read_bytes()
        if len(raw) > MAX_BYTES:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        rel = p.relative_to(root).as_posix()
        docs.append(Doc(rel, f"# file: {rel}\n" + clean(text)))
    if len(docs) < 100:
        raise RuntimeError(f"only {len(docs)} source files found under {root}: is this a full Python install?")
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    return Corpus(str(root), train, val)


if __name__ == "__main__":
    c = build_corpus()
    for split in ("train", "val"):
        docs = getattr(c, split)
        print(split, len(docs), "files", sum(len(d.text) for d in docs), "chars")
