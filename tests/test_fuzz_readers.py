"""A fast subset of the reader fuzzing of benchmarks/fuzz_readers.py: hypothesis draws
(reader, mutation seed) pairs, each case mutates that reader's seed file and the reader
must succeed or refuse with one of our one-line errors, within the memory bound; a few
full loads (compressed directory, offload directory, GGUF through the native decoder and
through transformers; forwards through the kernels) on fixed mutations. The benchmark runs the same harness over 100,000 cases in
worker processes (crashes in C isolated there; here pytest's faulthandler reports them)."""

from __future__ import annotations

import importlib.util
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    if "fuzz_readers" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fuzz_readers", ROOT / "benchmarks" / "fuzz_readers.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fuzz_readers"] = module
        spec.loader.exec_module(module)
    return sys.modules["fuzz_readers"]


# Every reader the benchmark fuzzes, so a new target entry is tested here too.
FAST = tuple(n for n, t in _harness().TARGETS.items() if not t.full_load)
FULL = tuple(n for n, t in _harness().TARGETS.items() if t.full_load)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    harness = _harness()
    root = tmp_path_factory.mktemp("fuzz")
    (root / "seeds").mkdir()
    seeds = harness.Seeds(root / "seeds")
    for name in seeds.paths:          # imports and one-time caches out of the measured cases
        for path in seeds.inputs_of(name):
            harness.TARGETS[name].read(path)
    tracemalloc.start()
    yield harness, seeds, root
    tracemalloc.stop()


def _check(harness, seeds, root, name: str, case_seed: int) -> dict:
    path, size, file = harness.make_case(seeds, name, case_seed, root / "work")
    outcome = harness.run_case(name, path, size)
    assert outcome["status"] in ("ok", "refused"), (name, case_seed, file, outcome.get("detail"),
                                                    outcome.get("traceback"))
    return outcome


def test_seeds_are_read_without_error(fuzz):
    harness, seeds, root = fuzz
    for name in harness.TARGETS:
        for path in seeds.inputs_of(name):
            harness.TARGETS[name].read(path)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(FAST), case_seed=st.integers(0, 2**62))
def test_mutated_files_are_read_or_refused_in_one_line(fuzz, name, case_seed):
    _check(*fuzz, name, case_seed)


@pytest.mark.parametrize("name", FULL)
def test_full_loads_of_mutated_files(fuzz, name):
    harness, seeds, root = fuzz
    outcomes = [_check(harness, seeds, root, name, seed) for seed in range(3)]
    assert any(o["status"] == "refused" for o in outcomes)


def test_every_mutation_kind_changes_the_file(fuzz):
    """The mutators do mutate (a harness that hands back its seed would test nothing)."""
    harness, seeds, root = fuzz
    changed = 0
    for name in FAST:
        for case_seed in range(20):
            path, _, file = harness.make_case(seeds, name, case_seed, root / "work")
            original = seeds.seed_bytes(name, next(p for p in seeds.files_of(name) if p.name == file))
            mutated = (path if path.is_file() else path / file).read_bytes()
            changed += mutated != original
    assert changed >= 0.9 * 20 * len(FAST)
