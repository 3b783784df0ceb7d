"""MkDocs hook: the parts of the site that are generated from the code at build time.

A page asks for a generated part with a marker on a line of its own:

- ``<!-- generated: reserved-metadata -->``: the table of ``etcdisco.RESERVED_METADATA``;
- ``<!-- generated: cli -->``: every command of ``etcdisco.cli.cli`` with its ``--help``;
- ``<!-- generated: failure-table -->``: the table of README.md's section "What happens
  when things fail".

They are rendered from the installed package and the README each time the site is
built, so the pages cannot drift from them. An unknown marker, or a README without that
section, fails the build.

The parts taken from the code are rendered by this file run as a script in a fresh
interpreter (``python docs/_hooks/generated.py cli`` prints one), so that
``mkdocs serve`` shows the code as it is now rather than as it was first imported.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import click

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.M)

# Help is wrapped at a fixed width, whatever the terminal that runs the build.
HELP_WIDTH = 88


def reserved_metadata() -> str:
    """The reserved metadata keys as a Markdown table."""
    from etcdisco import RESERVED_METADATA

    def cell(text: str) -> str:
        text = re.sub(r"'([^'\s]+)'", r"`'\1'`", text)  # quoted literals as code
        return text.replace("|", "\\|")

    rows = ["| key | type | what it does |", "|---|---|---|"]
    for name, key in RESERVED_METADATA.items():
        rows.append(f"| `{name}` | {cell(key.kind)} | {cell(key.meaning)} |")
    return "\n".join(rows)


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    import click

    # The command's own settings (e.g. -h as a help option) as on a command line.
    settings = {
        **command.context_settings,
        "terminal_width": HELP_WIDTH,
        "max_content_width": HELP_WIDTH,
    }
    return click.Context(command, info_name=name, parent=parent, **settings)


def _commands(
    command: click.Command, ctx: click.Context
) -> list[tuple[click.Command, click.Context]]:
    import click

    found = [(command, ctx)]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            found.extend(_commands(sub, _context(sub, name, ctx)))
    return found


def cli_reference() -> str:
    """Every command of the ``etcdisco`` command line with its help, as Markdown."""
    from etcdisco.cli import cli

    parts = []
    for command, ctx in _commands(cli, _context(cli, "etcdisco", None)):
        path = ctx.command_path
        level = "#" * (2 + max(0, path.count(" ") - 1))  # etcdisco and its commands: h2
        summary = command.get_short_help_str(limit=HELP_WIDTH)
        parts.append(f"{level} `{path}`\n\n{summary}\n\n```text\n{command.get_help(ctx)}\n```\n")
    return "\n".join(parts)


FAILURE_SECTION = "## What happens when things fail"


def failure_table(config: Any) -> str:
    """The first table of README.md's failure section, as it is written there."""
    from mkdocs.exceptions import PluginError

    readme = Path(config["config_file_path"]).parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    _, found, section = text.partition(f"\n{FAILURE_SECTION}\n")
    if not found:
        raise PluginError(f"{readme}: no section {FAILURE_SECTION!r} (docs/concepts.md shows it)")
    section = section.split("\n## ", 1)[0]
    table = re.search(r"^\|.*\|\n(?:^\|.*\|\n?)+", section, re.M)
    if table is None:
        raise PluginError(f"{readme}: no table under {FAILURE_SECTION!r}")
    return table.group(0).rstrip("\n")


FROM_CODE = {"reserved-metadata": reserved_metadata, "cli": cli_reference}


def _from_code(name: str) -> str:
    from mkdocs.exceptions import PluginError

    result = subprocess.run(
        [sys.executable, __file__, name], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise PluginError(f"generating {name!r} failed:\n{result.stderr}")
    return result.stdout


def on_page_markdown(markdown: str, *, config: Any, **kwargs: Any) -> str:
    from mkdocs.exceptions import PluginError

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "failure-table":
            return failure_table(config)
        if name in FROM_CODE:
            return _from_code(name)
        known = sorted([*FROM_CODE, "failure-table"])
        raise PluginError(f"unknown generated part {name!r}: one of {known}")

    return MARKER.sub(replace, markdown)


if __name__ == "__main__":
    sys.stdout.write(FROM_CODE[sys.argv[1]]())
