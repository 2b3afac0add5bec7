"""``steer eval KIND``: dispatches to one module per evaluation."""

from __future__ import annotations

import importlib
import sys

KINDS = {
    "refusal": "steer.cli.eval_refusal",
    "moralizing": "steer.cli.eval_moralizing",
    "rp": "steer.cli.eval_rp",
}


def main(argv: list[str], *, prog: str = "steer eval", command: str = "eval") -> int:
    if not argv or argv[0] not in KINDS:
        print(f"usage: {prog} {{{','.join(KINDS)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(KINDS[argv[0]])
    return int(module.main(argv[1:], prog=f"{prog} {argv[0]}", command=argv[0]) or 0)
