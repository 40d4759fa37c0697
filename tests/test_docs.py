"""The README and docs/*.md against the repository: every relative link reaches a file (and its #anchor a heading),
and every `python -m pipelines ...` command they show names a real subcommand whose flags parse. All in process:
argparse on `build_parser()` and on each benchmark's own `parse_args`; no Ray, server or subprocess."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`+([^`]+?)`+", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")
# `python -m pipelines ...` however it is started (`.venv/bin/python`, after `ray job submit ... --`, after
# `FOO=1`), and `python benchmarks/bench_NAME.py ...`, the same benchmark run as a script.
PIPELINES = re.compile(r"(?:^|(?<=[\s;&|(`]))(?:[^\s`]*/)?python3?\s+-m\s+pipelines(?=[\s`]|$)([^`]*)")
BENCH_SCRIPT = re.compile(r"(?:^|(?<=[\s;&|(`]))(?:[^\s`]*/)?python3?\s+benchmarks/bench_(\w+)\.py(?=[\s`]|$)([^`]*)")
SHELL_BREAK = {"|", "||", "&&", ";", "&"}
REDIRECT = re.compile(r"^(\d?>|&>|<<?$)")
COMMENT = re.compile(r"(^|\s)#.*$")
SUBSHELL = re.compile(r"\$\([^()]*\)")
PLACEHOLDER = re.compile(r"^(<[^>]+>|[A-Z][A-Z0-9_]*(\.\.\.)?)$")


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    inline: bool  # `quoted` in prose or in a code block: a fragment (`python -m pipelines status`), not a command line
    text: str
    argv: tuple[str, ...]  # after `pipelines`; for a benchmark script, ("bench", NAME, ...)

    def where(self) -> str:
        return f"{shown(self.doc)}:{self.line}: {self.text}"


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def split_markdown(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The document's prose lines (code blocks blanked, so line numbers hold) and its fenced code blocks, each
    with the line number of its first line."""
    prose, blocks, fence, block = [], [], None, None
    for number, line in enumerate(path.read_text().split("\n"), 1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence, block = opened.group(1), (number + 1, [])
            prose.append("")
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                blocks.append(block)
                fence = None
            else:
                block[1].append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercase, punctuation other than '-' and '_' dropped,
    each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The #anchors of a document's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found, counts = set(), {}
    for line in split_markdown(path)[0]:
        m = HEADING.match(line)
        if m:
            base = slug(m.group(1))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(f"{base}-{n}" if n else base)
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image outside code."""
    prose = "\n".join(split_markdown(path)[0])
    prose = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)  # keep offsets and lines
    return [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(prose)]


def argv_of(rest: str) -> tuple[str, ...] | None:
    """The arguments of one shown command: shell pieces cut off, `$(...)` and `...` taken for values, the
    `[optional]` brackets of a usage line dropped. None when the shell could not split it."""
    try:
        tokens = shlex.split(SUBSHELL.sub("VALUE", rest))
    except ValueError:
        return None
    argv, depth = [], 0
    for token in tokens:
        if token in SHELL_BREAK or REDIRECT.match(token):
            break
        if token in ("...", "…"):
            continue
        opened = len(token) - len(token.lstrip("["))
        token, depth = token[opened:], depth + opened
        closed = min(depth, len(token) - len(token.rstrip("]")))
        token, depth = token[: len(token) - closed], depth - closed
        if token:
            argv.append(token)
    return tuple(argv)


def commands(path: Path) -> list[Command]:
    prose, blocks = split_markdown(path)
    found = []

    def add(line: int, inline: bool, text: str) -> None:
        def quoted(m: re.Match) -> bool:  # `python -m pipelines bench` quoted inside a code block: a fragment too
            return inline or text[m.start() - 1 : m.start()] == "`"

        for m in PIPELINES.finditer(text):
            found.append(Command(path, line, quoted(m), m.group(0).strip(), argv_of(m.group(1))))
        for m in BENCH_SCRIPT.finditer(text):
            argv = argv_of(m.group(2))
            found.append(Command(path, line, quoted(m), m.group(0).strip(), argv and ("bench", m.group(1), *argv)))

    for first, lines in blocks:
        logical, start = "", first
        for number, line in enumerate(lines, first):
            line = COMMENT.sub("", line)
            if not logical:
                start = number
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            add(start, False, logical + line)
            logical = ""
        if logical:
            add(start, False, logical)
    text = "\n".join(prose)
    for m in INLINE_CODE.finditer(text):
        add(text.count("\n", 0, m.start()) + 1, True, " ".join(m.group(1).split()))
    return found


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def numeric_placeholders(sub: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--version N`, `--top-k K`: a placeholder where the option wants a number becomes 1."""
    out = list(argv)
    for i, token in enumerate(out[:-1]):
        action = sub._option_string_actions.get(token.split("=", 1)[0])
        if action is not None and action.type in (int, float) and PLACEHOLDER.match(out[i + 1]):
            out[i + 1] = "1"
    return out


def parse(parse_args, argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """(the parsed arguments, None), (None, None) after --help, or (None, argparse's complaint)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse_args(argv), None
    except SystemExit as exc:
        if exc.code in (0, None):
            return None, None
        message = err.getvalue().strip()
        return None, message.splitlines()[-1] if message else f"exit {exc.code}"


def load_bench(name: str):
    """benchmarks/bench_NAME.py, loaded by path as `python -m pipelines bench NAME` loads it (pipelines.cli)."""
    module = sys.modules.get(f"bench_{name}")
    if module is None:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"bench_{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def check(parser: argparse.ArgumentParser, cmd: Command, bench_targets: set[str]) -> str | None:
    """What is wrong with one shown command, or None."""
    if cmd.argv is None:
        return "the shell cannot split it"
    argv = list(cmd.argv)
    if not argv:
        return None if cmd.inline else "no subcommand"
    if argv[0].startswith("<"):  # `python -m pipelines <command>`: the placeholder for any subcommand
        return None
    if argv[0].startswith("-"):
        return parse(parser.parse_args, argv)[1]
    subs = subcommands(parser)
    if argv[0] not in subs:
        return f"no subcommand {argv[0]!r} (known: {', '.join(subs)})"
    sub = subs[argv[0]]
    argv = [argv[0], *numeric_placeholders(sub, argv[1:])]
    if argv[0] == "bench" and len(argv) > 1:
        if argv[1] not in bench_targets:
            return f"no benchmark {argv[1]!r} (known: {', '.join(sorted(bench_targets))})"
        args, problem = parse(parser.parse_args, argv)
        return problem or (parse(load_bench(argv[1]).parse_args, args.args)[1] if args else None)
    if cmd.inline:  # a fragment: its options must exist; what it leaves out need not be there
        unknown = [t for t in argv[1:] if t.startswith("--") and t.split("=", 1)[0] not in sub._option_string_actions]
        return f"unknown option {', '.join(unknown)} of {argv[0]}" if unknown else None
    return parse(parser.parse_args, argv)[1]


@dataclass
class Checked:
    commands: list[Command]
    problems: list[str]
    helped: list[str]
    ray_before: str
    ray_after: str


def ray_state() -> str:
    """ "absent" (not imported), "imported" or "running" (earlier tests of the session may have started it)."""
    if "ray" not in sys.modules:
        return "absent"
    return "running" if sys.modules["ray"].is_initialized() else "imported"


@pytest.fixture(scope="module")
def checked() -> Checked:
    ray_before = ray_state()
    from pipelines.cli import build_parser

    parser = build_parser()
    bench = next(a for a in subcommands(parser)["bench"]._actions if a.dest == "target")
    targets = set(bench.choices)
    missing = sorted(t for t in targets if not (REPO / "benchmarks" / f"bench_{t}.py").is_file())
    assert not missing, f"`python -m pipelines bench` offers {', '.join(missing)} without a benchmarks/ script"
    found = [c for doc in DOCS for c in commands(doc)]
    problems = [f"{c.where()}\n    {p}" for c in found if (p := check(parser, c, targets))]
    # --help of every subcommand and benchmark the docs name.
    helped = []
    for name in sorted({c.argv[0] for c in found if c.argv and c.argv[0] in subcommands(parser)}):
        problem = parse(parser.parse_args, [name, "--help"])[1]
        helped.append(name)
        if problem:
            problems.append(f"python -m pipelines {name} --help: {problem}")
    for name in sorted({c.argv[1] for c in found if c.argv and c.argv[0] == "bench" and len(c.argv) > 1} & targets):
        problem = parse(load_bench(name).parse_args, ["--help"])[1]
        helped.append(f"bench {name}")
        if problem:
            problems.append(f"python -m pipelines bench {name} --help: {problem}")
    return Checked(found, problems, helped, ray_before, ray_state())


def link_problems(doc: Path) -> tuple[int, list[str]]:
    """How many relative links the document has, and what is wrong with them."""
    count, problems = 0, []
    for line, target in links(doc):
        if target.startswith(EXTERNAL):
            continue
        count += 1
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        where = f"{shown(doc)}:{line}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: no file {shown(dest)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {shown(dest)}")
    return count, problems


def test_every_relative_link_resolves():
    count, problems = 0, []
    for doc in DOCS:
        n, found = link_problems(doc)
        count, problems = count + n, problems + found
    assert count > 0, "found no relative link: the link check proves nothing"
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_shown_command_parses(checked: Checked):
    assert sum(1 for c in checked.commands if not c.inline) > 0, "found no `python -m pipelines` command block"
    assert any(c.argv and c.argv[0] == "bench" and len(c.argv) > 1 for c in checked.commands), (
        "found no `python -m pipelines bench NAME` command"
    )
    assert checked.helped, "no subcommand's --help was checked"
    assert not checked.problems, "commands in the docs that do not parse:\n" + "\n".join(checked.problems)


def test_checking_the_commands_starts_no_ray(checked: Checked):
    assert checked.ray_after == checked.ray_before, f"parsing the documented commands left Ray {checked.ray_after}"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_the_checks_catch_broken_links_and_commands(tmp_path: Path, checked: Checked):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section, `code`\n\n## A section, `code`\n")
    doc = tmp_path / "page.md"
    doc.write_text(
        "# Page\n\n[ok](other.md#a-section-code-1) [no file](missing.md) [no heading](other.md#nowhere)\n"
        "[self](#page) ![image](other.md) `[not a link](x.md)` [web](https://example.com/x.md)\n\n"
        "```bash\n"
        "python -m pipelines evaluate --config X --version 3 | tee log   # promote's flag, not evaluate's\n"
        "FOO=1 .venv/bin/python -m pipelines promote --config X \\\n  [--version N] > log 2>&1\n"
        "ray job submit -- python -m pipelines bench ablate --variants nothing_such\n"
        "python benchmarks/bench_model.py --tables reference --steps 5\n"
        "python -m pipelines trian --config X\n"
        "```\n\n"
        "Fragments: `python -m pipelines status` and `python -m pipelines status --every`.\n"
    )
    assert anchors(tmp_path / "other.md") == {"other-page", "a-section-code", "a-section-code-1"}
    count, problems = link_problems(doc)
    assert count == 5
    assert [p.split(": ", 1)[1] for p in problems] == [
        f"(missing.md): no file {tmp_path / 'missing.md'}",
        f"(other.md#nowhere): no heading #nowhere in {tmp_path / 'other.md'}",
    ]
    from pipelines.cli import build_parser

    parser, targets = build_parser(), {"ablate", "model"}
    verdicts = {" ".join(c.argv[:2]): check(parser, c, targets) for c in commands(doc)}
    assert {argv: problem is None for argv, problem in verdicts.items()} == {
        "evaluate --config": False,  # unrecognized arguments: --version 3
        "promote --config": True,  # [optional], N for a number, the line joined, the redirect cut off
        "bench ablate": False,  # the benchmark's own parser refuses the variant
        "bench model": True,  # python benchmarks/bench_model.py
        "trian --config": False,  # no such subcommand
        "status": True,  # a fragment in prose may leave out --config
        "status --every": False,
    }, verdicts
