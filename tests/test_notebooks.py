"""Notebook hygiene: cheap static checks that run before nbval executes anything (CONTRIBUTING.md)."""

import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))
CHECK_TAG = "nbval-check-output"

# Portable outputs (CONTRIBUTING.md): nbval compares a checked cell on every reader's CPU, so its text must not
# carry digits that legitimately vary from one machine to another.
# (1) measured magnitudes at rounding level, e.g. an error of 3.1e-07 or 4e-16: their digits depend on the order of
#     summation. Bounds written as 1e-N ("< 1e-12") are fine.
ROUNDING_LEVEL = re.compile(r"(?<![\w.])(?!1e-)\d(\.\d+)?e-(0?[5-9]|[1-9]\d)\b")
# (2) results of float32 training runs: the trajectory depends on the CPU's kernels; guard them with asserts.
FLOAT32_TRAINING = ("mnist.figure1(", "run_figure1(", "cnn_experiments(", "train_cnn(", "train_with_recording(",
                    "figure1_grid(", "lenet_experiment(",
                    "train_mlp(")


def toc_files() -> list[str]:
    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                yield node["file"]
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"], *walk(toc.get("parts", toc.get("chapters", [])))]


def checked(cell) -> bool:
    return CHECK_TAG in cell.metadata.get("tags", []) or cell.source.lstrip().startswith("# NBVAL_CHECK_OUTPUT")


def markdown_headings(source: str) -> list[str]:
    """Heading lines of a Markdown cell, ignoring fenced blocks (code, directives)."""
    out, fence = [], None
    for line in source.splitlines():
        m = re.match(r"\s*(`{3,}|~{3,})", line)
        if m:
            fence = None if fence and m[1].startswith(fence) else (fence or m[1])
            continue
        if fence is None and re.match(r"#{1,6} ", line):
            out.append(line)
    return out


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks in chapters/"


def test_toc_and_chapters_agree():
    listed = toc_files()
    for f in listed:
        assert any((ROOT / f"{f}{ext}").is_file() for ext in (".md", ".ipynb", "")), f"_toc.yml lists missing {f}"
    for nb in NOTEBOOKS:
        assert str(nb.relative_to(ROOT).with_suffix("")) in listed, f"{nb.name} is not in _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_hygiene(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    first = nb.cells[0]
    assert first.cell_type == "markdown", "the first cell must be Markdown with the H1 title"
    lines = [ln for ln in first.source.splitlines() if ln.strip() and not re.fullmatch(r"\(.+\)=", ln.strip())]
    assert lines and re.match(r"# \S", lines[0]), f"first cell must start with an H1 title, got {lines[:1]}"
    h1 = [h for c in nb.cells if c.cell_type == "markdown" for h in markdown_headings(c.source) if h.startswith("# ")]
    assert len(h1) == 1, f"exactly one H1 per chapter, found {h1}"

    n_checked = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert "matplotlib.use(" not in cell.source, f"cell {i}: never set the matplotlib backend in a chapter"
        assert "tqdm.auto" not in cell.source and "tqdm.notebook" not in cell.source, f"cell {i}: widget tqdm"
        if checked(cell):
            n_checked += 1
            calls = [f for f in FLOAT32_TRAINING if f in cell.source]
            assert not calls, f"cell {i}: a checked cell runs float32 training ({calls}); assert on it instead"
            assert cell.outputs, f"cell {i} is tagged {CHECK_TAG} but has no committed output to compare"
            assert cell.execution_count is not None, f"cell {i}: checked outputs need an execution_count"
            for out in cell.outputs:
                assert out.output_type in ("stream", "execute_result"), f"cell {i}: checked cells print text only"
                if out.output_type == "stream":
                    assert out.name == "stdout", f"cell {i}: stderr in a checked cell"
                else:
                    assert set(out.data) == {"text/plain"}, f"cell {i}: rich output in a checked cell"
                text = out.get("text", "") or out.get("data", {}).get("text/plain", "")
                assert not re.search(r"\d+(\.\d+)?\s*(ms|µs|us)\b", text), f"cell {i}: timings are not stable"
                small = ROUNDING_LEVEL.search(text)
                assert not small, f"cell {i}: {small[0]} is a rounding-level magnitude; print it unchecked or as a bound"
        else:
            assert not cell.outputs, f"cell {i}: outputs are committed only for {CHECK_TAG} cells (tools/nb.py strip)"
            assert cell.execution_count is None, f"cell {i}: unchecked cells are committed unexecuted"
    assert n_checked >= 3, f"only {n_checked} cells compared by nbval: tag the cells whose numbers teach something"
