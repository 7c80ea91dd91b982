"""The README against the code, so the one cannot drift from the other: every `pyllm` command in
its shell blocks is accepted by the CLI's own parser (commands, flags, choices, value types), and
every Python block compiles and names only what pyllm has. (What the commands print is checked by
the tests of each part; this file checks that what the README tells people to type exists.)"""

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

import pyllm
from pyllm.cli import _with_config, build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced block of `language`."""
    out, lines = [], README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start, body = i + 2, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            out.append((start, "\n".join(body)))
        i += 1
    return out


def _pyllm_commands() -> list[tuple[int, list[str]]]:
    """Every `pyllm ...` invocation in the shell blocks (after &&, after `mpirun -n N`, in $(...)),
    as argv without the program name; comments and shell syntax stripped."""
    pieces = []
    for start, text in _blocks("bash"):
        for offset, line in enumerate(text.splitlines()):
            for inner in re.findall(r"\$\((.*)\)", line):   # a command inside $(...) (one a line)
                pieces.append((start + offset, shlex.split(inner, comments=True)))
            words = shlex.split(re.sub(r"\$\((.*)\)", "1", line), comments=True)
            command: list[str] = []
            for word in words + ["&&"]:
                if word in ("&&", "|", ";", "||"):
                    pieces.append((start + offset, command))
                    command = []
                else:
                    command.append(word)
    commands = []
    for number, words in pieces:
        if words[:1] == ["mpirun"]:   # mpirun -n N [-f FILE] pyllm ...
            words = words[3:]
            if words[:1] == ["-f"]:
                words = words[2:]
        if words and re.fullmatch(r"(\S*/)?pyllm", words[0]):
            commands.append((number, words[1:]))
    return commands


COMMANDS = _pyllm_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) > 30 and {argv[0] for _, argv in COMMANDS if argv} >= {
        "train", "generate", "chat", "tokenize", "finetune", "serve", "explain", "export", "eval"}


@pytest.mark.parametrize("number, argv", COMMANDS, ids=[f"line{n}" for n, _ in COMMANDS])
def test_every_pyllm_command_in_the_readme_parses(number, argv, tmp_path, capsys):
    parser, configurable = build_parser()
    if "--config" in argv:   # the file it names is the reader's; give it an empty one
        argv = [str(tmp_path / "empty.toml") if a == argv[argv.index("--config") + 1] else a for a in argv]
        (tmp_path / "empty.toml").write_text("", encoding="utf-8")
        argv = _with_config(parser, configurable, argv)
    if argv == ["--version"] or not argv:
        return
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README line {number}: `pyllm {' '.join(argv)}` is refused by the CLI: "
                    f"{capsys.readouterr().err.strip()[-300:]} (exit {exc.code})")
    assert callable(getattr(args, "func", None)), f"README line {number}: no command runs"


PYTHON_BLOCKS = _blocks("python")


@pytest.mark.parametrize("number, code", PYTHON_BLOCKS, ids=[f"line{n}" for n, _ in PYTHON_BLOCKS])
def test_every_python_block_compiles_and_names_what_pyllm_has(number, code):
    tree = ast.parse(code, filename=f"README.md:{number}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyllm"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README line {number}: {node.module} has no {alias.name}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pyllm"):
                    importlib.import_module(alias.name)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pyllm":
            assert hasattr(pyllm, node.attr), f"README line {number}: pyllm has no {node.attr}"
