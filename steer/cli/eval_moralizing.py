"""``steer eval moralizing``: moralizing rate on held-out RP situations and the KL cost.

Same options as ``steer eval refusal`` (``--prompts`` instead of ``--harmful``); the rate uses
the moralizing phrase matcher of :mod:`steer.directions.evaluate`, the KL is measured on
held-out harmless instructions.
"""

from __future__ import annotations

from steer.cli.eval_refusal import run


def main(
    argv: list[str], *, prog: str = "steer eval moralizing", command: str = "moralizing"
) -> int:
    return run(argv, prog=prog, kind="moralizing")
