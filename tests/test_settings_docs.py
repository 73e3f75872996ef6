"""docs/configuration.md's settings table is the one the settings classes generate."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic.fields import FieldInfo

from gpuserve import settings_docs
from gpuserve.config import ModelSettings, RaySettings, Settings

from .helpers import ROOT

PAGE = ROOT / "docs" / "configuration.md"


def test_the_configuration_page_holds_the_generated_table() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert settings_docs.rewrite(text) == text, "run `make docs` and commit the page"


def test_every_setting_has_a_row_with_its_environment_variable() -> None:
    table = settings_docs.table()
    keys = [n for n in Settings.model_fields if n not in ("model", "ray")]
    keys += [f"model.{n}" for n in ModelSettings.model_fields]
    keys += [f"ray.{n}" for n in RaySettings.model_fields]
    for key in keys:
        env = "GPUSERVE_" + key.upper().replace(".", "__")
        assert f"| `{key}` |" in table and f"`{env}`" in table, key


def test_a_row_names_the_flag_that_sets_it() -> None:
    rows = {line.split(" | ")[0]: line for line in settings_docs.table().splitlines()}
    assert "`--port` / `GPUSERVE_PORT`" in rows["| `port`"]
    assert "`--model` / `GPUSERVE_MODEL__PATH`" in rows["| `model.path`"]
    assert "`--config` / `GPUSERVE_CONFIG_FILE`" in rows["| `config_file`"]
    assert "--" not in rows["| `engine`"]  # no flag: the environment or the file only


def test_a_setting_without_a_description_cannot_be_documented() -> None:
    with pytest.raises(ValueError, match="needs a description"):
        settings_docs._text(FieldInfo(annotation=int, default=1))


def test_an_out_of_date_page_is_refused_by_check_and_rewritten(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    stale = f"intro\n\n{settings_docs.BEGIN}\n| old | table |\n{settings_docs.END}\n\nafter\n"
    page.write_text(stale, encoding="utf-8")
    assert settings_docs.main(["--check", str(page)]) == 1
    assert page.read_text(encoding="utf-8") == stale  # --check changes nothing
    assert settings_docs.main([str(page)]) == 0
    written = page.read_text(encoding="utf-8")
    assert written.startswith("intro\n\n") and written.endswith("\n\nafter\n")
    assert "| `model.max_batch_size` |" in written and "| old | table |" not in written
    assert settings_docs.main(["--check", str(page)]) == 0
