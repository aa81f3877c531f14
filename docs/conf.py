"""Sphinx configuration of the soap_optax documentation site.

Build (from the repository root; warnings are errors, notebooks are executed and cached):

  sphinx-build -W --keep-going -b html docs build/docs/html

The notebooks in ``examples/`` (``docs/examples`` is a link to it) are executed by myst-nb
during the build; jupyter-cache keeps their outputs in ``build/docs/.jupyter_cache`` (next to
the output folder), so a rebuild re-executes only the notebooks whose code changed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# JAX's CPU QR / eigh run in OpenBLAS, whose threads fight XLA's pool on small machines. The
# notebooks set this themselves before importing jax; autodoc imports soap_optax (and jax) in
# this process, so set it here too before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import soap_optax  # noqa: E402

project = "soap_optax"
author = "the soap_optax authors"
copyright = "the soap_optax authors"  # noqa: A001
release = soap_optax.__version__
version = release

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "public_api",
]

root_doc = "index"
exclude_patterns = [
  "_build",
  "**/.ipynb_checkpoints",
  ".jupyter_cache",
  "jupyter_execute",
  "Thumbs.db",
  ".DS_Store",
]

# -- MyST and notebooks -------------------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# "cache": execute a notebook only when its code changed since the last build (jupyter-cache).
nb_execution_mode = "cache"
nb_execution_timeout = 300  # seconds per cell
nb_execution_in_temp = True  # notebooks never write into the source tree
nb_execution_allow_errors = False
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# -- API reference ------------------------------------------------------------------------------

autosummary_generate = False  # the API page documents every object itself (public_api.py)
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
autodoc_default_options = {"show-inheritance": False}

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False
napoleon_attr_annotations = True

# -- HTML ---------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = f"soap_optax {release}"
html_theme_options = {
  "home_page_in_toc": True,
  "show_navbar_depth": 1,
  "use_download_button": True,
}
