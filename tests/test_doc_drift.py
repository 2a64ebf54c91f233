"""What the README and docs/ say that the code can check, so that it cannot rot unseen.

- Every config-driven command they show composes and passes validation: a renamed key, a
  changed default or a new check otherwise leaves a documented command that fails on its first
  line when a reader copies it. The commands are read from the fenced code blocks (`avsa
  pretrain|sweep|transfer|config ...` and `... -- python jobs/<job>.py ...` after `ray job
  submit`); placeholders such as BUCKET or RUN_ID are plain string values to the config.
- So does the example in each of these commands' --help.
- Every test docs/reliability.md names as the proof of a row exists.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from avsa.config import compose
from avsa.downstream import run as transfer_run
from avsa.downstream.run import TASKS, transfer_config
from avsa.sweep import driver as sweep_driver
from avsa.sweep.driver import plan_sweep
from avsa.train import driver as pretrain_driver

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^\s*(?:\.venv/bin/)?avsa (pretrain|sweep|transfer|config) (.*)"
                     r"|\s--\s+python jobs/(pretrain|sweep|transfer)\.py (.*)")


def documented_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, arguments) of each config-driven command in the markdown's code blocks,
    continuation lines joined, comments and pipes cut."""
    found = []
    for block in re.findall(r"^\s*```[a-z]*\n(.*?)^\s*```", text, re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if m := COMMAND.search(line):
                command, args = (m.group(1), m.group(2)) if m.group(1) else m.group(3, 4)
                found.append((command, shlex.split(args.split(" #")[0].split(" | ")[0])))
    return found


def check(command: str, args: list[str]) -> None:
    """What the command checks before its first I/O; raises ConfigError."""
    if command == "transfer":
        for task in TASKS if args[0] == "$task" else args[:1]:
            transfer_config(task, args[1:])
        return
    cfg = compose(args)
    if command == "sweep":
        plan_sweep(cfg)


CASES = [(f"{doc.relative_to(ROOT)}:{command} {' '.join(args)}", command, args)
         for doc in DOCS for command, args in documented_commands(doc.read_text())]


def test_the_docs_show_the_commands_this_test_reads():
    shown = {command for _, command, _ in CASES}
    assert shown == {"pretrain", "sweep", "transfer"}, shown
    assert len(CASES) >= 10, [c[0] for c in CASES]


@pytest.mark.parametrize(("where", "command", "args"), CASES, ids=[c[0][:80] for c in CASES])
def test_a_documented_command_composes_and_validates(where, command, args):
    check(command, args)


def usage_example(usage: str) -> tuple[str, list[str]]:
    """(command, arguments) of the `e.g. ...` in a `usage: avsa COMMAND ...` string."""
    command = usage.split()[2]
    example = shlex.split(usage.rpartition("e.g. ")[2].splitlines()[0])
    return command, example[2:] if example[:2] == ["avsa", command] else example


@pytest.mark.parametrize("module", [pretrain_driver, sweep_driver, transfer_run])
def test_the_usage_example_of_each_command_composes_and_validates(module):
    command, args = usage_example(module.USAGE)
    assert args and all("=" in a for a in args[command == "transfer":]), args
    check(command, args)


def test_the_reader_finds_blocks_joins_lines_and_cuts_comments():
    text = ("Some `avsa pretrain inline=1` prose.\n\n```bash\n"
            "avsa pretrain train.max_steps=5 \\\n    loss=avc   # the AVC baseline\n"
            "ray job submit --address http://h:8265 -- \\\n"
            "    python jobs/sweep.py 'sweep.space.loss.temperature=[0.1,0.2]' | tee log\n"
            "avsa compare --out x\n```\n")
    assert documented_commands(text) == [
        ("pretrain", ["train.max_steps=5", "loss=avc"]),
        ("sweep", ["sweep.space.loss.temperature=[0.1,0.2]"]),
    ]


def named_tests(table: str) -> list[tuple[str, str]]:
    """(file, test) of every `T/test_x.py::name` in the markdown, and of each `::name` after it
    in the same row."""
    found = []
    for row in table.splitlines():
        module = None
        for m in re.finditer(r"`T/(test_\w+\.py)(?:::(\w+))?`|`::(\w+)`", row):
            module = m.group(1) or module
            if name := m.group(2) or m.group(3):
                found.append((module, name))
    return found


def test_every_test_reliability_md_names_exists():
    named = named_tests((ROOT / "docs" / "reliability.md").read_text())
    assert len(named) >= 50, named
    defined: dict[str, set[str]] = {}
    for module, name in named:
        assert module, f"docs/reliability.md names ::{name} without its file"
        if module not in defined:
            tree = ast.parse((ROOT / "tests" / module).read_text())
            defined[module] = {n.name for n in ast.walk(tree)
                               if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        assert name in defined[module], f"docs/reliability.md names {module}::{name}"


def test_named_tests_reads_rows_with_several_tests():
    row = "| a | b | c | `T/test_a.py::one`, `::two`; unit: `T/test_b.py::three` |\n| `::x` |"
    assert named_tests(row) == [("test_a.py", "one"), ("test_a.py", "two"), ("test_b.py", "three"),
                                (None, "x")]  # a row's first test must name its file
