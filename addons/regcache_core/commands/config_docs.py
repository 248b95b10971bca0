"""`regcache config-docs`: `.env.example` and the settings tables of docs/configuration.md,
written from the settings declared in config.py, so that neither can say other than what
regcache reads. `--check` writes nothing and names what is out of date (the tests do the same)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from ..config import DEFAULT_REGISTRIES, DEFAULTS, REGISTRY_SETTINGS, SECTIONS, Setting

ENV_EXAMPLE = Path(".env.example")
CONFIGURATION_DOC = Path("docs/configuration.md")
WIDTH = 96

ENV_EXAMPLE_HEAD = """\
# regcache settings. Copy to .env and edit: `cp .env.example .env`.
# The real environment wins over .env; anything left out takes the default shown here.
# A bad value stops start-up with one line naming the variable.
# Written by `regcache config-docs` from addons/regcache_core/config.py: edit the text there.
"""
# The settings each registry served out of the box shows.
BLOCK = ("REGISTRY", "UPSTREAM", "CACHE", "USERNAME", "PASSWORD")
# How .env.example shows adding a registry, commented out.
ADDED_REGISTRY_EXAMPLE = """\
# Adding a registry is configuration only. For registry.k8s.io: add K8S to
# REGCACHE_REGISTRIES and uncomment these lines.
# K8S_REGISTRY=registry.k8s.io
# K8S_UPSTREAM=https://registry.k8s.io
# K8S_CACHE=http://127.0.0.1:5004
"""
TABLES_START = "<!-- settings: written by `regcache config-docs` from addons/regcache_core/config.py -->"
TABLES_END = "<!-- end of settings -->"


def env_example() -> str:
    parts = [ENV_EXAMPLE_HEAD]
    for title, intro, settings in SECTIONS:
        lines = [f"# --- {title} ".ljust(WIDTH, "-")]
        if intro:
            lines.append(_comment(intro))
        for setting in settings:
            lines += [_comment(_sentence(setting)), f"{setting.name}={setting.default}"]
        if any(s.name == "REGCACHE_REGISTRIES" for s in settings):
            lines.append(_registries_block())
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _registries_block() -> str:
    own = "\n".join(_comment(f"K_{s.name}{' (required)' if s.required else ''}: {_sentence(s, capital=False)}",
                             indent="#   ") for s in REGISTRY_SETTINGS)
    blocks = ["".join(f"{key}_{name}={DEFAULTS.get(f'{key}_{name}', '')}\n" for name in BLOCK) for key in DEFAULT_REGISTRIES]
    return f"# Registry K has these settings:\n{own}\n\n" + "\n".join(blocks) + "\n" + ADDED_REGISTRY_EXAMPLE.rstrip("\n")


def _sentence(setting: Setting, capital: bool = True) -> str:
    text = (setting.help[0].upper() + setting.help[1:] if capital else setting.help) + "."
    if setting.notes:
        text += " " + setting.notes
    if setting.empty_means and not setting.default:
        text += f" Empty: {setting.empty_means}."
    return text


def _comment(text: str, indent: str = "# ") -> str:
    return textwrap.fill(text, WIDTH, initial_indent="# ", subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


def settings_tables() -> str:
    """A table per section, then one of a registry's own settings, as markdown."""
    parts = []
    for title, _, settings in SECTIONS:
        parts.append(_table(title, [(s.name, _default(s), s.help) for s in settings]))
    parts.append(_table("A registry's own settings (registry K)",
                        [(f"K_{s.name}", "required" if s.required else s.empty_means, s.help) for s in REGISTRY_SETTINGS]))
    return "\n".join(parts)


def _default(setting: Setting) -> str:
    return f"`{setting.default}`" if setting.default else setting.empty_means


def _table(title: str, rows: list[tuple[str, str, str]]) -> str:
    lines = [f"### {title}", "", "| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {default} | {meaning} |" for name, default, meaning in rows]
    return "\n".join(lines) + "\n"


def with_tables(document: str) -> str:
    """`document` with what stands between its settings markers written anew."""
    start, end = document.find(TABLES_START), document.find(TABLES_END)
    if start < 0 or end < start:
        raise ValueError(f"no {TABLES_START!r} ... {TABLES_END!r} in it")
    return document[:start] + TABLES_START + "\n\n" + settings_tables() + "\n" + document[end:]


def config_docs(root: Path, check: bool) -> list[str]:
    """Write (or, with `check`, compare) both files under `root`; the names of those out of date."""
    stale = []
    doc = root / CONFIGURATION_DOC
    for path, wanted in ((root / ENV_EXAMPLE, env_example()), (doc, with_tables(doc.read_text()))):
        current = path.read_text() if path.exists() else None
        if current != wanted:
            stale.append(str(path))
            if not check:
                path.write_text(wanted)
    return stale
