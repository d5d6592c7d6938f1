"""Notebook tooling for the book's output policy (CONTRIBUTING.md, "Committed notebooks").

    python tools/nb.py refresh chapters/03_bn_backward.ipynb [...]   # execute, then keep only checked outputs
    python tools/nb.py strip   chapters/*.ipynb                      # apply the policy without executing
    python tools/nb.py new     chapters/08_x.md chapters/08_x.ipynb  # jupytext MyST/percent -> .ipynb

Policy: a code cell tagged ``nbval-check-output`` keeps its outputs (text only: stdout and text/plain
results), which nbval compares on every test run; every other code cell is committed without outputs and
with ``execution_count: null``. Notebook metadata is normalised (python3 kernelspec, no widget state).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

CHECK_TAG = "nbval-check-output"
TEXT_OUTPUTS = {"stream", "execute_result"}


def is_checked(cell) -> bool:
    return CHECK_TAG in cell.get("metadata", {}).get("tags", []) or cell.source.lstrip().startswith("# NBVAL_CHECK_OUTPUT")


def policy_violations(cell) -> list[str]:
    """Why a checked cell's outputs cannot be committed (empty list if they can)."""
    bad = []
    for out in cell.get("outputs", []):
        if out.output_type not in TEXT_OUTPUTS:
            bad.append(f"output type {out.output_type}")
        elif out.output_type == "stream" and out.name != "stdout":
            bad.append("stderr output")
        elif out.output_type == "execute_result" and set(out.data) - {"text/plain"}:
            bad.append(f"rich result {sorted(set(out.data) - {'text/plain'})}")
    return bad


def apply_policy(nb) -> list[str]:
    """Strip outputs in place per the policy; return problems found in checked cells."""
    problems = []
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata.pop("widgets", None)
    for i, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        if is_checked(cell):
            problems += [f"cell {i}: {p}" for p in policy_violations(cell)]
            for out in cell.outputs:
                out.pop("metadata", None) if out.output_type == "stream" else None
            cell.outputs = _merge_streams(cell.outputs)
        else:
            cell.outputs = []
            cell.execution_count = None
    return problems


def _merge_streams(outputs: list) -> list:
    """Join consecutive stdout chunks into one output (the kernel flushes a print in pieces on a busy machine)."""
    merged = []
    for out in outputs:
        if merged and out.output_type == "stream" and merged[-1].output_type == "stream" \
                and merged[-1].name == out.name:
            merged[-1].text += out.text
        else:
            merged.append(out)
    return merged


def refresh(path: Path, timeout: int = 1800) -> None:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    problems = apply_policy(nb)
    nbformat.write(nb, path)
    if problems:
        sys.exit(f"{path}: checked cells must print text only:\n  " + "\n  ".join(problems))


def main(argv: list[str]) -> None:
    cmd, *paths = argv
    if cmd == "new":
        import jupytext

        src, dst = map(Path, paths)
        nb = jupytext.read(src, fmt="md:myst" if src.suffix == ".md" else None)
        apply_policy(nb)
        nbformat.write(nb, dst)
        return
    for p in map(Path, paths):
        if cmd == "refresh":
            refresh(p)
        elif cmd == "strip":
            nb = nbformat.read(p, as_version=4)
            problems = apply_policy(nb)
            nbformat.write(nb, p)
            if problems:
                print(f"{p}: {problems}")
        else:
            sys.exit(__doc__)
        print(f"{cmd}: {p}")


if __name__ == "__main__":
    main(sys.argv[1:])
