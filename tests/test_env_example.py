"""`.env.example` is what users copy: it must load as it is and document every variable (it is
written from the settings config.py declares: see test_config_docs.py)."""

from pathlib import Path

from regcache_core.config import DEFAULTS, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"


def test_env_example_loads_and_gives_the_three_registries():
    config = load_config(environ={}, env_file=EXAMPLE)
    assert [r.name for r in config.registries] == ["docker.io", "ghcr.io", "quay.io"]


def test_env_example_documents_every_variable():
    text = EXAMPLE.read_text()
    for variable in DEFAULTS:
        assert f"\n{variable}=" in text, f"{variable} is not in .env.example"
