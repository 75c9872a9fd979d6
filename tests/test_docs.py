"""docs/configuration.md's table of variables agrees with stepmesh.Config: every variable, its field, its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from stepmesh import Config

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
HEADER = ["variable", "field", "default", "accepted", "StepMesh"]


def _cells(line: str) -> list[str]:
    """The cells of one markdown table row (``\\|`` is a pipe inside a cell)."""
    body = line.strip()
    if not (body.startswith("|") and body.endswith("|")):
        raise ValueError(f"not a table row: {line!r}")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body[1:-1])]


def _table(text: str) -> list[list[str]]:
    """The rows of the one table whose header is exactly ``HEADER``."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().startswith("|") and _cells(line) == HEADER]
    assert len(starts) == 1, f"{DOCS.name} must have exactly one table headed | {' | '.join(HEADER)} |"
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.strip().startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(HEADER), f"a row with {len(cells)} cells: {line!r}"
        rows.append(cells)
    assert set(lines[starts[0] + 1].replace("|", "").strip()) <= set("-: "), "the header is not followed by |---|"
    return rows


def _code(cell: str) -> str:
    """The text of a cell that is one inline code span."""
    m = re.fullmatch(r"`([^`]*)`", cell)
    assert m, f"expected one `code` span, got {cell!r}"
    return m.group(1)


def _literal(text: str) -> Any:
    """A documented default as the Python value it stands for."""
    if text == "none":
        return None
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def _same(documented: Any, actual: Any) -> bool:
    return type(documented) is type(actual) and documented == actual


@pytest.fixture(scope="module")
def documented() -> dict[str, tuple[str, Any]]:
    """variable -> (field, default) as the table says."""
    out: dict[str, tuple[str, Any]] = {}
    for variable, field, default, _accepted, _stepmesh in _table(DOCS.read_text()):
        name = _code(variable)
        assert name not in out, f"{name} is documented twice"
        out[name] = (_code(field), _literal(_code(default)))
    return out


def test_every_config_field_is_in_the_table(documented):
    missing = [f.metadata["name"] for f in dataclasses.fields(Config) if f.metadata["name"] not in documented]
    assert not missing, f"{DOCS.name} has no row for {missing}"


def test_the_table_documents_no_variable_config_does_not_read(documented):
    known = {f.metadata["name"] for f in dataclasses.fields(Config)}
    extra = sorted(set(documented) - known)
    assert not extra, f"{DOCS.name} documents {extra}, which Config does not have"


def test_each_row_names_its_field_and_its_default(documented):
    wrong = []
    for f in dataclasses.fields(Config):
        variable = f.metadata["name"]
        if variable not in documented:
            continue  # reported by test_every_config_field_is_in_the_table
        field, default = documented[variable]
        if field != f.name:
            wrong.append(f"{variable}: documented field {field!r}, Config has {f.name!r}")
        if not _same(default, f.default):
            wrong.append(f"{variable}: documented default {default!r}, Config's is {f.default!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("text", "value"),
    [("none", None), ("false", False), ("true", True), ("60000", 60000), ("-3", -3), ("127.0.0.1", "127.0.0.1"),
     ("group", "group")],
)
def test_defaults_are_read_as_python_literals(text, value):
    assert _same(_literal(text), value)


def test_a_wrong_default_is_caught():
    """The comparison is not vacuous: 2000 is not 2_000.0, '1' is not 1, False is not 0."""
    assert not _same(_literal("2000"), 2000.0)
    assert not _same(_literal("1"), "1")
    assert not _same(_literal("false"), 0)
    assert not _same(_literal("none"), "none")


def test_row_parsing_keeps_escaped_pipes():
    assert _cells(r"| `a` | b \| c | d |") == ["`a`", "b | c", "d"]


USER_DOCS = sorted(DOCS.parent.glob("*.md")) + [DOCS.parent.parent / "README.md"]


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.name)
def test_user_docs_name_no_commit_of_their_own(path: Path) -> None:
    """Which revision measured what belongs in git: user docs say when and on what, not at which commit."""
    found = re.findall(r"\bcommit [0-9a-f]{7,40}\b|\bthis revision\b", path.read_text(), re.IGNORECASE)
    assert not found, f"{path.name} names {found}"
