"""The README's Python snippets run as written, from the repository root, offline, and print what the README says
they print (the ```text block right after each snippet); every Markdown table renders (same cell count per row)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
EXAMPLES = re.findall(r"```python\n(.*?)```\s*```text\n(.*?)```", README, flags=re.DOTALL)  # (code, output)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
FLOAT_TOLERANCE = 2e-3  # printed probabilities have 4 decimals; CPU kernels may move the last one


def printed_matches(actual: str, expected: str) -> str | None:
    """None when ``actual`` prints what ``expected`` shows: the same text and integers (shapes, sizes) exactly,
    decimals within FLOAT_TOLERANCE; otherwise what differs."""
    words_actual, words_expected = NUMBER.split(actual.strip()), NUMBER.split(expected.strip())
    if [" ".join(w.split()) for w in words_actual] != [" ".join(w.split()) for w in words_expected]:
        return f"text differs:\n{actual}\nexpected:\n{expected}"
    for got, want in zip(NUMBER.findall(actual), NUMBER.findall(expected), strict=True):
        exact = not re.search(r"[.eE]", want)
        if (got != want) if exact else not math.isclose(float(got), float(want), abs_tol=FLOAT_TOLERANCE):
            return f"{got} where the README shows {want}:\n{actual}"
    return None


def test_readme_has_snippets_each_followed_by_its_output():
    assert len(SNIPPETS) >= 3
    assert [code for code, _ in EXAMPLES] == SNIPPETS, "every ```python block is followed by a ```text block"


def test_printed_output_check_compares_shapes_exactly_and_decimals_with_tolerance():
    shown = "tensor([[0.9244, 0.0756]])\ntorch.Size([1, 2, 65, 65])"
    assert printed_matches("tensor([[0.9251, 0.0749]])\ntorch.Size([1, 2, 65, 65])\n", shown) is None
    assert "0.9344" in printed_matches("tensor([[0.9344, 0.0656]])\ntorch.Size([1, 2, 65, 65])", shown)
    assert "64" in printed_matches("tensor([[0.9244, 0.0756]])\ntorch.Size([1, 2, 64, 65])", shown)
    assert "text differs" in printed_matches("tensor([[0.9244, 0.0756]])", shown)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_snippet_prints_what_the_readme_shows(index, tmp_path):
    code, expected = EXAMPLES[index]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed_matches(result.stdout, expected) is None, printed_matches(result.stdout, expected)


def table_cell_counts(markdown: str) -> list[tuple[int, list[int]]]:
    """(first line number, cells per row) for each table outside code fences; ``\\|`` is not a cell border."""
    tables, fenced, current = [], False, None
    for number, line in enumerate(markdown.splitlines(), start=1):
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("|"):
            if current is None:
                current = (number, [])
                tables.append(current)
            current[1].append(len(re.split(r"(?<!\\)\|", line.strip().strip("|"))))
        else:
            current = None
    return tables


def test_table_check_sees_a_separator_with_one_cell_too_many():
    assert table_cell_counts("| a | b |\n|---|---|---|\n| 1 | 2 |\n") == [(1, [2, 3, 2])]


@pytest.mark.parametrize("path", ["README.md", "space/README.md"])
def test_every_table_has_as_many_cells_in_each_row_as_in_its_header(path):
    tables = table_cell_counts((ROOT / path).read_text())
    assert tables, f"{path} has tables"
    broken = [(line, counts) for line, counts in tables if len(set(counts)) != 1]
    assert not broken, f"{path}: tables whose rows differ in cell count (line, counts): {broken}"
