"""Byte-level language-modelling data from an offline corpus of Python source files.

The default corpus is the Python standard library that ships with the running
interpreter, so the example works without any download. Files are split into
train and validation sets *by file* (a stable hash of each file's relative path
decides), which keeps near-duplicate lines of one file from leaking across the
split. Each split is the concatenation of its files' bytes, with a separator
byte between files, and training windows are sampled uniformly at random from
it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence

import numpy as np

VOCAB_SIZE = 256
# NUL never occurs in well-formed Python source, so it works as an unambiguous
# end-of-file marker between concatenated files.
SEPARATOR = b"\x00"
# Third-party packages installed into the interpreter are not part of the
# standard library; leaving them out keeps the corpus the same across machines
# that have the same Python version.
DEFAULT_EXCLUDE_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_dir() -> str:
  """Returns the directory of the running interpreter's standard library."""
  return sysconfig.get_paths()["stdlib"]


def _unit_hash(text: str, salt: str) -> float:
  """Maps `text` to a stable pseudo-random number in [0, 1).

  Python's built-in `hash` is salted per process, so a cryptographic hash is
  used instead to make the split identical across runs and machines.
  """
  digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def list_source_files(
  root: str,
  suffix: str = ".py",
  exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE_DIRS,
  max_files: int | None = None,
) -> list[str]:
  """Lists files under `root` ending in `suffix`, as sorted relative paths.

  Args:
    root: directory to search recursively.
    suffix: file-name suffix to keep.
    exclude_dirs: directory names whose subtrees are skipped.
    max_files: if set, keep only this many files. The subset is chosen by a
      hash of the path (not alphabetically), so a small cap still samples the
      whole tree rather than one package.

  Returns:
    Relative paths with forward slashes, sorted.

  Raises:
    FileNotFoundError: if `root` is not a directory or holds no matching file.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"Corpus directory does not exist: {root!r}")
  excluded = set(exclude_dirs)
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruning in place stops os.walk from descending into excluded trees.
    dirnames[:] = sorted(d for d in dirnames if d not in excluded)
    for name in filenames:
      if name.endswith(suffix):
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        paths.append(rel.replace(os.sep, "/"))
  if not paths:
    raise FileNotFoundError(f"No '*{suffix}' files found under {root!r}")
  if max_files is not None:
    if max_files < 1:
      raise ValueError(f"max_files must be positive, got {max_files}")
    paths = sorted(paths, key=lambda p: _unit_hash(p, "select"))[:max_files]
  return sorted(paths)


def split_files(paths: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """Deterministically splits relative paths into (train, validation) lists.

  A file goes to validation when the hash of its path falls below
  `val_fraction`, so the assignment of a file never depends on which other
  files exist. If that leaves one side empty (tiny corpora), the file with the
  smallest hash is moved so that both splits are non-empty.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  if len(paths) < 2:
    raise ValueError(f"Need at least 2 files to split by file, got {len(paths)}")
  ranked = sorted(paths, key=lambda p: _unit_hash(p, "split"))
  num_val = sum(_unit_hash(p, "split") < val_fraction for p in ranked)
  num_val = min(max(num_val, 1), len(ranked) - 1)
  return sorted(ranked[num_val:]), sorted(ranked[:num_val])


def concat_files(root: str, paths: Sequence[str]) -> np.ndarray:
  """Reads files as raw bytes and joins them with `SEPARATOR` into a uint8 array."""
  chunks = []
  for rel in paths:
    with open(os.path.join(root, rel), "rb") as f:
      chunks.append(f.read())
  return np.frombuffer(SEPARATOR.join(chunks) + SEPARATOR, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and validation byte streams plus the files each came from."""

  root: str
  train: np.ndarray
  val: np.ndarray
  train_files: tuple[str, ...]
  val_files: tuple[str, ...]

  def describe(self) -> str:
    return (
      f"{len(self.train_files)} train files ({self.train.size / 1e6:.2f} MB), "
      f"{len(self.val_files)} val files ({self.val.size / 1e6:.2f} MB) from {self.root}"
    )


def load_corpus(
  root: str | None = None,
  max_files: int | None = None,
  val_fraction: float = 0.1,
  suffix: str = ".py",
) -> Corpus:
  """Loads a byte-level corpus, split into train and validation by file.

  Args:
    root: directory of source files; defaults to the standard library.
    max_files: optional cap on the number of files (useful for tests).
    val_fraction: approximate fraction of files held out for validation.
    suffix: file-name suffix to include.

  Returns:
    A `Corpus`.
  """
  root = stdlib_dir() if root is None else root
  paths = list_source_files(root, suffix=suffix, max_files=max_files)
  train_files, val_files = split_files(paths, val_fraction)
  return Corpus(
    root=root,
    train=concat_files(root, train_files),
    val=concat_files(root, val_files),
    train_files=tuple(train_files),
    val_files=tuple(val_files),
  )


def sample_windows(
  data: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
) -> np.ndarray:
  """Samples `batch_size` random contiguous windows of `seq_len + 1` bytes.

  The extra byte lets the caller use `w[:, :-1]` as inputs and `w[:, 1:]` as
  next-byte targets.

  Returns:
    An int32 array of shape (batch_size, seq_len + 1) with values in [0, 256).
  """
  window = seq_len + 1
  if data.size < window:
    raise ValueError(
      f"Split has {data.size} bytes, fewer than one window of {window}; "
      "use more files or a shorter seq_len."
    )
  starts = rng.integers(0, data.size - window + 1, size=batch_size)
  return data[starts[:, None] + np.arange(window)].astype(np.int32)


class BatchStream(Iterator[np.ndarray]):
  """An endless stream of random windows, reproducible from `seed` and resumable.

  `position()` is the stream's place (the state of its random generator, a JSON-serialisable
  dict); a stream built with `position=` continues exactly where that one was, which is what a
  checkpoint of a training run stores.
  """

  def __init__(
    self,
    data: np.ndarray,
    batch_size: int,
    seq_len: int,
    seed: int,
    position: dict | None = None,
  ):
    self.data = data
    self.batch_size = batch_size
    self.seq_len = seq_len
    self._rng = np.random.default_rng(seed)
    if position is not None:
      self._rng.bit_generator.state = position

  def __next__(self) -> np.ndarray:
    return sample_windows(self.data, self.batch_size, self.seq_len, self._rng)

  def position(self) -> dict:
    return self._rng.bit_generator.state


def batch_iterator(data: np.ndarray, batch_size: int, seq_len: int, seed: int) -> BatchStream:
  """An endless stream of random windows, reproducible from `seed` (see `BatchStream`)."""
  return BatchStream(data, batch_size, seq_len, seed)


def fixed_batches(
  data: np.ndarray, num_batches: int, batch_size: int, seq_len: int, seed: int
) -> list[np.ndarray]:
  """Draws a fixed list of batches, e.g. so every evaluation sees the same data."""
  rng = np.random.default_rng(seed)
  return [sample_windows(data, batch_size, seq_len, rng) for _ in range(num_batches)]
