"""Sphinx configuration: MyST Markdown pages plus autodoc of the public modules.

``make -C docs html`` treats warnings as errors (see Makefile), so a broken cross-reference, a
page missing from a toctree or a docstring that does not parse fails the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The package is normally installed (editable); this keeps a plain checkout buildable too.
sys.path.insert(0, str(ROOT / "src"))

project = "Minions"
author = "The Minions maintainers"
copyright = "the Minions maintainers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "alabaster"
html_title = "Minions"
html_static_path: list[str] = []
