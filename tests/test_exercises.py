"""bnlib.exercises: the package exports every checker its chapter modules define (the harness and each
chapter's checkers are tested in test_exercises_chNN.py)."""


def test_every_exercise_checker_is_exported():
    import importlib
    import pkgutil

    import bnlib.exercises as ex

    found = set()
    for mod in pkgutil.iter_modules(ex.__path__):
        m = importlib.import_module(f"bnlib.exercises.{mod.name}")
        found |= {n for n in getattr(m, "__all__", []) if n.startswith("check_")}
    assert found == set(ex.__all__)
    assert all(callable(getattr(ex, n)) for n in ex.__all__)
