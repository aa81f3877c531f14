"""The documentation site builds with warnings as errors, and every notebook in it executes.

Builds ``docs/`` with Sphinx into a temporary directory. myst-nb executes the notebooks of
``examples/`` (the site includes them through ``docs/examples``) with jupyter-cache, whose cache
lives in the same temporary directory, so every run executes them afresh. Deselect with
``-m "not docs"``.

Any warning fails it, from the documentation's own pages or from ``soap_optax``'s docstrings
(the API reference is generated from them); the failure lists each one with its location.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import background
import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
BUILD_TIMEOUT_S = 900

# "<location>: WARNING: <message>" (also ERROR / CRITICAL, which -W turns into failures too).
_PROBLEM = re.compile(r"^(?P<location>.*?):? ?(?P<level>WARNING|ERROR|CRITICAL): (?P<message>.*)$")


def _problems(output: str) -> list[tuple[str, str, str]]:
  """(location, level, message) of every Sphinx warning or error in the build's output."""
  found = []
  for line in output.splitlines():
    match = _PROBLEM.match(line)
    if match:
      found.append((match["location"], match["level"], match["message"]))
  return found


def _tail(text: str, lines: int = 60) -> str:
  return "\n".join(text.splitlines()[-lines:])


_DEPENDENCIES = ("sphinx", "myst_nb", "sphinx_book_theme", "jupyter_cache", "ipykernel")


def start_docs_build(directory: Path | None = None) -> background.Background | None:
  """Starts the Sphinx build into ``directory`` (a temporary one, removed at exit, if None);
  None when the docs dependencies are not installed (the test then skips)."""
  if any(importlib.util.find_spec(module) is None for module in _DEPENDENCIES):
    return None
  if directory is None:
    directory = Path(tempfile.mkdtemp(prefix="soap_optax_docs_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
  env = dict(os.environ)
  env.setdefault("OPENBLAS_NUM_THREADS", "1")  # the notebooks set it too; autodoc imports jax here
  command = [
    sys.executable, "-m", "sphinx",
    "-W", "--keep-going",
    "-b", "html",
    "-d", str(directory / "doctrees"),
    "-D", f"nb_execution_cache_path={directory / 'jupyter_cache'}",
    str(DOCS), str(directory / "html"),
  ]  # fmt: skip
  build = background.Background(command, cwd=ROOT, env=env)
  build.directory = directory
  return build


def test_docs_build_without_warnings_and_notebooks_execute(tmp_path):
  for module in _DEPENDENCIES:
    pytest.importorskip(module, reason=f"the docs dependencies are not installed ({module})")
  import nbformat
  from jupyter_cache import get_cache

  notebooks = sorted(EXAMPLES.glob("*.ipynb"))
  assert notebooks, "no notebook in examples/"

  build = background.take("docs") or start_docs_build(tmp_path)
  assert build is not None
  cache_path = build.directory / "jupyter_cache"
  result = build.wait(BUILD_TIMEOUT_S)
  output = result.stdout + "\n" + result.stderr
  problems = _problems(output)

  if result.returncode != 0:
    listing = "\n".join(f"  {loc}: {level}: {msg}" for loc, level, msg in problems)
    pytest.fail(
      f"the documentation build failed (exit {result.returncode}):\n{listing}\n"
      f"--- end of the build's output ---\n{_tail(output)}"
    )

  # Every notebook ran to the end without an error: it has an entry in the execution cache
  # (only successful executions are cached) and none of its cells produced an error output.
  cache = get_cache(str(cache_path))
  failed = [r.uri for r in cache.list_project_records() if r.traceback]
  assert not failed, f"notebooks whose execution failed: {failed}"
  for path in notebooks:
    notebook = nbformat.read(path, as_version=4)
    try:
      record = cache.match_cache_notebook(notebook)
    except KeyError:
      pytest.fail(f"{path.relative_to(ROOT)} was not executed by the build (is it in the site?)")
    executed = cache.get_cache_bundle(record.pk).nb
    errors = [
      output
      for cell in executed.cells
      if cell.cell_type == "code"
      for output in cell.get("outputs", [])
      if output.get("output_type") == "error"
    ]
    assert not errors, f"{path.relative_to(ROOT)}: cells raised {errors}"
