"""Settings are declared once, in config.py: `.env.example` and docs/configuration.md's tables
are what `regcache config-docs` writes from those declarations, and nothing else names a default."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from regcache_core.cli import main
from regcache_core.commands.config_docs import CONFIGURATION_DOC, ENV_EXAMPLE, env_example, with_tables
from regcache_core.config import DEFAULTS, REGISTRY_SETTINGS, SETTINGS, Config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_env_example_is_what_config_docs_writes():
    assert (REPO / ENV_EXAMPLE).read_text() == env_example(), "run `regcache config-docs` and commit .env.example"


def test_the_configuration_tables_are_what_config_docs_writes():
    document = (REPO / CONFIGURATION_DOC).read_text()
    assert document == with_tables(document), "run `regcache config-docs` and commit docs/configuration.md"


def test_every_setting_is_in_the_tables_once():
    document = (REPO / CONFIGURATION_DOC).read_text()
    for name in [s.name for s in SETTINGS] + [f"K_{s.name}" for s in REGISTRY_SETTINGS]:
        assert document.count(f"| `{name}` |") == 1, name


def test_each_setting_is_declared_once_and_its_default_parses():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names)) and len(REGISTRY_SETTINGS) == len({s.name for s in REGISTRY_SETTINGS})
    assert set(DEFAULTS) >= set(names)
    parse_config(DEFAULTS)  # every declared default is a good value


def test_config_has_no_defaults_of_its_own():
    """A default lives in its declaration only: Config's fields all come from parse_config."""
    missing = dataclasses.MISSING
    assert all(f.default is missing and f.default_factory is missing for f in dataclasses.fields(Config))


def test_check_names_a_file_out_of_date_and_writing_mends_it(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / CONFIGURATION_DOC, tmp_path / CONFIGURATION_DOC)
    (tmp_path / ENV_EXAMPLE).write_text("REGCACHE_PORT=5000\n")
    assert main(["config-docs", "--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert ".env.example: out of date" in out and "configuration.md" not in out
    assert (tmp_path / ENV_EXAMPLE).read_text() == "REGCACHE_PORT=5000\n"  # --check writes nothing
    assert main(["config-docs", "--root", str(tmp_path)]) == 0
    assert main(["config-docs", "--check", "--root", str(tmp_path)]) == 0
    assert (tmp_path / ENV_EXAMPLE).read_text() == env_example()


def test_a_document_without_the_markers_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / CONFIGURATION_DOC).write_text("# Configuration\n")
    assert main(["config-docs", "--check", "--root", str(tmp_path)]) == 2
    assert "configuration.md: no '<!-- settings" in capsys.readouterr().err
