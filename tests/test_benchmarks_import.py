"""Every benchmark under launch/bench imports against today's framework and recipes and parses its options.

The benchmarks print figures and are never timed in tests; what breaks them silently is a renamed module or field
(framework.tracking.StepWindow moved once and benchmark_vs_blip followed). Importing each and asking for --help
catches that in the fast tier at the cost of an import.
"""
import importlib.util
import sys

import pytest

from tests.conftest import ROOT

BENCHMARKS = sorted(p.stem for p in (ROOT / "launch" / "bench").glob("*.py"))


def test_the_benchmarks_are_all_here():
    assert {"benchmark", "benchmark_vs_blip", "benchmark_psd", "benchmark_data", "capfilt_cost",
            "stress_checkpoints"} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_a_benchmark_imports_and_parses_its_options(name, capsys):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "launch" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # its imports of framework/ and recipes/ resolve
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--" in out  # argparse's usage with the benchmark's own options
