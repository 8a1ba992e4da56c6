"""The data dictionary lists every declared column, in CSV and Markdown."""

from __future__ import annotations

import csv
import re

import pytest

from cacflow import dictionary, tables


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return dictionary.write_data_dictionary(tmp_path_factory.mktemp("dictionary"))


def declared() -> list[tuple[str, str]]:
    return [(name, c.name) for name, cols in tables.TABLES.items() for c in cols]


def test_csv_has_every_column_of_every_table(written):
    csv_path, _ = written
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == dictionary.CSV_FIELDS
        rows = list(reader)
    assert [(r["table"], r["column"]) for r in rows] == declared()
    by_key = {(r["table"], r["column"]): r for r in rows}
    assert by_key[("scans", "agatston_total")]["type"] == "float64"
    assert by_key[("scans", "agatston_total")]["unit"] == "Agatston units"
    assert by_key[("scans", "processed_at")]["type"] == "timestamp[us] (UTC)"
    assert by_key[("scans", "risk_category")]["allowed_values"] == "0; 1-10; 11-100; 101-400; >400"
    assert by_key[("lesions", "density_weight")]["type"] == "int8"
    assert all(r["definition"] for r in rows)


def test_markdown_has_a_section_per_table_with_every_column(written):
    _, md_path = written
    text = md_path.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    found = []
    for section in sections:
        heading = section.splitlines()[0]
        match = re.fullmatch(r"Table `(\w+)`", heading)
        if match:
            table_rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
            found += [(match.group(1), row.split("|")[1].strip()) for row in table_rows]
    assert found == declared()
    assert "## Definitions" in text


def test_markdown_table_cells_survive_pipes_in_text(written):
    _, md_path = written
    for line in md_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("| "):
            # Five columns -> six unescaped pipes per row.
            assert len(re.findall(r"(?<!\\)\|", line)) == 6, line


def test_every_definitions_reference_resolves():
    referenced = {
        ref
        for cols in tables.TABLES.values()
        for c in cols
        for ref in re.findall(r"See Definitions: ([A-Za-z -]+?)\.", c.definition)
    }
    assert referenced, "columns are expected to point to the method definitions"
    assert referenced <= set(dictionary.DEFINITIONS)


def test_method_definitions_state_the_numbers_a_methods_section_needs():
    d = dictionary.DEFINITIONS
    for fact in ("130 HU", "8-connected", "1 mm^2", "slice increment / 3 mm", "peak >= 400 -> 4"):
        assert fact in d["Agatston score"]
    assert "A3 = 300 or more" in d["CAC-DRS"]
    assert "upper-inclusive" in d["Risk category"]
    assert d["Mass score"] == dictionary.MASS_SCORE_DEFINITION


def test_text_is_ascii_for_stata_and_spreadsheets(written):
    for path in written:
        path.read_text(encoding="utf-8").encode("ascii")
