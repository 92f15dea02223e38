"""The docs stay true to the code: every `cmkit` command they show parses with the real command
line, their Python compiles, and every link and repository path they name exists. (The README's
commands also run: tests/test_readme.py.)"""

import argparse
import functools
import re
import shlex
import textwrap
from pathlib import Path

import pytest

from cmkit.cli import build_parser
from cmkit.config import default_config
from cmkit.errors import CmkitError
from cmkit.objectives.registry import method_names

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
COMMAND = re.compile(r"^(?:\.venv/bin/)?cmkit (.*)|^torchrun .*?-m cmkit (.*)|^python3? -m cmkit (.*)")
# Paths in the repository that docs name in backticks or links.
REPO_PATH = re.compile(r"(?<![\w./-])((?:bench|examples|tests|docs|src/cmkit)/[\w./-]*\w)")
# Named but not meant to exist: design.md's worked example of adding a method, and outputs.
NOT_FILES = ("src/cmkit/objectives/lcm.py", "src/cmkit/configs/lcm.json", "bench/out")


def _blocks(text: str, languages: str) -> list[str]:
    """The fenced code blocks whose language matches ``languages`` (a regex; "" for none), opening
    and closing fences paired in order."""
    blocks, language, lines = [], None, []
    for line in text.splitlines():
        if not line.startswith("```"):
            lines.append(line)
        elif language is None:
            language, lines = line[3:].strip(), []
        else:
            if re.fullmatch(languages, language):
                blocks.append("\n".join(lines) + "\n")
            language = None
    return blocks


def doc_commands(text: str) -> list[str]:
    """The argument strings of the `cmkit` commands in a document's shell blocks."""
    found = []
    for block in _blocks(text, "bash|sh|console|"):
        for raw in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = raw.split("  #")[0].strip().removeprefix("$ ")
            match = COMMAND.match(line)
            if match:
                found.append(next(g for g in match.groups() if g is not None))
    return found


parser = functools.cache(build_parser)  # argparse parsers are reusable: build the full one once


def parse_error(arguments: str) -> str | None:
    """What the command line says about these arguments, or None if they parse."""
    try:
        parser().parse_args(shlex.split(arguments))
    except CmkitError as e:  # cmkit's parser reports a mistake this way
        return str(e)
    except SystemExit as e:  # --help
        return None if not e.code else f"exit {e.code}"
    return None


def test_the_checks_catch_a_stale_command():
    assert doc_commands("```bash\ncmkit train --methd edm --out runs/x  # typo\n```") == ["train --methd edm --out runs/x"]
    assert parse_error("train --methd edm --out runs/x") is not None
    assert parse_error("sample --checkpoint runs/cd --n 8 --steps 2") is not None  # no --out
    assert parse_error("sample --checkpoint runs/cd --n 8 --steps 2 --out runs/s.npy") is None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_in_the_docs_parses(doc, capsys):
    bad = [arguments for arguments in doc_commands(doc.read_text()) if parse_error(arguments)]
    capsys.readouterr()  # argparse's usage lines
    assert not bad, f"{doc.name}: commands the command line refuses: {bad}"


def test_the_docs_show_commands():
    assert sum(len(doc_commands(doc.read_text())) for doc in DOCS) >= 40


def _subcommands(p: argparse.ArgumentParser) -> dict:
    return {name: sub for action in p._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def _options(p: argparse.ArgumentParser) -> set[str]:
    """A parser's options and those of all its sub-commands."""
    own = {option for action in p._actions for option in action.option_strings}
    return own.union(*(_options(sub) for sub in _subcommands(p).values()))


def known_options(words: list[str]) -> set[str]:
    """The options of the (sub)command these words name; for a sub-command left open (`cmkit edit
    inpaint|superres ...`, `cmkit edit --input`), those of all its sub-commands."""
    p = parser()
    for word in words:
        if word not in _subcommands(p):
            break
        p = _subcommands(p)[word]
    return _options(p)


def inline_commands(text: str) -> list[str]:
    """`cmkit ...` spans in running text: usually with placeholders (RUN, [--opt]), so not parsed
    whole; their options are checked."""
    return re.findall(r"`cmkit ([^`]+)`", text)


def test_the_option_check_catches_a_renamed_option():
    assert "--checkpoint" in known_options(["edit", "inpaint"]) and "--box" in known_options(["edit", "inpaint"])
    assert "--box" in known_options(["edit", "inpaint|superres"])  # an open choice: any of them
    assert "--teacher" in known_options(["train"]) and "--teachr" not in known_options(["train"])
    assert "--input" in known_options(["edit"]) and "--input" not in known_options(["sample"])


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_option_the_docs_name_exists(doc):
    text = doc.read_text()
    unknown = []
    for span in inline_commands(text) + doc_commands(text):
        words = [w for w in re.split(r"[\s=]+", span.replace("\\|", "|")) if w]
        command = []
        for word in words[:2]:
            if not re.fullmatch(r"[a-z][a-z-]*(\|[a-z-]+)*", word):
                break
            command.append(word)
        options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span))
        unknown += [f"cmkit {span}: {o}" for o in sorted(options - known_options(command))]
    assert not unknown, f"{doc.name} names options the command line does not have: {unknown}"


def config_keys() -> set[str]:
    """Every `section.key` some method's defaults have, for vectors or images."""
    keys = set()
    for method in method_names():
        for images in (False, True):
            config = default_config(method, images)
            keys |= {f"{section}.{key}" for section, values in config.items() if isinstance(values, dict)
                     for key in values}
    return keys


def test_every_config_key_the_docs_set_exists():
    keys = config_keys()
    assert {"data.resolution", "model.preset", "train.sample_every"} <= keys and "model.presett" not in keys
    unknown = []
    for doc in DOCS:
        for key in re.findall(r"--set ([a-z_]+\.[a-z_0-9]+)=", doc.read_text()):
            if key not in keys and key != "section.key":  # the guide's placeholder
                unknown.append(f"{doc.name}: {key}")
    assert not unknown, f"config keys that no method has: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_in_the_docs_compiles(doc):
    for i, code in enumerate(_blocks(doc.read_text(), "python")):
        compile(textwrap.dedent(code), f"{doc.name} python block {i + 1}", "exec")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_and_paths_in_the_docs_exist(doc):
    text = doc.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            if not (doc.parent / target.split("#")[0]).exists():
                missing.append(target)
    for path in REPO_PATH.findall(text):
        if not (REPO / path).exists() and not path.startswith(NOT_FILES):
            missing.append(path)
    assert not missing, f"{doc.name} names what the repository does not have: {missing}"
    assert "../shared" not in text and "/work/" not in text  # self-contained
