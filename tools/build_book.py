"""Build the book: offline MathJax, cache invalidation on library changes, warnings as errors.

    python tools/build_book.py                       # the book, into _build/html
    python tools/build_book.py --student             # without solutions, into _build/student/_build/html
    python tools/build_book.py --only chapters/03_bn_backward   # one chapter (plus the landing page), in /tmp

jupyter-cache keys a notebook on its code cells only, so editing ``bnlib/*.py``, ``bench/*.py`` or the lock
file would not re-execute anything. This wrapper hashes those files (names and contents, not mtimes) and the CPU code-path
variables (``CPU_CODE_PATH_VARS``) and, when the hash changed since the last build, clears the execution cache
and re-executes every chapter.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATHJAX = "mathjax@3.2.2"
# MathJax 3 loads fonts and TeX extensions relative to its script: keep its es5/ layout.
MATHJAX_KEEP = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "ui", "a11y")
VENDOR = ROOT / "_vendor" / "_static" / "mathjax"  # copied to _build/html/_static/mathjax via html_extra_path
# Environment variables that move torch, MKL, oneDNN or OpenBLAS to another CPU code path (the Makefile's
# OTHER_CPU sets them; CONTRIBUTING.md, "Portable outputs"). Executions on different paths never share a cache.
CPU_CODE_PATH_VARS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE")
# Set to "student" for the student edition; read by tools/sphinx_bnlib.py (no second copy of _config.yml).
STUDENT_ENV = "BNLIB_EDITION"


def vendor_mathjax() -> None:
    """Unpack MathJax from the npm registry into _vendor/ once (about 3 MB; not committed)."""
    if (VENDOR / "tex-chtml.js").is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", MATHJAX, "--silent", "--fetch-retries=1"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
        with tarfile.open(next(Path(tmp).glob("mathjax-*.tgz"))) as tar:
            members = [m for m in tar.getmembers()
                       if any(m.name.startswith(f"package/es5/{k}") for k in MATHJAX_KEEP)]
            tar.extractall(tmp, members=members, filter="data")
        if VENDOR.exists():
            shutil.rmtree(VENDOR)
        VENDOR.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(Path(tmp) / "package" / "es5", VENDOR)
    print(f"MathJax {MATHJAX} vendored into {VENDOR.relative_to(ROOT)}")


def library_hash() -> str:
    """Hash of everything the notebooks import or run that jupyter-cache cannot see."""
    h = hashlib.sha256()
    files = sorted([*ROOT.glob("bnlib/**/*.py"), *ROOT.glob("bench/*.py"), ROOT / "uv.lock"])
    for f in files:  # names and contents only: a `git checkout` or `touch` that changes no byte re-executes nothing
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    h.update(repr([(k, os.environ.get(k)) for k in CPU_CODE_PATH_VARS]).encode())  # another code path re-executes
    return h.hexdigest()


def jb(args: list[str], env: dict[str, str] | None = None) -> int:
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe), "build", str(ROOT), "--builder", "html", "-W", "-n", "--keep-going", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", action="store_true", help="hide solutions (student edition)")
    p.add_argument("--only", metavar="CHAPTER", help="build one chapter, e.g. chapters/03_bn_backward")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    vendor_mathjax()
    extra: list[str] = []
    env = dict(os.environ)
    out = ROOT  # jupyter-book writes to <out>/_build/html
    tmpdir = Path(tempfile.mkdtemp(prefix="bnbook-"))
    if a.only:
        name = a.only.removesuffix(".ipynb")
        toc = tmpdir / "_toc.yml"
        toc.write_text(f"format: jb-book\nroot: {name}\nchapters:\n  - file: chapters/references\n")
        out = Path(tempfile.gettempdir()) / ("bnbook-only-" + Path(name).name)
        extra += ["--toc", str(toc)]
    if a.student:
        # _config.yml is not rewritten: tools/sphinx_bnlib.py reads STUDENT_ENV, hides the solutions and reuses the
        # main build's execution cache (the student edition differs in rendering only).
        env[STUDENT_ENV] = "student"
        out = ROOT / "_build" / "student"
    stamp = (ROOT if a.student else out) / "_build" / ".library-hash"
    digest = library_hash()
    if not stamp.is_file() or stamp.read_text() != digest:
        shutil.rmtree(stamp.parent / ".jupyter_cache", ignore_errors=True)
        if stamp.parent.exists():
            print("bnlib, bench/, uv.lock or the CPU code path changed: execution cache cleared, re-executing every chapter")
            extra.append("--all")
    rc = jb([*extra, "--path-output", str(out)], env)
    if rc == 0:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)
        print(f"Book built in {time.perf_counter() - t0:.0f} s: {out / '_build' / 'html' / 'index.html'}")
    shutil.rmtree(tmpdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
