"""``steer eval moralizing``: moralizing rate on held-out RP situations and the KL cost.

Prints one JSON line with ``moralizing_rate``, ``n``, ``kl_first_token``, ``kl_multi_token``
(both 0 for the unedited model) and the wall time of each step. With no ``--prompts`` file the
held-out RP situations of the recipe (default recipes/moralizing.toml) are answered greedily and
checked with the moralizing phrase matcher of :mod:`steer.directions.evaluate`; the KL is
measured on held-out harmless instructions (or ``--harmless``). ``--direction DIR`` ablates the
direction; with ``--strength S`` it is added at its layer instead (S < 0 pushes away from
moralizing). ``--edits RECIPE.toml`` applies an edit recipe at run time; ``--baked MODEL_DIR``
evaluates the baked form of such edits against ``--model``.
"""

from __future__ import annotations

from steer.cli.eval_refusal import parser, run


def main(
    argv: list[str], *, prog: str = "steer eval moralizing", command: str = "moralizing"
) -> int:
    if "-h" in argv or "--help" in argv:
        # the options are eval refusal's (run parses them); the description is this module's
        help_parser = parser(prog, kind="moralizing")
        help_parser.description = __doc__
        help_parser.print_help()
        return 0
    return run(argv, prog=prog, kind="moralizing")
