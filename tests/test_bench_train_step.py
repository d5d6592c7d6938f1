"""bench/bench_train_step.py times the networks it names: each step runs the batch norm its row says."""

import torch
import torch.nn.functional as F

from bnlib import torch_bn, torch_bn_fast


def test_each_row_runs_its_own_batch_norm(monkeypatch, load_bench):
    mod = load_bench("bench_train_step")
    calls = dict.fromkeys(("native", "speed path", "readable"), 0)

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(F, "batch_norm", counted("native", F.batch_norm))
    for key, cls in (("speed path", torch_bn_fast.FastBatchNormFunction),
                     ("readable", torch_bn.BatchNormFunctionWithJvp)):
        monkeypatch.setattr(cls, "apply", counted(key, cls.apply))
    expected = {mod.NO_BN: (0, 0, 0), mod.TORCH: (3, 0, 0), mod.BNLIB: (0, 3, 0), mod.READABLE: (0, 0, 3)}
    for name, (step, _, _) in mod._steps().items():
        calls.update(dict.fromkeys(calls, 0))
        step()
        assert tuple(calls.values()) == expected[name], name


def test_reset_restores_the_initial_weights_after_training_steps(load_bench):
    mod = load_bench("bench_train_step")
    for name, (step, reset, model) in mod._steps().items():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        step()
        step()
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()), name  # it trains
        reset()
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), (name, k)


def test_table_reports_every_network(load_bench):
    mod = load_bench("bench_train_step")
    threads = torch.get_num_threads()
    rows = mod.main(quick=True, number=2, repeats=3)
    assert torch.get_num_threads() == threads
    assert [r["name"] for r in rows] == [mod.NO_BN, mod.TORCH, mod.BNLIB, mod.READABLE]
    by_name = {r["name"]: r for r in rows}
    assert by_name[mod.TORCH]["ratio_to_torch"] == 1.0 and by_name[mod.NO_BN]["bn_share_ms"] == 0.0
    assert all(r["steps"] == 2 and r["repeats"] == 3 for r in rows)
    assert all(r["ms_per_step"] > 0 for r in rows)
    table = mod.to_markdown(rows)
    assert all(f"| {r['name']} |" in table for r in rows)
