"""The committed result files under results/: provenance, and a short slice of each command re-run against them.

Chapter 7 shows numbers from these files. Each test here re-runs the beginning of the command that made a file
(the same seeds, the same code) and checks the overlap against the file within the spread over seeds: on the
machine that made the file the slice reproduces it up to float32 rounding; on another CPU, rounding moves a
trajectory by much less than the seed spread.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnlib import mnist
from bnlib.__main__ import main
from bnlib.results import RESULTS_DIR, load_results

FILES = {"figure1_grid.json": "figure1-grid", "figure1.json": "figure1", "cnn.json": "cnn", "lenet.json": "lenet",
         "ddp.json": "ddp"}


def _tolerance(values) -> float:
    """Three standard deviations over seeds, and never below 0.01 (one accuracy on 2,000 images: se ~ 0.005)."""
    return max(3 * float(np.std(values)), 0.01)


@pytest.mark.parametrize("name", sorted(FILES))
def test_result_file_records_its_provenance(name):
    doc = load_results(name)
    prov = doc["provenance"]
    assert prov["command"].startswith(f"python -m bnlib {FILES[name]}")
    assert prov["commit"] not in ("", "unknown")
    for key in ("cpu", "date", "torch", "numpy", "python", "seconds", "threads"):
        assert prov[key] not in (None, ""), key
    assert (RESULTS_DIR / name).stat().st_size < 2_000_000  # small enough to commit


def test_load_results_says_what_to_do_when_a_file_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="regenerate it with the command"):
        load_results(tmp_path / "nothing.json")
    (tmp_path / "plain.json").write_text("{}")
    with pytest.raises(ValueError, match="not a results file"):
        load_results(tmp_path / "plain.json")


def _run(argv, tmp_path) -> dict:
    out = tmp_path / "slice.json"
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    return json.loads(out.read_text())["results"]


def test_figure1_file_is_made_by_the_code_defaults_and_its_first_steps_reproduce(tmp_path):
    file = load_results("figure1.json")["results"]
    defaults = mnist.Figure1Config().as_dict()
    for key in ("init_std", "lr", "threshold", "batch_size", "sizes", "eps", "momentum"):
        assert file["config"][key] == defaults[key], key
    live = _run(["figure1", "--steps", "1000", "--eval-every", "1000", "--seeds", *map(str, file["seeds"])],
                tmp_path)
    for key in ("baseline", "bn"):
        f = np.array(file[key]["test_accuracy"])[:, file[key]["steps"].index(1000)]
        g = np.array(live[key]["test_accuracy"])[:, 1]
        assert abs(g.mean() - f.mean()) <= _tolerance(f), (key, f, g)


def test_figure1_grid_file_chooses_the_default_setting_and_its_first_steps_reproduce(tmp_path):
    grid = load_results("figure1_grid.json")["results"]
    best = grid["cells"][grid["best"]]
    assert min(c["rms_to_paper"] for c in grid["cells"]) == best["rms_to_paper"]
    cfg = mnist.Figure1Config()
    assert (cfg.init_std, cfg.lr) == (best["init_std"], best["lr"])
    # two cells of the grid: the chosen one and the opposite corner
    corner = grid["cells"][-1] if grid["best"] != len(grid["cells"]) - 1 else grid["cells"][0]
    step = 500
    for cell in (best, corner):
        live = _run(["figure1-grid", "--steps", str(step), "--eval-every", str(step), "--init-stds",
                     str(cell["init_std"]), "--lrs", str(cell["lr"]), "--seeds", *map(str, grid["seeds"])], tmp_path)
        (live_cell,) = live["cells"]
        for key in ("baseline", "bn"):
            f = np.array(cell[key]["test_accuracy"])[:, grid["steps"].index(step)]
            g = np.array(live_cell[key]["test_accuracy"])[:, 1]
            assert abs(g.mean() - f.mean()) <= _tolerance(f), (cell["init_std"], cell["lr"], key, f, g)


def test_cnn_file_first_epoch_reproduces(tmp_path):
    file = load_results("cnn.json")["results"]
    seed = file["config"]["seeds"][0]
    live = _run(["cnn", "--parts", "curves", "--epochs", "1", "--seeds", str(seed)], tmp_path)
    for key in ("baseline", "bn"):
        all_seeds = [h["test_accuracy"][0] for h in file[key]]
        assert abs(live[key][0]["test_accuracy"][0] - all_seeds[0]) <= _tolerance(all_seeds), (key, all_seeds)


def test_lenet_file_first_epoch_reproduces(tmp_path):
    file = load_results("lenet.json")["results"]
    seed = file["config"]["seeds"][0]
    live = _run(["lenet", "--epochs", "1", "--seeds", str(seed)], tmp_path)
    for key in ("baseline", "bn"):
        all_seeds = [h["test_accuracy"][0] for h in file[key]]
        assert abs(live[key][0]["test_accuracy"][0] - all_seeds[0]) <= _tolerance(all_seeds), (key, all_seeds)


def test_ddp_file_is_made_by_the_code_defaults_and_its_first_steps_reproduce(tmp_path):
    from bnlib.ddp import WorkersConfig

    file = load_results("ddp.json")["results"]
    assert file["config"] == WorkersConfig().as_dict()
    step, seed = file["steps"][0], file["config"]["seeds"][0]
    # one process and four real processes (gloo), both BN kinds, the first checkpoint of the first seed
    live = _run(["ddp", "--workers", "1", "4", "--seeds", str(seed), "--steps", str(step), "--eval-every",
                 str(step)], tmp_path)
    rows = {(r["workers"], r["bn"]): r["test_accuracy"] for r in file["rows"]}
    assert len(live["rows"]) == 3
    for r in live["rows"]:
        all_seeds = [curve[0] for curve in rows[r["workers"], r["bn"]]]
        got = r["test_accuracy"][0][0]
        assert abs(got - all_seeds[0]) <= _tolerance(all_seeds), (r["workers"], r["bn"], all_seeds, got)
