"""benchmarks/bench_explain.py times every method of the explanation registry, without being told about it."""

import importlib.util
import sys
from pathlib import Path

import explaining_clipviz

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_explain", ROOT / "benchmarks" / "bench_explain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_registry_method_gets_a_row_on_both_backbones():
    bench = load_benchmark()
    for preset, backbone in (("ViT-B/16", "vit"), ("RN50", "resnet")):
        rows = dict(bench.bench(preset, repeats=1, counts=(1, 2), tiny=True))
        for method in explaining_clipviz.methods_for(backbone):
            assert f"explain {method.name}" in rows, (preset, method.name, list(rows))
        for seconds in rows.values():
            assert set(seconds) == {1, 2} and all(value > 0 for value in seconds.values())
        table = bench.format_rows(preset, list(rows.items()), (1, 2))
        assert table.count("\n") == len(rows) + 1  # header, separator, one line per row
