"""Regenerate the Python stubs in steer/proto/ from protos/steer/v1/*.proto.

    python scripts/gen_protos.py           # rewrite steer/proto/v1/
    python scripts/gen_protos.py --check   # exit 1 if the committed stubs are stale

protoc writes ``from steer.v1 import x_pb2``; the stubs live in the package ``steer.proto.v1``, so
imports are rewritten to that. ``--check`` compares the stubs without the lines where the generator
stamps its own version (``GRPC_GENERATED_VERSION``, protobuf's version comment and runtime check):
a grpcio-tools release changes those, not what the .proto files say, and CI installs the newest.
Those stamps are runtime floors (a stub refuses an older grpcio or protobuf), so pyproject.toml's
floors must be at least the committed stamps (tests/test_server.py checks).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "steer" / "proto" / "v1"
PACKAGE_INIT = '"""Generated protobuf and gRPC stubs (scripts/gen_protos.py); do not edit."""\n'
#: where a stub names the generator's version rather than the .proto files' content
STAMPS = (
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"ValidateProtobufRuntimeVersion\([^)]*\)"),
)


def generate(out: Path) -> list[Path]:
    """Run protoc into ``out`` (flat) and return the files written."""
    from grpc_tools import protoc

    sources = sorted(PROTOS.glob("steer/v1/*.proto"))
    with tempfile.TemporaryDirectory() as raw:
        import grpc_tools

        include = Path(grpc_tools.__file__).parent / "_proto"
        arguments = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *[str(source.relative_to(PROTOS)) for source in sources],
        ]
        if protoc.main(arguments) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for path in sorted((Path(raw) / "steer" / "v1").iterdir()):
            text = re.sub(
                r"\bfrom steer\.v1 import\b", "from steer.proto.v1 import", path.read_text()
            )
            (out / path.name).write_text(text)
            written.append(out / path.name)
    (out / "__init__.py").write_text(PACKAGE_INIT)
    (out.parent / "__init__.py").write_text(PACKAGE_INIT)
    return [*written, out / "__init__.py", out.parent / "__init__.py"]


def unstamped(path: Path) -> str:
    """``path``'s text with the generator's version stamps blanked."""
    text = path.read_text()
    for stamp in STAMPS:
        text = stamp.sub("<generator version>", text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        if TARGET.exists():
            shutil.rmtree(TARGET)
        for path in generate(TARGET):
            print(path.relative_to(ROOT))
        return 0
    with tempfile.TemporaryDirectory() as temp:
        fresh = Path(temp) / "proto" / "v1"
        generate(fresh)
        names = (
            {p.name for p in fresh.iterdir()}
            | {p.name for p in TARGET.iterdir() if p.suffix in (".py", ".pyi")}
            if TARGET.exists()
            else {p.name for p in fresh.iterdir()}
        )
        stale = [
            name
            for name in sorted(names)
            if not (TARGET / name).exists()
            or not (fresh / name).exists()
            or unstamped(fresh / name) != unstamped(TARGET / name)
        ]
    if stale:
        print(f"stale stubs in steer/proto/v1: {', '.join(stale)}; run scripts/gen_protos.py")
        return 1
    print("steer/proto stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
