"""Every config-driven command the README and docs/ show composes and passes validation.

A renamed key, a changed default or a new check otherwise leaves a documented command that
fails on its first line when a reader copies it. The commands are read from the fenced code
blocks (`avsa pretrain|sweep|transfer|config ...` and `... -- python jobs/<job>.py ...` after
`ray job submit`); placeholders such as BUCKET or RUN_ID are plain string values to the config.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from avsa.config import compose
from avsa.downstream.run import TASKS, transfer_config
from avsa.sweep.driver import plan_sweep

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
