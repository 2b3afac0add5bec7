"""Shared by the benchmark and evaluation scripts: print one JSON line, update a docs section.

Each script owns one section of a docs file, delimited by ``<!-- BEGIN name -->`` and
``<!-- END name -->``; rerunning the script replaces only its own section, so tables in docs/
are always generated, never typed.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"


def machine() -> str:
    """A short description of where the numbers were measured."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({threads} thread{'' if threads == 1 else 's'})"
    )


def emit(record: Mapping[str, Any]) -> None:
    print(json.dumps(record, sort_keys=False, default=str), flush=True)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_section(filename: str, name: str, markdown: str, title: str | None = None) -> Path:
    """Replace (or append) the section ``name`` of ``docs/filename``."""
    path = DOCS / filename
    DOCS.mkdir(exist_ok=True)
    text = path.read_text() if path.exists() else f"# {title or filename.removesuffix('.md')}\n"
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text + f"\n{block}\n"
    path.write_text(with_contents(text))
    return path


#: a file with at least this many generated sections gets a contents list after its title
CONTENTS_FROM = 3
_SECTION = re.compile(r"^<!-- BEGIN (\S+) -->\n## (.+)$", re.M)


def heading_anchors(text: str) -> list[tuple[str, str]]:
    """Each markdown heading line outside code fences, in order, with the anchor GitHub gives
    it: the title in lower case, every character but letters, digits, ``_``, ``-`` and spaces
    dropped, spaces as ``-``, a repeated anchor numbered ``-1``, ``-2`` in order."""
    seen: dict[str, int] = {}
    anchors, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.append((line, f"{slug}-{count}" if count else slug))
    return anchors


def with_contents(text: str) -> str:
    """``text`` with its contents block (``<!-- BEGIN contents -->``, right after the title
    line) made again from its generated sections, in file order: each section's title as a link
    and its name; a file with fewer than :data:`CONTENTS_FROM` sections gets none."""
    begin, end = "<!-- BEGIN contents -->", "<!-- END contents -->"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n+", "", text, flags=re.S)
    sections = _SECTION.findall(text)
    if len(sections) < CONTENTS_FROM:
        return text
    headings = iter(heading_anchors(text))
    lines = [begin, "Sections in file order (each section's name in brackets):", ""]
    for name, title in sections:
        anchor = next(anchor for line, anchor in headings if line == f"## {title}")
        lines.append(f"- [{title}](#{anchor}) (`{name}`)")
    first, _, rest = text.partition("\n")
    return "\n".join([first, "", *lines, end, "", rest.lstrip("\n")])


def timed(seconds: dict[str, float], name: str, work: Callable[..., Any]) -> Any:
    """``work()``, its wall seconds kept in ``seconds[name]``."""
    start = time.perf_counter()
    result = work()
    seconds[name] = round(time.perf_counter() - start, 1)
    return result


def rate_evaluator(
    handle: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    matcher: Any,
    lengths: Sequence[int],
    kl_tokens: int,
    batch_size: int,
) -> Callable[..., Any]:
    """``evaluate(edits=(), **extra) -> RateReport`` on these prompts: greedy replies as long as
    the longest of ``lengths``, the rate over each reply's first N tokens, KL over the base
    model's first ``kl_tokens`` tokens (computed here, once for every call); ``extra`` goes to
    ``evaluate_rate`` (e.g. ``edited_handle`` for baked weights)."""
    from steer.directions.evaluate import base_continuations, evaluate_rate
    from steer.text import encode_chat

    ids = [encode_chat(handle, prompt) for prompt in negative]
    continuations = base_continuations(handle, ids, tokens=kl_tokens, batch_size=batch_size)
    options: dict[str, Any] = {
        "matcher": matcher,
        "max_new_tokens": max(lengths),
        "lengths": lengths,
        "kl_tokens": kl_tokens,
        "batch_size": batch_size,
        "continuations": continuations,
    }

    def evaluate(edits: Sequence[Any] = (), **extra: Any) -> Any:
        return evaluate_rate(handle, positive, negative, edits, **options, **extra)

    return evaluate


def named(flag: str) -> Callable[[str], tuple[str, str]]:
    """An argparse ``type`` for ``NAME=VALUE`` options (``flag`` names the option in errors)."""
    import argparse

    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{flag} takes NAME=VALUE, got {text!r}")
        return name, value

    return parse


def run_facts(seconds: Mapping[str, float], load_before: float) -> dict[str, Any]:
    """The record keys :func:`run_footer` reads: the wall ``seconds`` of each step, the load
    average before the run (``load_before``) and now, and the machine."""
    return {
        "seconds": dict(seconds),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": machine(),
    }


def run_footer(record: Mapping[str, Any], command: str) -> str:
    """The closing paragraphs of a results section: wall times, machine and load average from
    ``record`` (keys ``seconds``, ``machine``, ``load_average``), then the command."""
    times = ", ".join(f"{k} {v}" for k, v in record["seconds"].items())
    before, after = record["load_average"]
    lines = [
        f"Wall times (s): {times}. Measured on {record['machine']}; load average {before} "
        f"before, {after} after.",
        "",
        *command_block(command),
    ]
    return "\n".join(lines) + "\n"


def command_block(command: str) -> list[str]:
    """The closing lines of a docs section: the command that wrote it."""
    return ["Command:", "", "```", command, "```"]


def command_line() -> str:
    """The command that ran this script, quoted so that it can be pasted back into a shell."""
    import shlex
    import sys

    return shlex.join(["python", f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def rate_row(name: str, report: Any, n_kl: int, n_quiet: int = 0) -> dict[str, Any]:
    """A test row: rates, KL on the first ``n_kl`` negative prompts (harmless), and on the
    ``n_quiet`` after them (the trigger-free situations: the recipe's ``gate_quiet`` set, or
    eval_unseen.py's unseen one) the KL and how many it moved."""
    from steer.directions.scores import kl_means

    row: dict[str, Any] = {"edit": name}
    for entry in report.by_length:
        row[f"rate @{entry.tokens}"] = f"{entry.rate:.3f} [{entry.low:.3f}, {entry.high:.3f}]"
    row["first-token KL"], row["multi-token KL"] = kl_means(report.kl_rows[:n_kl])
    if n_quiet:
        quiet = report.kl_rows[n_kl:]
        row["quiet first-token KL"], row["quiet multi-token KL"] = kl_means(quiet)
        row["quiet moved"] = f"{sum(max(r) > 0 for r in quiet)} / {n_quiet}"
    row["repetition in reply"] = reply_repetition(report)
    row["n"] = f"{report.n} / {n_kl}" + (f" + {n_quiet}" if n_quiet else "")
    return row


def reply_repetition(report: Any) -> float:
    """Mean share of a reply's word 3-grams that occurred earlier in it (``steer eval rp``'s
    repetition_in_reply) over the positive prompts' replies: where an edit breaks the model
    rather than moves it, the rate can drop while the replies loop."""
    from steer.rp.metrics import ngrams, repeated_share, words

    shares = [repeated_share(ngrams(words(e["response"]), 3)) for e in report.examples]
    return sum(shares) / max(len(shares), 1)
