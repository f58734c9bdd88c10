"""`graft --help` and every command's help, as a newcomer reads them."""

from __future__ import annotations

import re

import pytest
import typer.core

from graft.cli import command

# What a help page shows where it would name a Python type instead of what to type.
PYTHON_TYPE = re.compile(r"<(str|int|float|bool|path|list\[[^>]*\]|[a-z_]+\|None)>|\{[a-z_]+\}")


def commands(command, path=()):
    """Every command and group of the CLI, with the words that call it."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from commands(sub, (*path, name))


@pytest.fixture()
def help_of(capsys, monkeypatch):
    """``graft WORDS --help`` as the graft command prints it, in a 100-column terminal."""
    monkeypatch.setenv("COLUMNS", "100")

    def show(*words: str) -> str:
        assert command().main([*words, "--help"], prog_name="graft", standalone_mode=False) == 0
        return capsys.readouterr().out

    return show


def test_every_help_page_reads_as_plain_words_with_a_help_text_for_every_option(help_of):
    every = list(commands(command()))
    assert len(every) > 20  # serve ... model delete: the whole CLI
    for path, cmd in every:
        page = help_of(*path)
        where = " ".join(("graft", *path))
        assert "`" not in page, f"{where} --help shows a backtick:\n{page}"
        assert not PYTHON_TYPE.search(page), f"{where} --help shows a Python type:\n{page}"
        for param in cmd.params:
            assert (param.help or "").strip(), f"{where}: {param.name} has no help text"
            if isinstance(param, typer.core.TyperOption):
                assert param.opts[-1] in page
    submit = help_of("job", "submit")
    assert "--base-version" in submit and "latest promoted version" in submit


def test_graft_version_prints_the_version():
    import subprocess
    import sys

    from app import __version__

    done = subprocess.run(
        [sys.executable, "-m", "graft.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout == f"graft {__version__}\n"


@pytest.mark.parametrize("words", [(), ("eval",), ("job", "submit")])
def test_help_reads_right_in_an_80_column_terminal(words):
    """Paragraphs wrap at the terminal's width, not at the docstring's line breaks."""
    from tests.support.cli import run_graft_in_terminal

    shown = run_graft_in_terminal("http://127.0.0.1:9", *words, "--help", columns=80)
    lines = shown.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, shown
    text = command()
    for word in words:
        text = text.commands[word]
    for paragraph in text.help.split("\n\n"):
        first = paragraph.split(". ")[0]  # a sentence the terminal wraps, as one line of help
        rendered = " ".join(shown.split())
        assert " ".join(first.split()) in rendered, (first, shown)
    # no line of the description stops short while its paragraph goes on
    description = [line.strip() for line in lines if line.startswith(" ") and "│" not in line]
    for line, after in zip(description, description[1:], strict=False):
        assert not (line and after and len(line) < 40 and not line.endswith((".", ":"))), shown


def test_the_command_list_gives_each_command_one_summary_line():
    from tests.support.cli import run_graft_in_terminal

    shown = run_graft_in_terminal("http://127.0.0.1:9", "--help", columns=80)
    row = next(line for line in shown.splitlines() if line.startswith("│ eval "))
    assert row.strip("│ ").endswith("image by image."), shown
