"""docs/functions.md's `generator` and `sink` sections list every config field with the code's defaults."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from shmfabric.functions.builtin.generator import GeneratorConfig
from shmfabric.functions.builtin.sink import SinkConfig

DOC = (Path(__file__).resolve().parents[2] / "docs" / "functions.md").read_text()


def section(heading: str) -> str:
    start = DOC.index(f"\n## {heading}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end >= 0 else None]


def table_rows(text: str) -> dict[str, list[str]]:
    """The field table's rows: {field: [type, default, ...]} (cells split on unescaped pipes)."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `(\w+)` \|", line)
        if m:
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[m.group(1)] = cells[1:]
    return rows


def _literal(cell: str):
    """A default cell (`1024`, `"10.1.0.0/16"`, `[80, 443]`, `true`, `null`, `zeros`) as a value."""
    v = cell.strip("`")
    try:
        return json.loads(v)
    except ValueError:
        return v


@pytest.mark.parametrize("heading, model", [("`generator`", GeneratorConfig), ("`sink`", SinkConfig)])
def test_every_field_is_in_the_table_with_its_default(heading, model):
    rows = table_rows(section(heading))
    assert set(rows) == set(model.model_fields), "fields missing from or unknown to the docs"
    defaults = model()
    for name, cells in rows.items():
        assert _literal(cells[1]) == getattr(defaults, name), (name, cells[1])


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def test_the_generator_ranges_match_the_model():
    rows = table_rows(section("`generator`"))
    bounds = {}
    for name, f in GeneratorConfig.model_fields.items():
        ge = next((m.ge for m in f.metadata if getattr(m, "ge", None) is not None), None)
        le = next((m.le for m in f.metadata if getattr(m, "le", None) is not None), None)
        bounds[name] = (ge, le)
    for name, (ge, le) in bounds.items():
        allowed = rows[name][2].replace(",", "")
        if ge is not None and le is not None:
            assert f"{_num(ge)}..{_num(le)}" in allowed, (name, allowed)
        elif ge is not None:
            assert f">= {_num(ge)}" in allowed, (name, allowed)


def test_the_yaml_examples_are_the_defaults():
    gen = yaml.safe_load(section("`generator`").split("```yaml", 1)[1].split("```", 1)[0])["nodes"][0]
    assert gen["function"] == "generator"
    assert GeneratorConfig.model_validate(gen["config"]) == GeneratorConfig()
    sink = yaml.safe_load(section("`sink`").split("```yaml", 1)[1].split("```", 1)[0])[0]
    assert SinkConfig.model_validate(sink["config"]) == SinkConfig()
