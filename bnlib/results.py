"""Committed results of runs too long for a chapter: JSON files under ``results/`` that record their provenance.

A chapter may show numbers from such a file only if the file says how it was made (the command, the commit, the
CPU, the date, the library versions, the wall time), the chapter says so next to the table, and a test re-runs a
small slice of the same command and checks it against the file within the seed spread.

Layout of a file::

    {"provenance": {"command": "python -m bnlib figure1-grid ...", "commit": "237b4dc", "dirty": false,
                    "cpu": "AMD EPYC ...", "threads": 1, "date": "2026-12-02T11:03:12+00:00",
                    "python": "3.12.3", "torch": "2.13.0", "numpy": "2.3.1", "seconds": 1234.5},
     "results": {...}}

Defined in: chapters/07_mnist.ipynb
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["RESULTS_DIR", "provenance", "save_results", "load_results"]

#: Where the committed result files live (the repository's ``results/`` folder).
RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=RESULTS_DIR.parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _snapshot() -> dict:
    return {"commit": _git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


#: The commit when this module was first imported: ``python -m bnlib`` imports it before a run starts, so a run
#: that takes an hour records the code it started from, not a commit made while it ran.
_START = _snapshot()


def provenance(command: str, seconds: float, threads: int) -> dict:
    """What made a result: ``command``, git commit at the start of the run (and whether tracked files had
    uncommitted changes then), CPU, date, versions.

    Defined in: chapters/07_mnist.ipynb
    """
    import numpy
    import torch

    return {
        "command": command,
        "commit": _START["commit"],
        "dirty": _START["dirty"],
        "cpu": _cpu_name(),
        "threads": int(threads),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "seconds": round(float(seconds), 1),
    }


def save_results(path: str | Path, results: dict, command: str | None = None, seconds: float = 0.0,
                 threads: int = 1) -> Path:
    """Write ``{"provenance": ..., "results": results}`` to ``path`` (JSON, indented); return the path.

    ``command`` defaults to the command line of this process (``python -m bnlib ...``).

    Defined in: chapters/07_mnist.ipynb
    """
    if command is None:
        command = "python -m bnlib " + " ".join(sys.argv[1:])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"provenance": provenance(command, seconds, threads), "results": results}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_results(name: str | Path) -> dict:
    """Read a committed result file: ``name`` is a path or a file name under :data:`RESULTS_DIR`.

    Returns the whole document (``doc["provenance"]``, ``doc["results"]``). A missing file raises
    ``FileNotFoundError`` with the command that makes it, when the file name is a known one.

    Defined in: chapters/07_mnist.ipynb
    """
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = RESULTS_DIR / path
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: it is committed with the repository; regenerate it with the "
                                f"command in the chapter that uses it (python -m bnlib --help lists them)")
    doc = json.loads(path.read_text())
    if "provenance" not in doc or "results" not in doc:
        raise ValueError(f"{path} is not a results file (it needs 'provenance' and 'results')")
    return doc
