"""The portability check of `make test` (CONTRIBUTING.md, "Portable outputs") really runs on another code path.

`make test` executes every chapter with nbval under the Makefile's OTHER_CPU variables, while the committed
outputs were produced on the machine's own code path. These tests prove the variables are the ones the book
build knows about, and that they move the arithmetic: torch's kernels report another capability, and float32
results of torch's and NumPy's kernels change in their last bits.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_book", ROOT / "tools" / "build_book.py")
build_book = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_book)

PROBE = """
import hashlib, json
import numpy as np, torch
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x, w = torch.randn(60, 784, generator=g), torch.randn(100, 784, generator=g)
xc, wc = torch.randn(8, 32, 26, 26, generator=g), torch.randn(64, 32, 3, 3, generator=g)
a = np.random.default_rng(0).standard_normal((60, 784)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((784, 100)).astype(np.float32)
digest = lambda t: hashlib.sha256(np.ascontiguousarray(np.asarray(t)).tobytes()).hexdigest()
print(json.dumps({
    "capability": torch.backends.cpu.get_cpu_capability(),
    "torch sum": digest(x.sum(0)), "torch mm": digest(x @ w.T),
    "conv2d": digest(torch.nn.functional.conv2d(xc, wc)), "numpy matmul": digest(a @ b),
}))
"""


def other_cpu() -> dict[str, str]:
    m = re.search(r"^OTHER_CPU := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile: OTHER_CPU not found"
    return dict(kv.split("=", 1) for kv in m[1].split())


def probe(env_update: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in build_book.CPU_CODE_PATH_VARS}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **env_update}, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout)


def test_makefile_and_book_build_name_the_same_variables():
    assert sorted(other_cpu()) == sorted(build_book.CPU_CODE_PATH_VARS)


def test_other_code_path_changes_the_arithmetic():
    native, other = probe({}), probe(other_cpu())
    assert other["capability"] == "DEFAULT", other["capability"]
    changed = [k for k in native if k != "capability" and native[k] != other[k]]
    # torch's own reductions always take another path under ATEN_CPU_CAPABILITY=default (unless this machine
    # has no vector unit at all); MKL, oneDNN and OpenBLAS change where the machine has more than AVX2.
    assert "torch sum" in changed or native["capability"] == "DEFAULT", (native, other)
    print("changed on the other path:", changed)
