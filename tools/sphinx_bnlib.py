"""Sphinx extension for the API reference.

bnlib's docstrings are written to be read in a terminal (``help()``, CS231n-style "Inputs/Returns" blocks
with shapes and plain-text math), not as reStructuredText. This hook shows each docstring verbatim as a
literal block, so nothing in it can break the warnings-as-errors build, and turns every
"Defined in: chapters/NN_x.ipynb" into a link to that chapter, placed above the block.
"""

import os
import re
from pathlib import Path

from sphinx.transforms import SphinxTransform

CHAPTER = re.compile(r"chapters/(\w+)\.ipynb")


def _verbatim_with_links(app, what, name, obj, options, lines):
    if not any(line.strip() for line in lines):
        return
    links = []
    for line in lines:
        if "Defined in" in line or "used in" in line:
            for chapter in CHAPTER.findall(line):
                if chapter not in links:
                    links.append(chapter)
    head = []
    if links:
        head = ["Defined in " + ", ".join(f":doc:`/chapters/{c}`" for c in links) + ".", ""]
    text = [line for line in lines if not (links and line.strip().startswith("Defined in"))]
    while text and not text[-1].strip():
        text.pop()
    body = [("   " + line) if line.strip() else "" for line in text]
    lines[:] = [*head, ".. code-block:: text", "", *body, ""] if body else head


def _offline_scripts(app, pagename, templatename, context, doctree):
    """Drop sphinx-thebe's scripts (live code needs a Binder server, and its config names a CDN script) and
    any script included twice (sphinx-thebe declares THEBE_JS_URL twice, a console error on every page)."""
    seen, kept = set(), []
    for js in context.get("script_files", []):
        body = getattr(js, "attributes", {}).get("body", "") if hasattr(js, "attributes") else ""
        key = (str(js), body)
        if "thebe" in str(js) or "THEBE_JS_URL" in body or key in seen:
            continue
        seen.add(key)
        kept.append(js)
    context["script_files"] = kept


# Printed output wraps at the page width, as in JupyterLab's output area, so no printed line is cut off in a
# 1280-px window. Code is not wrapped by the browser: code cells are wrapped in the source to fit (77 columns,
# tests/test_rendered_book.py measures every code block).
OUTPUT_CSS = ("<style>div.cell_output pre, div.highlight-text pre "
              "{ white-space: pre-wrap; overflow-wrap: anywhere; }</style>")


def _wrap_output(app, pagename, templatename, context, doctree):
    context["metatags"] = context.get("metatags", "") + "\n" + OUTPUT_CSS


class RemoveSolutions(SphinxTransform):
    """The student edition: drop every solution, gated or not, once sphinx-exercise has assembled it."""

    default_priority = 20  # after sphinx-exercise's MergeGatedSolutions (10)

    def apply(self):
        if not self.config.bnlib_hide_solutions:
            return
        from sphinx_exercise.nodes import solution_node

        for node in list(self.document.findall(solution_node)):
            node.parent.remove(node)


# tools/build_book.py --student sets this to "student" (the student edition changes no configuration file).
STUDENT_ENV = "BNLIB_EDITION"
SOLUTIONS_BUG = "https://github.com/executablebooks/sphinx-exercise/issues/89"


def _take_over_hide_solutions(app, config):
    # sphinx-exercise's own `hide_solutions` drops `solution-start` but keeps `solution-end` (an unknown node
    # that breaks the HTML writer: "departing unknown node type: solution_end_node") and leaves the gated
    # content, code cells included, on the page: the open bug SOLUTIONS_BUG. Let it assemble the solutions
    # normally and remove them whole instead (RemoveSolutions); drop this when that issue is fixed.
    student = os.environ.get(STUDENT_ENV) == "student"
    config.bnlib_hide_solutions = bool(config.hide_solutions) or student
    config.hide_solutions = False
    if student:  # the main build's execution cache: the student edition differs in rendering only
        config.nb_execution_cache_path = str(Path(app.srcdir) / "_build" / ".jupyter_cache")


def setup(app):
    app.add_config_value("bnlib_hide_solutions", False, "env")
    app.connect("config-inited", _take_over_hide_solutions, priority=900)
    app.add_transform(RemoveSolutions)
    app.connect("autodoc-process-docstring", _verbatim_with_links)
    app.connect("html-page-context", _offline_scripts, priority=900)
    app.connect("html-page-context", _wrap_output)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
