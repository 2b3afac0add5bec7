"""Regenerate the README's file tree (one line per tracked file) from the files themselves.

Python files are described by the first line of their module docstring; other files by the
table below. Run after adding files: ``python scripts/readme_tree.py``; ``--check`` exits
non-zero when the README is stale (the test command runs it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- BEGIN tree -->", "<!-- END tree -->"
SKIP_PREFIXES = ("steer/proto/steer/", "tests/data/")

DESCRIPTIONS = {
    ".ci/run": "CI entry point: runs the README's test command",
    ".gitignore": "files git ignores",
    "README.md": "this file",
    "pyproject.toml": "package metadata, dependencies, extras, ruff/mypy/pytest settings",
    "scripts/test.sh": "the test command: install, ruff, mypy, stub and README checks, pytest",
}


def describe(path: str) -> str:
    if path in DESCRIPTIONS:
        return DESCRIPTIONS[path]
    file = ROOT / path
    if path.endswith(".py"):
        try:
            docstring = ast.get_docstring(ast.parse(file.read_text()))
        except SyntaxError:
            docstring = None
        if docstring:
            return docstring.strip().splitlines()[0].rstrip(".")
        return "(package marker)" if file.name == "__init__.py" else ""
    if path.endswith(".md"):
        for line in file.read_text().splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    if path.endswith(".proto"):
        for line in file.read_text().splitlines():
            if line.startswith("//"):
                return line.lstrip("/ ").strip()
    if path.endswith((".toml", ".jsonl", ".txt")):
        first = file.read_text().splitlines()[:1]
        if first and first[0].startswith("#"):
            return first[0].lstrip("# ").strip()
        if path.endswith(".jsonl"):
            count = sum(1 for line in file.read_text().splitlines() if line.strip())
            return f"data, {count} records"
    return ""


def tree() -> str:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    files = [f for f in files if not f.startswith(SKIP_PREFIXES)]
    width = max(len(f) for f in files) + 2
    lines = ["```"]
    for path in sorted(files):
        text = describe(path)
        lines.append(f"{path:<{width}}{text}".rstrip())
    lines.append("```")
    return "\n".join(lines)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    new = text[:start] + "\n" + tree() + "\n" + text[end:]
    if "--check" in sys.argv:
        if new != text:
            print(
                "README.md file tree is stale: run python scripts/readme_tree.py", file=sys.stderr
            )
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
