"""Tests for the byte-level corpus loader used by examples/train_lm.py."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import lm_data  # noqa: E402


def _write(root, rel, content: bytes):
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)


@pytest.fixture
def corpus_dir(tmp_path):
  """A small tree of Python files, plus things the loader must ignore."""
  root = tmp_path / "lib"
  for i in range(40):
    pkg = f"pkg{i % 4}"
    _write(root, f"{pkg}/mod{i}.py", f"# module {i}\ndef f{i}(x):\n  return x * {i}\n".encode())
  _write(root, "tiny.py", b"x")  # Shorter than any training window.
  _write(root, "empty.py", b"")
  _write(root, "utf8.py", "s = 'héllo ✓'\n".encode())
  _write(root, "README.txt", b"not python")
  _write(root, "site-packages/thirdparty.py", b"import numpy\n")
  _write(root, "pkg0/__pycache__/mod0.py", b"stale copy\n")
  return root


def test_list_source_files_filters_and_sorts(corpus_dir):
  paths = lm_data.list_source_files(str(corpus_dir))
  assert len(paths) == 43
  assert paths == sorted(paths)
  assert "tiny.py" in paths and "pkg1/mod1.py" in paths
  assert not any("site-packages" in p or "__pycache__" in p for p in paths)
  assert not any(p.endswith(".txt") for p in paths)


def test_max_files_is_deterministic_and_spread(corpus_dir):
  a = lm_data.list_source_files(str(corpus_dir), max_files=12)
  b = lm_data.list_source_files(str(corpus_dir), max_files=12)
  assert a == b and len(a) == 12
  # Chosen by hash rather than alphabetically, so several packages appear.
  assert len({p.split("/")[0] for p in a}) > 1
  with pytest.raises(ValueError, match="max_files"):
    lm_data.list_source_files(str(corpus_dir), max_files=0)


def test_split_is_deterministic_disjoint_and_complete(corpus_dir):
  paths = lm_data.list_source_files(str(corpus_dir))
  train, val = lm_data.split_files(paths, val_fraction=0.25)
  train2, val2 = lm_data.split_files(list(reversed(paths)), val_fraction=0.25)
  assert (train, val) == (train2, val2)
  assert not set(train) & set(val)
  assert sorted(train + val) == sorted(paths)
  assert 0 < len(val) < len(paths) // 2


def test_split_of_a_file_does_not_depend_on_other_files(corpus_dir):
  paths = lm_data.list_source_files(str(corpus_dir))
  _, val_all = lm_data.split_files(paths, val_fraction=0.25)
  _, val_half = lm_data.split_files(paths[::2], val_fraction=0.25)
  assert set(val_half) == set(val_all) & set(paths[::2])


def test_split_keeps_both_sides_non_empty():
  train, val = lm_data.split_files(["a.py", "b.py"], val_fraction=0.01)
  assert len(train) == 1 and len(val) == 1
  with pytest.raises(ValueError, match="at least 2 files"):
    lm_data.split_files(["a.py"], val_fraction=0.1)
  with pytest.raises(ValueError, match="val_fraction"):
    lm_data.split_files(["a.py", "b.py"], val_fraction=1.0)


def test_load_corpus_concatenates_bytes_with_separator(corpus_dir):
  corpus = lm_data.load_corpus(str(corpus_dir), val_fraction=0.25)
  for data, files in ((corpus.train, corpus.train_files), (corpus.val, corpus.val_files)):
    assert data.dtype == np.uint8
    expected = b"".join((corpus_dir / f).read_bytes() + lm_data.SEPARATOR for f in files)
    assert data.tobytes() == expected
  assert set(corpus.train_files).isdisjoint(corpus.val_files)
  assert "train files" in corpus.describe()


def test_sample_windows_shape_dtype_range_and_contiguity(corpus_dir):
  corpus = lm_data.load_corpus(str(corpus_dir), val_fraction=0.25)
  rng = np.random.default_rng(0)
  windows = lm_data.sample_windows(corpus.train, batch_size=5, seq_len=16, rng=rng)
  assert windows.shape == (5, 17)
  assert windows.dtype == np.int32
  assert windows.min() >= 0 and windows.max() < lm_data.VOCAB_SIZE
  stream = corpus.train.tobytes()
  for w in windows:
    assert bytes(w.astype(np.uint8)) in stream


def test_batches_are_reproducible_from_seed(corpus_dir):
  corpus = lm_data.load_corpus(str(corpus_dir), val_fraction=0.25)
  a = lm_data.batch_iterator(corpus.train, 4, 8, seed=3)
  b = lm_data.batch_iterator(corpus.train, 4, 8, seed=3)
  c = lm_data.batch_iterator(corpus.train, 4, 8, seed=4)
  first_a, first_b, first_c = next(a), next(b), next(c)
  np.testing.assert_array_equal(first_a, first_b)
  assert not np.array_equal(first_a, first_c)
  fixed = lm_data.fixed_batches(corpus.val, 3, 2, 8, seed=0)
  assert len(fixed) == 3 and all(f.shape == (2, 9) for f in fixed)


def test_tiny_files_only(tmp_path):
  """Files shorter than a window still work once concatenated, and too little data errors."""
  for i in range(30):
    _write(tmp_path, f"t{i}.py", b"ab")
  corpus = lm_data.load_corpus(str(tmp_path), val_fraction=0.2)
  assert corpus.train.size == 3 * len(corpus.train_files)
  windows = lm_data.sample_windows(corpus.train, 2, 8, np.random.default_rng(0))
  assert windows.shape == (2, 9)
  with pytest.raises(ValueError, match="fewer than one window"):
    lm_data.sample_windows(corpus.val, 2, 1000, np.random.default_rng(0))


def test_empty_or_missing_dir_gives_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"No '\*\.py' files"):
    lm_data.load_corpus(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    lm_data.load_corpus(str(tmp_path / "missing"))


def test_stdlib_dir_holds_python_sources():
  assert os.path.isfile(os.path.join(lm_data.stdlib_dir(), "os.py"))
