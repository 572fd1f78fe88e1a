"""The documentation cannot drift: the site builds with ``mkdocs build --strict``, and every ``kdp``
command in a code block of README.md or docs/ (``docker run`` of an image's kdp included) parses with the command line's own parser, names
stages and settings that exist, and writes over no file that git tracks."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from components import common
from components.image import IMAGES
from components.stage import find
from kd_lib.config import ConfigError
from pipelines import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: How the documentation spells the command line (README.md, "Commands in this documentation").
KDP = ".venv/bin/kdp"
#: A fenced code block: its language and its text. Shell blocks are ``bash`` or untagged; ``text`` is output.
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SHELL = {"", "bash", "sh", "shell", "console"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
OUTPUT_FLAGS = {"-o", "--output", "--out"}
#: ``kdp run`` and ``kdp detect``: the pipeline and the parameters the command line makes for it.


def in_image(words: list[str]) -> list[str]:
    """For ``docker run [OPTIONS] IMAGE ARGS`` of a project image and its entrypoint (kdp), the kdp
    command it runs (``[KDP, *ARGS]``); else an empty list."""
    images = [i for i, word in enumerate(words) if word in IMAGES.values()]
    if words[:2] != ["docker", "run"] or not images or "--entrypoint" in words[:images[0]]:
        return []
    return [KDP, *words[images[0] + 1:]]


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """Every command in ``page``'s code blocks that calls kdp: (``page:line``, its words)."""
    found = []
    text = page.read_text()
    for block in FENCE.finditer(text):
        if block.group(1) not in SHELL:
            continue
        first_line = text.count("\n", 0, block.start(2)) + 1
        lines = block.group(2).split("\n")
        start = 0
        while start < len(lines):
            end = start
            while lines[end].endswith("\\") and end + 1 < len(lines):
                end += 1
            line = " ".join(part.removesuffix("\\") for part in lines[start:end + 1])
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            segment: list[str] = []
            for word in [*lexer, ";"]:
                if word not in SHELL_OPERATORS:
                    segment.append(word)
                    continue
                if segment and segment[0].endswith("kdp"):
                    found.append((f"{page.relative_to(ROOT)}:{first_line + start}", segment))
                elif in_image(segment):
                    found.append((f"{page.relative_to(ROOT)}:{first_line + start}", in_image(segment)))
                segment = []
            start = end + 1
    return found


COMMANDS = [command for page in PAGES for command in commands(page)]


def parse(words: list[str]) -> None:
    """Parse ``kdp WORDS`` as ``kdp`` does, and check what it would run, without running it."""
    args, rest = cli.build_parser().parse_known_args(words)
    if args.command == "stage":
        assert args.name, "kdp stage without a stage"
        stage = find(args.name)
        assert common.stage_cli(stage.config, lambda config: None, rest, f"kdp stage {stage.name}", "") == 0
        return
    assert not rest, f"unrecognized arguments: {' '.join(rest)}"
    if args.command in cli.LOCAL_RUNS:
        build, demo = cli.LOCAL_RUNS[args.command]
        pipeline = build(args)
        pipeline.plan(cli.pipeline_params(args, args.data or "demo", pipeline, demo))
    elif args.command == "compile":
        cli.options_from_args(args)


def outputs(words: list[str]) -> list[str]:
    """The values of the command's output options (``-o FILE``, ``--out DIR``, ``--out=DIR``)."""
    spelt_apart = [value for flag, value in zip(words, words[1:]) if flag in OUTPUT_FLAGS]
    joined = [value for flag, equals, value in (word.partition("=") for word in words)
              if equals and flag in OUTPUT_FLAGS]
    return spelt_apart + joined


def tracked(path: str) -> list[str]:
    """The files git tracks at ``path`` (a file, or under a folder)."""
    listing = subprocess.run(["git", "ls-files", "--", path], cwd=ROOT, capture_output=True, text=True, check=True)
    return listing.stdout.split()


def test_the_documentation_has_kdp_commands():
    assert len(COMMANDS) >= 20 and any(where.startswith("README.md") for where, _ in COMMANDS)


@pytest.mark.parametrize("words", [words for _, words in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_each_documented_command_parses(words, capsys):
    assert words[0] == KDP, f"spelt {words[0]!r}: the documentation calls the command line {KDP}"
    try:
        parse(words[1:])
    except SystemExit as exit_:
        pytest.fail(f"kdp exits {exit_.code}: {capsys.readouterr().err.strip()}", pytrace=False)
    except ConfigError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.mark.requires((ROOT / ".git").exists(), "not a git checkout: no tracked files to protect")
@pytest.mark.parametrize("words", [words for _, words in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_no_documented_command_writes_over_a_tracked_file(words):
    for path in outputs(words):
        if Path(path).is_absolute() and not Path(path).is_relative_to(ROOT):
            continue  # outside the clone (in a container, or elsewhere on the machine)
        assert not tracked(path), f"{' '.join(words)} writes over {path}, which git tracks"


def test_the_site_builds_strictly(tmp_path):
    """``make docs``: a broken link, a missing page or a page left out of the navigation fails."""
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                            str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                           capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stdout + build.stderr
    assert (tmp_path / "site" / "index.html").exists()
