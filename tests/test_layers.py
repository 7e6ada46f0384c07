"""The code's layers point one way: the `clipviz` package never reaches up to a top-level script, its modules import
each other without a cycle, and the converter's command line answers --help and argument errors without torch.

The import graph is read from the source (every `import`, also those inside functions, which are run only when
the function is), then one fresh interpreter imports the whole package to check what really gets loaded.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clipviz"
# Root files named *_clipviz.py are the Hub remote code (the model itself): the package builds on them. Every other
# top-level module is a script or a folder of scripts (the converter's command line, tests, benchmarks, the Space).
REMOTE_CODE = {path.stem for path in ROOT.glob("*_clipviz.py")}
TOP_LEVEL = {path.stem for path in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
SCRIPTS = TOP_LEVEL - REMOTE_CODE - {"clipviz"}


def package_files() -> dict[str, Path]:
    """`clipviz` (its `__init__.py`) and each of its modules, by module name."""
    return {
        "clipviz" if path.stem == "__init__" else f"clipviz.{path.stem}": path for path in sorted(PACKAGE.glob("*.py"))
    }


def imported_names(path: Path, optional: bool = True) -> set[str]:
    """Every module a file imports, anywhere in it (`from clipviz import verify` counts as `clipviz.verify`);
    with `optional=False`, not those inside a `try` that catches ImportError (an optional extra)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = (
        set()
        if optional
        else {id(node) for guard in ast.walk(tree) if catches_import_error(guard) for node in ast.walk(guard)}
    )
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def catches_import_error(node: ast.AST) -> bool:
    caught = {"ImportError", "ModuleNotFoundError"}
    return isinstance(node, ast.Try) and any(
        isinstance(handler.type, ast.Name)
        and handler.type.id in caught
        or isinstance(handler.type, ast.Tuple)
        and any(getattr(item, "id", None) in caught for item in handler.type.elts)
        for handler in node.handlers
    )


def test_the_package_never_imports_a_script():
    assert "convert_weights" in SCRIPTS and "modeling_clipviz" in REMOTE_CODE  # what the rule is about
    offending = {
        module: sorted(name for name in imported_names(path) if name.split(".")[0] in SCRIPTS)
        for module, path in package_files().items()
    }
    assert not {module: names for module, names in offending.items() if names}


def test_the_remote_code_never_imports_the_package():
    """The Hub remote code ships alone: it imports only torch, transformers and the standard library; anything else
    is an optional extra, imported inside a `try` that catches ImportError (`model.overlay` uses `clipviz.rendering`)."""
    offending = {
        name: sorted(
            module
            for module in imported_names(ROOT / f"{name}.py", optional=False)
            if module.split(".")[0] in SCRIPTS | {"clipviz"}
        )
        for name in REMOTE_CODE
    }
    assert not {name: modules for name, modules in offending.items() if modules}


def test_package_imports_have_no_cycle():
    modules = package_files()
    graph = {module: sorted(set(imported_names(path)) & set(modules) - {"clipviz"}) for module, path in modules.items()}
    assert graph["clipviz.convert"]  # the graph is read: the pipeline imports its parts
    done, path = set(), []

    def visit(module: str) -> None:  # depth-first; meeting a module that is still on the path closes a cycle
        if module in path:
            pytest.fail(f"import cycle: {' -> '.join(path[path.index(module) :] + [module])}")
        if module in done:
            return
        path.append(module)
        for name in graph[module]:
            visit(name)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_importing_the_package_loads_no_script():
    """What Python really loads for all of `clipviz` (dynamic imports included): nothing from the repository but the
    package and the remote code."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(package_files())!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({name: getattr(module, '__file__', None) for name, module in sys.modules.items()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout.splitlines()[-1])
    installed = Path(sys.prefix)  # CI's virtual environment lives inside the checkout: its packages are not ours
    from_repo = {
        name: Path(file)
        for name, file in loaded.items()
        if file and Path(file).is_relative_to(ROOT) and not Path(file).is_relative_to(installed)
    }
    assert set(package_files()) <= set(from_repo)
    strays = {
        name
        for name, file in from_repo.items()
        if file.parent != PACKAGE and not (file.parent == ROOT and file.stem in REMOTE_CODE)
    }
    assert not strays


# ---- the command line answers at once ----

NO_TORCH = (
    "import runpy, sys\n"
    "sys.modules['torch'] = sys.modules['transformers'] = None  # importing either now raises ImportError\n"
    "sys.argv = ['convert_weights.py', *sys.argv[1:]]\n"
    "runpy.run_path('convert_weights.py', run_name='__main__')\n"
)


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_cli_help_and_argument_errors_need_no_torch():
    help_ = run_without_torch("--help")
    assert help_.returncode == 0 and "usage: clipviz-convert" in help_.stdout and "examples:" in help_.stdout
    assert not help_.stderr
    cases = {
        ("model.pt", "--output-dir", "out", "--dtype", "fp64"): "error: argument --dtype: invalid choice: 'fp64'",
        ("model.pt", "--output-dir", "out", "--text-heads", "0"): "error: argument --text-heads: must be a positive",
        ("--output-dir", "out"): "error: give either a SOURCE or --model NAME (exactly one)",
        ("model.pt",): "error: the following arguments are required: --output-dir",
        ("model.pt", "--output-dir", "out", "--max-shard-size", "3XB"): "error: --max-shard-size must look like 500MB",
        ("model.pt", "--output-dir", "out", "--max-shard-size", "10B"): "error: --max-shard-size 10B is 10 bytes",
    }
    for args, message in cases.items():
        done = run_without_torch(*args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


def test_cli_checks_the_shard_size_after_the_other_flags(capsys):
    from convert_weights import main

    with pytest.raises(SystemExit) as exit_info:
        main(["model.pt", "--output-dir", "out", "--max-shard-size", "3XB"])
    assert exit_info.value.code == 2
    assert "error: --max-shard-size must look like 500MB, 2GB or 1GiB, got '3XB'." in capsys.readouterr().err


def test_the_flags_offer_what_the_pipeline_takes():
    """The command line's choices live in torch-free `clipviz.convert_options`; they must be the pipeline's."""
    from clipviz import hub_repo, sources
    from clipviz.convert_options import OUTPUT_DTYPES, SOURCE_FORMATS

    assert set(OUTPUT_DTYPES) == set(hub_repo.DTYPES) and sources.SOURCE_FORMATS is SOURCE_FORMATS
