"""The ``steer`` command. Each subcommand lives in its own module, imported only when used.

A subcommand module exposes ``main(argv: list[str]) -> int`` and builds its own argparse parser;
adding a command is one line in ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import sys

from steer.errors import SteerError

#: name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("steer.cli.demo", "steered vs default generation on a local model, side by side"),
    "serve": ("steer.cli.serve", "run the gRPC service"),
    "deploy": ("steer.cli.deploy", "serve on Ray Serve: replicas behind one endpoint"),
    "generate": ("steer.cli.remote", "generate through a running server"),
    "chat": ("steer.cli.remote", "interactive chat through a running server, with sliders"),
    "models": ("steer.cli.remote", "list, load and unload models and SAEs on a running server"),
    "artifacts": (
        "steer.cli.artifacts",
        "upload, list, download and delete vector artifacts on a running server",
    ),
    "directions": ("steer.cli.directions", "compute and optimise directions"),
    "eval": ("steer.cli.evaluate", "evaluate refusal, moralizing and RP behaviour"),
    "bake": ("steer.cli.bake", "write edits into new weights, a LoRA or a control vector"),
    "features": ("steer.cli.features", "inspect SAE features"),
    "sae": ("steer.cli.sae", "train and load sparse autoencoders"),
}


def _usage() -> str:
    lines = ["usage: steer COMMAND [options]   (steer COMMAND --help for details)", "", "commands:"]
    for name, (_module, description) in COMMANDS.items():
        lines.append(f"  {name:<11} {description}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from steer import __version__

        print(__version__)
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"steer: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(command[0])
    except ModuleNotFoundError as error:
        if error.name != command[0]:
            raise
        print(f"steer: command {args[0]!r} is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(module.main(args[1:], prog=f"steer {args[0]}", command=args[0]) or 0)
    except SteerError as error:
        print(f"steer {args[0]}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
