"""The conda environment.yml, pyproject.toml and uv.lock name the same packages at the same versions."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pyproject_pins() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = data["project"]["dependencies"] + data["dependency-groups"]["dev"]
    pins = {}
    for r in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", r.strip())
        assert m, f"pyproject.toml: {r!r} is not pinned with == (pins keep environment.yml comparable)"
        pins[m[1].lower()] = m[2]
    return pins


def environment_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.fullmatch(r"\s*-\s*([A-Za-z0-9_.\-]+)==(\S+)\s*", line)
        if m:
            pins[m[1].lower()] = m[2]
    return pins


def lock_versions() -> dict[str, str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {p["name"].lower(): p["version"] for p in lock["package"] if "version" in p}


def test_environment_yml_matches_pyproject():
    py, env = pyproject_pins(), environment_pins()
    assert set(env) == set(py), f"only in environment.yml: {set(env) - set(py)}; only in pyproject: {set(py) - set(env)}"
    drift = {k: (env[k], py[k]) for k in py if env[k] != py[k]}
    assert not drift, f"versions differ (environment.yml, pyproject.toml): {drift}"


def test_lock_matches_pyproject():
    lock = lock_versions()
    drift = {k: (v, lock.get(k)) for k, v in pyproject_pins().items() if lock.get(k) != v}
    assert not drift, f"pyproject pins vs uv.lock (run `uv lock`): {drift}"


def test_torch_and_torchvision_import_together():
    import torch
    import torchvision

    assert torch.__version__.split("+")[0] == "2.13.0"
    assert torchvision.__version__.split("+")[0] == "0.28.0"
    # the failure the Makefile's setup comment guards against (uv installs PyPI's matching torch/torchvision pair,
    # not one from pip's configured index): a torchvision whose C++ ops do not match torch fails here
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0]
