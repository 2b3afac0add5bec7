"""The docs' shell examples: the runnable ones run, every steer command parses, nothing is missing.

* A fenced ``bash`` block right after ``<!-- runnable -->`` (or ``<!-- runnable: FIXTURE ARG,
  ... -->``) in README.md or docs/*.md is run by bash, line by line with ``-e``, in a fresh copy of
  the repository's files, against the tiny llama: the ``server`` fixture is an in-process server
  (``STEER_SERVER`` points at it, and the docs' 127.0.0.1:50051 is replaced by its address), the
  others write a file the example starts from (a vector artifact, a card, a bake output).
* Every ``steer ...`` line of every shell block, and every command in a recipe's comments, is
  parsed by that command's own parser: flags that do not exist fail here, not in a user's shell.
* Every artifact, SAE, card, recipe or bake output an example names exists in the repository or
  is made in the same place: by an ``--out`` of a command or comment there (``X is made by: steer
  ... --out X``), an upload (``steer artifacts upload DIR --id ID``) or ``load-sae ... --id``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from test_server import make_settings

from steer.models import ModelHandle

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
DEFAULT_SERVER = "127.0.0.1:50051"
#: seconds one runnable example may take (each steer command starts a Python process)
EXAMPLE_TIMEOUT = 240
_BLOCK = re.compile(
    r"(?:<!--\s*runnable(?P<marker>[^>]*)-->\n)?```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```",
    re.S | re.M,
)
_SHELL = ("bash", "sh", "shell", "console", "")


@dataclass(frozen=True)
class Block:
    """A fenced shell block of a doc: where it is, its text, and its fixtures if runnable."""

    path: Path
    line: int
    body: str
    runnable: bool
    fixtures: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _fixtures(marker: str) -> tuple[tuple[str, str], ...]:
    items = [item.strip() for item in marker.strip().removeprefix(":").split(",") if item.strip()]
    return tuple((item.split()[0], " ".join(item.split()[1:])) for item in items)


def shell_blocks(paths: list[Path] = DOCS) -> list[Block]:
    blocks = []
    for path in paths:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            if match.group("lang") not in _SHELL:
                continue
            runnable = match.group("marker") is not None
            if runnable and match.group("lang") != "bash":
                raise AssertionError(f"{path}: a runnable block is ```bash")
            line = text[: match.start("body")].count("\n") + 1
            fixtures = _fixtures(match.group("marker") or "")
            blocks.append(Block(path, line, match.group("body"), runnable, fixtures))
    return blocks


def commands(text: str) -> Iterator[list[str]]:
    """The steer commands of a shell text: its lines (continuations joined) and the commands
    comments name after a colon (``# X is made by: steer ...``), as argument lists."""
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if line.startswith("#") and ": steer " in line:
            line = line[line.index(": steer ") + 2 :]
        if not line.startswith("steer "):
            continue
        tokens = shlex.split(line, comments=True)
        for stop in ("|", "<", ">", "&&", ";"):
            tokens = tokens[: tokens.index(stop)] if stop in tokens else tokens
        if "[" not in " ".join(tokens) and "..." not in tokens:  # synopses are not commands
            yield tokens


def recipe_comments(path: Path) -> str:
    """A recipe's comments as shell text: the commands they show, continuations included."""
    lines = path.read_text().splitlines()
    return "\n".join(line.removeprefix("#").strip() for line in lines if line.startswith("#"))


# -- every steer command parses ------------------------------------------------------------------


class _Parsed(Exception):
    """Raised after a command's parser accepted its arguments, before it does anything."""


def _parses(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str | None:
    """None if ``steer argv`` parses, else what its parser said."""
    from steer.cli import main

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            main(argv[1:])
    except _Parsed:
        return None
    except SystemExit:
        return said.getvalue().strip().splitlines()[-1]
    return f"ran without parsing: {said.getvalue()}"


def test_every_steer_command_in_the_docs_and_recipes_parses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sources = [(b.name, b.body) for b in shell_blocks()]
    sources += [(str(p.relative_to(ROOT)), recipe_comments(p)) for p in RECIPES]
    seen, failures = 0, []
    for where, text in sources:
        for argv in commands(text):
            seen += 1
            problem = _parses(argv, monkeypatch)
            if problem is not None:
                failures.append(f"{where}: {shlex.join(argv)}: {problem}")
    assert not failures, "\n".join(failures)
    assert seen >= 40  # the commands were found


# -- everything an example names is there or made there -----------------------------------------

_PLACEHOLDER = re.compile(r"^(<.*>|[A-Z][A-Z_]*(\.\w+)?|[A-Z]/.*)$")
_PATH_OPTIONS = ("--recipe", "--card", "--vector", "--direction")


def _option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == name]


def _made(text: str, fixtures: tuple[tuple[str, str], ...] = ()) -> set[str]:
    made = set(re.findall(r"--out\s+(\S+)", text)) | {argument for _, argument in fixtures}
    return {path.rstrip("/") for path in made}


def _named_paths(argv: list[str]) -> Iterator[str]:
    """The local files ``steer argv`` reads, as written (strength and speaker suffixes cut)."""
    for option in _PATH_OPTIONS:
        for value in _option(argv, option):
            yield re.split(r"[=:]", value)[0]
    if argv[1:2] == ["bake"]:
        yield from (
            re.split(r":", v)[0] for v in _option(argv, "--ablate") + _option(argv, "--add")
        )
        yield from _option(argv, "--verify")
    if argv[1:3] == ["artifacts", "upload"] and len(argv) > 3:
        yield argv[3]


def _ids(argv: list[str]) -> Iterator[tuple[str, str]]:
    """(kind, id) of the server-side artifacts and SAEs ``steer argv`` names."""
    if argv[1:2] in (["generate"], ["chat"]):
        for value in _option(argv, "--steer"):
            yield "artifact", value.split("=")[0]
        for value in _option(argv, "--ablate"):
            yield "artifact", value
        for value in _option(argv, "--slider"):
            yield "sae", value.split(":")[1]


def _provided(argvs: list[list[str]]) -> set[tuple[str, str]]:
    provided = set()
    for argv in argvs:
        ids = _option(argv, "--id")
        if argv[1:3] == ["artifacts", "upload"] and len(argv) > 3:
            provided.add(("artifact", ids[0] if ids else Path(argv[3]).name))
        if argv[1:3] == ["models", "load-sae"] and len(argv) > 3:
            provided.add(("sae", ids[0] if ids else Path(argv[3]).name))
    return provided


def _is_there(path: str, made: set[str], base: Path) -> bool:
    if _PLACEHOLDER.match(path) or (base / path).exists():
        return True
    return any(path == m or path.startswith(m + "/") for m in made)


def missing_in(text: str, fixtures: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """What the commands of ``text`` name that is neither in the repository nor made in it."""
    argvs = list(commands(text))
    made, provided = _made(text, fixtures), _provided(argvs)
    problems = [
        f"{path} (named by {shlex.join(argv)})"
        for argv in argvs
        for path in _named_paths(argv)
        if not _is_there(path, made, ROOT)
    ]
    problems += [
        f"{kind} {name!r} (named by {shlex.join(argv)})"
        for argv in argvs
        for kind, name in _ids(argv)
        if (kind, name) not in provided
    ]
    return problems


def test_what_an_example_names_is_there_or_made_in_the_same_place() -> None:
    problems = [f"{b.name}: {p}" for b in shell_blocks() for p in missing_in(b.body, b.fixtures)]
    assert not problems, "\n".join(problems)


def test_the_check_finds_what_nothing_makes() -> None:
    assert missing_in('steer generate "Hi" --steer calm=4') == [
        "artifact 'calm' (named by steer generate Hi --steer calm=4)"
    ]
    made_here = [
        "# out/v is made by: steer directions compute --out out/v",
        "steer artifacts upload out/v --id calm",
        "steer chat --steer calm=2",
    ]
    assert missing_in("\n".join(made_here)) == []
    assert missing_in("steer bake --model M --recipe recipes/nope.toml --out x")


def _recipe_paths(path: Path) -> Iterator[str]:
    for edit in tomllib.loads(path.read_text()).get("edits", []):
        for key in ("direction", "harmless_mean", "vector", "sae"):
            if isinstance(edit.get(key), str):
                yield edit[key]


def test_every_shipped_recipe_names_what_it_needs_or_the_command_that_makes_it() -> None:
    problems = []
    for path in RECIPES:
        made = _made(recipe_comments(path))
        for value in _recipe_paths(path):
            relative = os.path.relpath((path.parent / value).resolve(), ROOT)
            if not _is_there(relative, made, ROOT):
                problems.append(f"{path.name}: {value} ({relative}): no comment makes it (--out)")
    assert not problems, "\n".join(problems)


# -- runnable examples ----------------------------------------------------------------------------


@dataclass
class Checkout:
    """A fresh copy of the repository's files, and what the example's fixtures set up."""

    root: Path
    handle: ModelHandle
    env: dict[str, str] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)


def fresh_checkout(target: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _server(checkout: Checkout, argument: str) -> None:
    from steer.server import SteerServer

    root = checkout.root.parent / "server-models"
    settings = make_settings(root, default_max_new_tokens=16)
    server = SteerServer(settings, models={"tiny": checkout.handle})
    server.start()
    checkout.closers.append(lambda: server.stop(grace=0.5))
    checkout.env["STEER_SERVER"] = server.target
    checkout.replacements[DEFAULT_SERVER] = server.target


def _vector(checkout: Checkout, argument: str) -> None:
    from steer.artifacts import save_vector
    from steer.vectors import SteeringVector

    values = 4 * torch.randn(checkout.handle.d_model, generator=torch.Generator().manual_seed(1))
    hooks = ["blocks.2.hook_resid_post"]
    vector = SteeringVector.from_shared(values)
    save_vector(checkout.root / argument, vector, handle=checkout.handle, hooks=hooks)


def _card(checkout: Checkout, argument: str) -> None:
    from steer.rp.cards import write_png_card
    from steer.rp.scene import Character

    mira = Character(
        "Mira",
        "{{char}} keeps a lighthouse.",
        scenario="{{user}} washes ashore.",
        first_message="You're lucky, {{user}}.",
    )
    write_png_card(mira, checkout.root / argument)


def _source(checkout: Checkout) -> Path:
    source = checkout.root.parent / "tiny-source"
    if not source.exists():
        checkout.handle.model.save_pretrained(source)
        checkout.handle.tokenizer.save_pretrained(source)
    return source


def _bake_output(checkout: Checkout, argument: str, output_format: str = "model") -> None:
    from steer.bake import bake

    vector = checkout.root.parent / "bake-vector"
    _vector(checkout, str(vector))
    edit = {"kind": "add", "vector": str(vector), "strength": 1.0, "layers": [1, 2]}
    target = checkout.root / argument
    target.parent.mkdir(parents=True, exist_ok=True)
    bake(str(_source(checkout)), {"edits": [edit]}, target, output_format=output_format)


FIXTURES: dict[str, Callable[[Checkout, str], None]] = {
    "server": _server,
    "vector": _vector,
    "card": _card,
    "baked": _bake_output,
    "control-vector": lambda checkout, path: _bake_output(checkout, path, "control-vector"),
}


def _run(block: Block, checkout: Checkout) -> subprocess.CompletedProcess[str]:
    body = block.body
    for old, new in checkout.replacements.items():
        body = body.replace(old, new)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", body],
        cwd=checkout.root,
        env={**os.environ, "PATH": path, **checkout.env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT,
    )


RUNNABLE = [block for block in shell_blocks() if block.runnable]


def test_runnable_examples_are_marked() -> None:
    assert len(RUNNABLE) >= 4
    for block in RUNNABLE:
        assert {name for name, _ in block.fixtures} <= set(FIXTURES), block.name


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_runnable_example_runs(block: Block, tiny_llama: ModelHandle, tmp_path: Path) -> None:
    checkout = Checkout(fresh_checkout(tmp_path / "steer"), tiny_llama)
    try:
        for name, argument in block.fixtures:
            FIXTURES[name](checkout, argument)
        result = _run(block, checkout)
    finally:
        for close in checkout.closers:
            close()
    report = (
        f"{block.name} exited {result.returncode}\n{block.body}\n{result.stdout}\n{result.stderr}"
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, report
