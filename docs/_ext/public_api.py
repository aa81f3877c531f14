"""``.. public-api:: module``: documents every name in ``module.__all__``.

The API page must not go stale when a name is added to the package, so it is generated from
``__all__`` at build time: names are grouped (the optimizers, the blocks, the state classes,
the other classes, the other functions), each group gets an ``autosummary`` table and one
``autofunction`` / ``autoclass`` entry per name. Nothing is written to the source tree.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# The four optimizers, in the order of the README; listed first.
_ALIASES = ("soap", "shampoo", "eigen_adafactor", "eshampoo")
# Preferred order of the blocks (the order they take in a chain); others follow alphabetically.
_BLOCK_ORDER = (
  "kronecker_stats",
  "eigenbasis_refresh",
  "rotated_adam",
  "rotated_adafactor",
  "eigenvalue_corrected",
  "shampoo_precondition",
  "add_decayed_weights_after_step",
  "skip_nonfinite_steps",
)

_GROUPS = (
  (
    "optimizers",
    "Optimizers",
    "The four members of the family, each an ``optax.chain`` of the blocks below.",
  ),
  ("blocks", "Blocks", "Composable ``optax`` transformations; the optimizers are chains of them."),
  (
    "layout",
    "Layout, records and other classes",
    "Which axes get a Kronecker factor, the record that carries a gradient from one Kronecker"
    " block to the next, and the other public classes.",
  ),
  ("states", "Optimizer states", "The ``init`` / ``update`` state of each block."),
  ("functions", "Functions", "Helpers on shapes and matrices."),
  ("other", "Other names", "Public names not covered above."),
)


def _returns_transformation(obj) -> bool:
  """Whether ``obj`` returns an optax transformation (by annotation, else by docstring)."""
  try:
    annotation = inspect.signature(obj).return_annotation
  except (TypeError, ValueError):
    annotation = inspect.Signature.empty
  if annotation is not inspect.Signature.empty:
    return "GradientTransformation" in str(annotation)
  doc = inspect.getdoc(obj) or ""
  returns = doc.split("Returns:", 1)[1] if "Returns:" in doc else ""
  return "GradientTransformation" in returns.split("\n\n", 1)[0]


def _group(name: str, obj) -> str:
  if name in _ALIASES:
    return "optimizers"
  if inspect.isclass(obj):
    return "states" if name.endswith("State") else "layout"
  if callable(obj):
    return "blocks" if _returns_transformation(obj) else "functions"
  return "other"


def _sort_key(group: str, name: str):
  if group == "optimizers":
    return (_ALIASES.index(name), name)
  if group == "blocks" and name in _BLOCK_ORDER:
    return (_BLOCK_ORDER.index(name), name)
  return (len(_BLOCK_ORDER), name.lower())


def _entry(module: str, name: str, obj) -> list[str]:
  qualified = f"{module}.{name}"
  if inspect.isclass(obj):
    lines = [f".. autoclass:: {qualified}"]
    # NamedTuple fields and dataclass fields are described by the class docstring's
    # ``Attributes:`` section; documenting them again as members would duplicate them.
    if not hasattr(obj, "_fields"):
      lines.append("   :members:")
      if dataclasses.is_dataclass(obj):
        fields = ", ".join(f.name for f in dataclasses.fields(obj))
        if fields:
          lines.append(f"   :exclude-members: {fields}")
    return lines
  if callable(obj):
    return [f".. autofunction:: {qualified}"]
  return [f".. autodata:: {qualified}", "   :annotation:"]


class PublicApi(SphinxDirective):
  required_arguments = 1
  has_content = False

  def run(self) -> list[nodes.Node]:
    module_name = self.arguments[0]
    module = importlib.import_module(module_name)
    # Rebuild this page when the package's __init__ (and so __all__) changes.
    if getattr(module, "__file__", None):
      self.env.note_dependency(module.__file__)
    names = list(getattr(module, "__all__", ()))
    if not names:
      raise self.error(f"{module_name} has no __all__")
    grouped: dict[str, list[tuple[str, object]]] = {}
    for name in names:
      obj = getattr(module, name)
      grouped.setdefault(_group(name, obj), []).append((name, obj))

    lines = [f".. currentmodule:: {module_name}", ""]
    for key, title, blurb in _GROUPS:
      members = sorted(grouped.get(key, ()), key=lambda item, key=key: _sort_key(key, item[0]))
      if not members:
        continue
      lines += [title, "-" * len(title), "", blurb, "", ".. autosummary::", "   :nosignatures:", ""]
      lines += [f"   {name}" for name, _ in members]
      lines.append("")
      for name, obj in members:
        lines += _entry(module_name, name, obj)
        lines.append("")

    container = nodes.section()
    container.document = self.state.document
    nested_parse_with_titles(
      self.state, StringList(lines, source=f"<public-api {module_name}>"), container
    )
    return container.children


def setup(app: Sphinx) -> dict:
  app.add_directive("public-api", PublicApi)
  return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
