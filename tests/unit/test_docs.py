"""README.md and docs/: links resolve, commands exist, Python compiles, the README stays short.

Commands: a line of a ```bash/sh/shell block (continuation lines joined, a leading `$ ` and a
trailing ` # comment` dropped, split on `&&` and `;`) is checked by its first word: `vdiff` by
vdiff's own parser (`build_parser`, which starts nothing), `make X` against the Makefile's
targets, `python SCRIPT` by the script's existence, `. .venv/bin/activate` and `pip install`
accepted. In the README anything else fails, so it cannot show a command this test does not
understand; in docs/ the same checks apply to the commands they know, and others are left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdiff.serve.cli import build_parser, split_command

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 160

SHELL = {"bash", "sh", "shell"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PYTHONS = {"python", "python3"}


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the first line inside the fence
    text: str


def closes(line: str, marker: str) -> bool:
    """Whether `line` closes a code block opened with `marker` (at least as many, nothing else)."""
    stripped = line.strip()
    return stripped.startswith(marker) and not stripped.strip(marker[0])


def split_page(text: str) -> tuple[str, list[Block]]:
    """The page's prose (code blocks blanked, so line numbers stay) and its fenced code blocks."""
    prose: list[str] = []
    blocks: list[Block] = []
    fence: tuple[str, str, str, int] | None = None  # indent, marker, language, first line
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = (match.group(1), match.group(2), match.group(3).lower(), number + 1)
            body = []
            prose.append("")
        elif fence is not None and closes(line, fence[1]):
            blocks.append(Block(fence[2], fence[3], "\n".join(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line[len(fence[0]) :] if line.startswith(fence[0]) else line.lstrip())
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"a code block opened on line {fence[3] - 1} is never closed"
    return "\n".join(prose), blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation but `-` dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in prose.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every inline link and image outside code."""
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    # code spans become blanks of the same shape, so that `[x](y)` in code is no link
    blanked = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", "x", m.group(0)), prose)
    for match in LINK.finditer(blanked):
        yield blanked.count("\n", 0, match.start()) + 1, match.group(2)


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def link_problems(page: Path) -> list[str]:
    problems = []
    for line, target in links(page):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        where = f"{shown(page)}:{line}: {target}"
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            problems.append(f"{where}: {resolved} does not exist")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with anchor #{anchor} in {shown(resolved)}")
    return problems


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    names = re.findall(r"(?m)^([A-Za-z0-9_.-]+)\s*:(?!=)", text)
    return {name for name in names if not name.startswith(".")}


def command_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(line, command) of a shell block: continuations joined, prompts and comments dropped."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, raw in enumerate(block.text.splitlines()):
        line = raw.rstrip()
        start, text = pending if pending else (block.line + offset, "")
        text = f"{text} {line.strip()}" if text else line.strip()
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
            continue
        pending = None
        joined.append((start, text))
    if pending:
        joined.append(pending)
    for number, line in joined:
        if line.startswith("$ "):
            line = line[2:]
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|;", line):
            if part.strip():
                yield number, part.strip()


def parse_with(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """None when `parser` accepts `args` with every flag spelled out, else why not."""
    known = {option for action in parser._actions for option in action.option_strings}
    for word in args:
        if word == "--":
            break
        if word.startswith("--") and word.split("=", 1)[0] not in known:
            return f"{parser.prog} has no flag {word.split('=', 1)[0]}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            said = stderr.getvalue().strip()
            return said.splitlines()[-1] if said else "parse error"
    return None


def check_vdiff(args: list[str]) -> str | None:
    command, ours, _triton_args = split_command(args)
    return parse_with(build_parser(command), ours)


def check_vdiff_load(args: list[str]) -> str | None:
    from vdiff_client.load.runner import build_parser as load_parser

    return parse_with(load_parser(), args)


def check_command(words: list[str], cwd: Path, targets: set[str], strict: bool) -> str | None:
    """None if the command exists as written, else why not; unknown ones fail only if strict."""
    program, args = words[0], words[1:]
    name = Path(program).name
    if program in ("vdiff", ".venv/bin/vdiff"):
        return check_vdiff(args)
    if program in (".", "source"):
        activates = args == [".venv/bin/activate"]
        return None if activates else f"sources {args}, not .venv/bin/activate"
    if name in ("pip", "pip3") and args[:1] == ["install"]:
        return None
    if program == "make":
        wanted = [word for word in args if not ENV_ASSIGNMENT.match(word)]
        wanted = [word for word in wanted if not word.startswith("-")]
        missing = [target for target in wanted if target not in targets]
        return f"no Makefile target {missing}" if missing else None
    if name in PYTHONS:
        if not args or args[0].startswith("-"):
            return "python without a script path"
        return None if (cwd / args[0]).is_file() else f"no script {args[0]}"
    if not strict:
        checkers: dict[str, Callable[[list[str]], str | None]] = {"vdiff-load": check_vdiff_load}
        if program in checkers:
            return checkers[program](args)
        if program == "bash" and args and args[0].endswith(".sh"):
            return None if (cwd / args[0]).is_file() else f"no script {args[0]}"
        return None
    return "a command this test does not know; teach tests/unit/test_docs.py or drop it"


def command_problems(page: Path, strict: bool) -> list[str]:
    targets = make_targets()
    problems = []
    _, blocks = split_page(page.read_text(encoding="utf-8"))
    for block in blocks:
        if block.language not in SHELL:
            continue
        cwd = ROOT
        for number, line in command_lines(block):
            where = f"{page.relative_to(ROOT)}:{number}: {line}"
            try:
                words = shlex.split(line)
            except ValueError as error:
                problems.append(f"{where}: {error}")
                continue
            while words and ENV_ASSIGNMENT.match(words[0]) and not strict:
                words = words[1:]
            if not strict and words[:1] == ["cd"] and len(words) == 2:
                cwd = (cwd / words[1]).resolve()
                continue
            if words and (problem := check_command(words, cwd, targets, strict)):
                problems.append(f"{where}: {problem}")
    return problems


def python_blocks(page: Path) -> list[Block]:
    _, blocks = split_page(page.read_text(encoding="utf-8"))
    return [block for block in blocks if block.language in ("python", "py")]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert not link_problems(page), "\n".join(link_problems(page))


def test_readme_commands_exist() -> None:
    problems = command_problems(README, strict=True)
    assert not problems, "\n".join(problems)
    _, blocks = split_page(README.read_text(encoding="utf-8"))
    shell = [block for block in blocks if block.language in SHELL]
    commands = [command for block in shell for _, command in command_lines(block)]
    assert "make test" in commands, "the README shows `make test` in a shell block"


@pytest.mark.parametrize("page", DOCS, ids=lambda page: str(page.relative_to(ROOT)))
def test_docs_commands_that_are_checked_exist(page: Path) -> None:
    problems = command_problems(page, strict=False)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_python_blocks_compile(page: Path) -> None:
    for block in python_blocks(page):
        compile(block.text, f"{page.relative_to(ROOT)}:{block.line}", "exec")


def test_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move text to docs/"
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in links(README)}
    unlinked = [str(page.relative_to(ROOT)) for page in DOCS if page.resolve() not in linked]
    assert not unlinked, f"README.md links no {unlinked}"


@pytest.mark.parametrize("page", DOCS, ids=lambda page: str(page.relative_to(ROOT)))
def test_docs_page_starts_with_a_title(page: Path) -> None:
    first = page.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# "), f"{shown(page)} starts with {first!r}, not a `# Title`"


def test_the_checks_catch_what_they_should() -> None:
    """The checker itself: a bad flag, a missing target or script and an unknown command fail."""
    targets = make_targets()

    def check(line: str, strict: bool = True) -> str | None:
        return check_command(shlex.split(line), ROOT, targets, strict)

    assert check("vdiff --port 8000") is None
    assert check("vdiff triton --max-num-seqs 4") is None
    assert check("vdiff --no-such-flag")
    assert check("vdiff --max-num-s 4")  # no abbreviations
    assert check("vdiff triton --port 8000")
    assert check("make no-such-target")
    assert check("python tools/no_such_tool.py")
    assert check("curl localhost")
    assert check("curl localhost", strict=False) is None
    text = "$ make setup && . .venv/bin/activate  # set up\nvdiff \\\n  --port 8000"
    block = Block("bash", 1, text)
    expected = [(1, "make setup"), (1, ". .venv/bin/activate"), (2, "vdiff --port 8000")]
    assert list(command_lines(block)) == expected
    assert slug("The `vdiff` command: flags, and *more*") == "the-vdiff-command-flags-and-more"
    assert slug("Batch-invariant mode's cost") == "batch-invariant-modes-cost"


def test_the_link_check_catches_what_it_should(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# B\n\n## Real heading\n\n```bash\n# not a heading\n```\n")
    (tmp_path / "a.md").write_text(
        "[ok](b.md#real-heading), [bad anchor](b.md#not-a-heading), [gone](missing.md),\n"
        "![img](b.md), [web](https://example.com/x), `[code](nowhere.md)`, [self](#a)\n\n# A\n"
    )
    problems = link_problems(tmp_path / "a.md")
    assert len(problems) == 2, problems
    assert "#not-a-heading" in problems[0] and "missing.md" in problems[1]
