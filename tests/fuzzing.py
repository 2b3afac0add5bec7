"""Property-based fuzzing of the gRPC service: request strategies for every rpc and one harness.

Shared by ``tests/test_fuzz_service.py`` (a seeded slice in CI) and ``scripts/fuzz_service.py``
(the long run that writes docs/reliability.md). The pieces:

* :func:`server_rpcs` lists every rpc the server registers, read from the proto descriptors.
* :func:`prepare_root` fills a models root with what requests can name (a bake source, a previous
  bake output, artifacts, SAEs, recipes, data, a sentinel file, links out of the root) and
  records it, so every example can start from the same files (:meth:`Fuzzer.restore`).
* Strategies: :func:`message_strategy` builds any request from its descriptor with adversarial
  values chosen by field type and name (NaN, +-inf, +-1e308, 5e-324, 3.4e38, integer maxima,
  wrong vector widths, unknown ids and hooks, escaping paths, huge and nested strings, empty
  everything); hand-written strategies cover the shapes that matter (Generate with samplers and
  interventions, Bake with output paths, Upload with sidecar and tensor bytes, recipes);
  :func:`garbage_cases` sends raw bytes (random, mutated, invalid UTF-8, deep nesting, oversize).
* :class:`Fuzzer` runs one :class:`Case` and checks the properties: (1) no INTERNAL or UNKNOWN
  status (for jobs, no such error code); (2) the server stays healthy (health SERVING, every
  List answers, the model's Info answers); (3) a normal greedy stream sent together with a
  Generate request or a feature read yields exactly its tokens alone; (4) no file outside a
  request's own output (a bake output, an uploaded, computed or deleted artifact) is removed,
  replaced or added, in the models root or beyond a link out of it; (5) errors name paths
  relative to the models root.
* :func:`run_fuzz` runs ``count`` cases with a fixed seed, either strict (hypothesis shrinks
  each distinct failure to a minimal case, then they are raised) or recording (every outcome
  counted, failures collected).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import logging
import math
import os
import pkgutil
import re
import shutil
import struct
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
import httpx
import torch
from google.protobuf import json_format, message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from safetensors.torch import save as safetensors_bytes

import steer.proto.v1
from steer.artifacts import save_vector
from steer.http import fields as http_fields
from steer.models import ModelHandle
from steer.proto.v1 import (
    bake_pb2,
    directions_pb2,
    features_pb2,
    generation_pb2,
    jobs_pb2,
    models_pb2,
)
from steer.rp.formats import FORMATS
from steer.server import ServerSettings, SteerServer
from steer.vectors import SteeringVector

# -- the rpcs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    """One rpc of the server: its wire path, message classes and shape."""

    service: str
    method: str
    request: type[Message]
    response: type[Message]
    streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def name(self) -> str:
        """``Models.List``: the service's short name and the method."""
        return f"{self.service.rsplit('.', 1)[-1]}.{self.method}"


def server_rpcs() -> tuple[Rpc, ...]:
    """Every rpc of every service in the generated stubs (steer/proto/v1), plus the health
    check (its Watch never ends and reflection is a bidirectional stream: both are grpc's own
    code and left out)."""
    rpcs = []
    modules = sorted(m.name for m in pkgutil.iter_modules(steer.proto.v1.__path__))
    services = [
        service
        for name in modules
        if name.endswith("_pb2")
        for service in importlib.import_module(
            f"steer.proto.v1.{name}"
        ).DESCRIPTOR.services_by_name.values()
    ]
    for service in services:
        for method in service.methods:
            rpcs.append(
                Rpc(
                    service.full_name,
                    method.name,
                    message_factory.GetMessageClass(method.input_type),
                    message_factory.GetMessageClass(method.output_type),
                    method.server_streaming,
                )
            )
    rpcs.append(
        Rpc(
            "grpc.health.v1.Health",
            "Check",
            health_pb2.HealthCheckRequest,
            health_pb2.HealthCheckResponse,
            False,
        )
    )
    return tuple(rpcs)


RPCS = server_rpcs()
RPCS_BY_NAME = {rpc.name: rpc for rpc in RPCS}


def rpcs_of(*services: str) -> tuple[Rpc, ...]:
    """The rpcs of the named services (short names: "Models", "Health", ...)."""
    return tuple(rpc for rpc in RPCS if rpc.service.rsplit(".", 1)[-1] in services)


# -- the models root the fuzzer works in ---------------------------------------------------------

INNOCENT_PROMPT = "The dragon laughed"
INNOCENT_TOKENS = 32
SOURCE_DIR = "tiny-llama"
PREVIOUS_BAKE = "baked/prev"
PREVIOUS_CONTROL_VECTOR = "baked/prev.gguf"
SENTINELS = ("operator-notes.txt", "notes/keep.txt")
SAE_HOOK_LAYER = 1
SAE_FEATURES = 96

#: a direction recipe that runs in about a second on a tiny model (tests/test_server_jobs.py)
CONTRAST_RECIPE = """name = "fire"
kind = "contrast"
[data]
positive = "{positive}"
negative = "{negative}"
train = {train}
validation = 0.25
filter = false
[search]
layers = {layers}
positions = {positions}
top_k = {top_k}
[evaluate]
max_new_tokens = 2
kl_tokens = 2
"""


#: the operator's named sliders (steer serve --sliders); "gentle" is on in every request
SLIDERS = """
[sliders.calm]
kind = "add"
artifact = "calm"
min = -8.0
max = 8.0

[sliders.refusal]
kind = "ablate"
artifact = "refusal"
min = 0.0
max = 1.5

[sliders.feature]
kind = "feature"
sae = "resid"
feature = 3
mode = "add_decoder"
min = -4.0
max = 4.0

[sliders.scaled]
kind = "feature"
sae = "resid"
feature = 5
mode = "scale"
min = 0.0
max = 3.0
default = 1.0

[sliders.gentle]
kind = "add"
artifact = "calm"
phase = "generated"
min = -1.0
max = 1.0
default = 0.25
"""


def fuzz_settings(root: Path, **overrides: Any) -> ServerSettings:
    """Small limits so that any request the fuzzer makes is cheap on a tiny model."""
    values: dict[str, Any] = {
        "port": 0,
        "models_root": root,
        "max_batch": 16,
        "max_waiting": 64,
        "default_max_new_tokens": 8,
        "max_new_tokens_cap": 64,
        "max_prompt_tokens": 256,
        "max_feature_texts": 8,
        "max_message_bytes": 4 * 1024 * 1024,
        "shutdown_grace": 1.0,
    }
    values.update(overrides)
    return ServerSettings(**values)


@dataclass(frozen=True)
class Fixture:
    """The files of a prepared models root (and of the directory its links point to)."""

    root: Path
    outside: Path
    #: relative path -> bytes, for regular files under root / outside
    files: Mapping[str, bytes]
    outside_files: Mapping[str, bytes]
    #: relative path -> link target, for symlinks under root
    links: Mapping[str, str]
    #: previous steer bake outputs (a request may replace these with overwrite)
    bake_outputs: tuple[str, ...]


def _random_sae(d_in: int, hook: str, seed: int) -> Any:
    """A SAELens standard SAE with random weights."""
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=SAE_FEATURES))
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.05 if parameter.ndim == 1 else 0.3)
    return sae


def _vector(handle: ModelHandle, seed: int, *, shared: bool = False) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    if shared:
        return SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator))
    return SteeringVector(
        per_layer={
            layer: torch.randn(handle.d_model, generator=generator)
            for layer in range(handle.num_layers)
        }
    )


def prepare_root(root: Path, served: ModelHandle, source: ModelHandle) -> Fixture:
    """Fill ``root`` with everything requests may name and return its recorded state.

    ``served`` is the model the server holds; ``source`` a tiny model saved as the bake source
    (so bakes finish in a fraction of a second). Artifacts ``refusal`` (per-layer direction),
    ``calm`` (per-layer vector with hooks), ``shared`` (a shared vector) and ``foreign`` (made for
    other weights) belong to ``served``; ``bake-direction`` and ``bake-vector`` to ``source``.
    """
    from steer.bake.api import bake

    root.mkdir(parents=True, exist_ok=True)
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("outside the models root\n")
    (outside / "sliders.toml").write_text(SLIDERS)  # the operator's file: outside the root
    source.model.save_pretrained(root / SOURCE_DIR)
    source.tokenizer.save_pretrained(root / SOURCE_DIR)
    artifacts = root / "artifacts"
    hook = f"blocks.{SAE_HOOK_LAYER}.hook_resid_post"
    save_vector(artifacts / "refusal", _vector(served, 1), handle=served, kind="direction")
    save_vector(artifacts / "calm", _vector(served, 2), handle=served, hooks=[hook])
    save_vector(artifacts / "shared", _vector(served, 3, shared=True), handle=served)
    foreign = save_vector(artifacts / "foreign", _vector(served, 4), handle=served)
    sidecar = json.loads((foreign / "steer.json").read_text())
    sidecar["model"]["weight_hash"] = "0" * 64  # made for other weights of the same shape
    (foreign / "steer.json").write_text(json.dumps(sidecar))
    save_vector(artifacts / "bake-direction", _vector(source, 5), handle=source, kind="direction")
    save_vector(artifacts / "bake-vector", _vector(source, 6), handle=source)
    _random_sae(served.d_model, hook, 0).save_model(root / "saes" / "resid")
    _random_sae(32, hook, 1).save_model(root / "saes" / "wide")
    _random_sae(served.d_model, hook, 2).save_model(outside / "sae")
    (root / "saes" / "link").symlink_to(outside / "sae", target_is_directory=True)
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    recipes = root / "recipes"
    recipes.mkdir()
    (recipes / "ablate.toml").write_text(bake_recipe("ablate", "bake-direction"))
    (recipes / "contrast.toml").write_text(contrast_recipe())
    (recipes / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (recipes / "nested.toml").write_text("a = " + "[" * 3000 + "]" * 3000 + "\n")
    data = root / "data"
    data.mkdir()
    (data / "fire.txt").write_text("\n".join(f"The dragon breathed fire on {i}" for i in range(8)))
    (data / "bread.txt").write_text("\n".join(f"How do I bake bread {i}" for i in range(8)))
    for sentinel in SENTINELS:
        (root / sentinel).parent.mkdir(parents=True, exist_ok=True)
        (root / sentinel).write_text("an operator's own file: no request may touch it\n")
    bake(
        str(root / SOURCE_DIR),
        bake_recipe("ablate", str(artifacts / "bake-direction")),
        root / PREVIOUS_BAKE,
    )
    bake(
        str(root / SOURCE_DIR),
        bake_recipe("add", str(artifacts / "bake-vector")),
        root / PREVIOUS_CONTROL_VECTOR,
        output_format="control-vector",
    )
    files, links = _read_tree(root)
    outside_files, _ = _read_tree(outside)
    return Fixture(
        root, outside, files, outside_files, links, (PREVIOUS_BAKE, PREVIOUS_CONTROL_VECTOR)
    )


def _read_tree(top: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = Path(directory) / name
            relative = str(path.relative_to(top))
            if path.is_symlink():
                links[relative] = os.readlink(path)
            elif path.is_file():
                files[relative] = path.read_bytes()
    return files, links


def snapshot(top: Path) -> dict[str, tuple[int, int, str]]:
    """relative path -> (size, mtime_ns, kind) of every file and link under ``top``
    (links are not followed)."""
    state: dict[str, tuple[int, int, str]] = {}
    if not top.is_dir() or top.is_symlink():
        return state
    for directory, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = Path(directory) / name
            stat = path.lstat()
            if path.is_symlink():
                state[str(path.relative_to(top))] = (0, 0, "link:" + os.readlink(path))
            elif not path.is_dir():
                state[str(path.relative_to(top))] = (stat.st_size, stat.st_mtime_ns, "file")
    return state


def _restore_tree(top: Path, files: Mapping[str, bytes], links: Mapping[str, str]) -> None:
    """Make ``top`` hold exactly ``files`` and ``links`` again (nothing else)."""
    if top.is_symlink() or (top.exists() and not top.is_dir()):
        top.unlink()
    top.mkdir(parents=True, exist_ok=True)
    wanted_dirs = {str(Path(p).parent) for p in [*files, *links]}
    wanted_dirs |= {str(parent) for p in wanted_dirs for parent in Path(p).parents}
    for directory, dirnames, filenames in os.walk(top, topdown=False):
        for name in [*filenames, *dirnames]:
            path = Path(directory) / name
            relative = str(path.relative_to(top))
            if path.is_symlink():
                if links.get(relative) != os.readlink(path):
                    path.unlink()
            elif path.is_dir():
                if relative not in wanted_dirs:
                    shutil.rmtree(path, ignore_errors=True)
            elif relative not in files:
                path.unlink()
    for relative, data in files.items():
        path = top / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
    for relative, target in links.items():
        path = top / relative
        if not path.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            path.symlink_to(target)


# -- recipes ---------------------------------------------------------------------------------------


def bake_recipe(kind: str, reference: str, **values: str) -> str:
    """A bake recipe with one edit; ``values`` are TOML literals (``weight="1e308"``)."""
    key = {"ablate": "direction", "add": "vector", "feature": "sae"}[kind]
    lines = ['name = "fuzz"', "[[edits]]", f'kind = "{kind}"', f"{key} = {json.dumps(reference)}"]
    if kind == "add" and "layers" not in values and "hooks" not in values:
        values = {"layers": "[1, 2]", **values}
    if kind == "feature" and "feature" not in values:
        values = {"feature": "3", **values}
    lines += [f"{name} = {literal}" for name, literal in values.items()]
    return "\n".join(lines) + "\n"


def contrast_recipe(**values: str) -> str:
    defaults = {
        "positive": "data/fire.txt",
        "negative": "data/bread.txt",
        "train": "0.5",
        "layers": "[1, 2]",
        "positions": "[-1]",
        "top_k": "1",
    }
    return CONTRAST_RECIPE.format(**{**defaults, **values})


# -- adversarial values ----------------------------------------------------------------------------

#: finite values inside most fields' ranges that are still hard to compute with: the smallest
#: subnormal, the largest doubles, float32's maximum, one ulp around 1 (these pass validation)
IN_RANGE_EXTREMES = (5e-324, 1e-300, 1e-30, 1e30, 3.4e38, 1e308, 1.7976931348623157e308,
                     0.9999999999999999, 1.0000000000000002, 0.0, 1.0, 2.0, 100.0)  # fmt: skip
#: what validation must refuse
OUT_OF_RANGE_FLOATS = (math.nan, math.inf, -math.inf, -1e308, -5e-324, -0.0, -1.0, -3.4e38)
EXTREME_FLOATS = IN_RANGE_EXTREMES + OUT_OF_RANGE_FLOATS
UINT32_EDGES = (0, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1)
UINT64_EDGES = (0, 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)
INT_EDGES = (0, 1, -1, -(2**31), 2**31 - 1)
INT64_EDGES = (0, 1, -1, -(2**63), 2**63 - 1)
STRING_EDGES = (
    "",
    " ",
    ".",
    "..",
    "...",
    "/",
    "//",
    "/etc",
    "/etc/passwd",
    "a/../..",
    "../",
    "../..",
    "./.",
    "./",
    "~",
    "~root",
    "\x00",
    "a\x00b",
    "%2e%2e",
    "..\\..",
    "C:\\Windows",
    "-",
    "_",
    ".hidden",
    "-rf",
    "a" * 129,
    "ñ",
    "🐉",
    "\u202e",
    "\n",
    "\r\n",
    "\t",
    "null",
    "NaN",
    "{}",
    "[]",
    "' OR 1=1 --",
    "{{char}}",
    "<|im_end|>",
    "<|im_start|>",
    "<pad>",
    "\ufeff",
    "\U0010ffff",
    "CON",
    "nul",
    "a/b/c",
)
#: characters big strings are made of (repeated, so a 200k string costs nothing to draw)
_BIG_UNITS = ("a", "é", "🐉", "\x00", "ab\n", "{{char}}", "<|im_end|>", " ", "[", "\\")


def choice(*options: tuple[int, SearchStrategy[Any]]) -> SearchStrategy[Any]:
    """One of ``options``, each drawn with probability proportional to its weight.

    ``st.one_of`` drops repeated strategies, so repeating one there does not weigh it."""
    pool = [strategy for weight, strategy in options for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def floats() -> SearchStrategy[float]:
    """In-range extremes three times in five, else non-finite or negative, else any double."""
    return choice(
        (3, st.sampled_from(IN_RANGE_EXTREMES)),
        (1, st.sampled_from(OUT_OF_RANGE_FLOATS)),
        (1, st.floats()),
    )


def finite_reasonable() -> SearchStrategy[float]:
    return st.floats(-10, 10, allow_nan=False, allow_infinity=False)


def uint32s(*extra: int) -> SearchStrategy[int]:
    return st.one_of(st.sampled_from(UINT32_EDGES + extra), st.integers(0, 2**32 - 1))


def small_counts(*extra: int) -> SearchStrategy[int]:
    """Counts (k, num_tokens, max_new_tokens ...): mostly small, sometimes the maxima."""
    return st.one_of(
        st.integers(0, 12), st.sampled_from((*UINT32_EDGES, *extra)), st.integers(0, 2**32 - 1)
    )


def huge_strings(max_chars: int = 200_000) -> SearchStrategy[str]:
    return st.builds(
        lambda unit, count: (unit * (count // len(unit) + 1))[:count],
        st.sampled_from(_BIG_UNITS),
        st.integers(1000, max_chars),
    )


def nested_json(max_depth: int = 20_000) -> SearchStrategy[str]:
    """Deeply nested JSON (arrays or objects)."""
    return st.builds(
        lambda depth, kind: (
            "[" * depth + "]" * depth if kind == "array" else '{"a":' * depth + "1" + "}" * depth
        ),
        st.integers(100, max_depth),
        st.sampled_from(("array", "object")),
    )


def strings(*known: str) -> SearchStrategy[str]:
    """Any string: adversarial edges, the names the server knows, random text, huge, nested."""
    # huge and nested strings one draw in ten: most requests should get past size checks
    return choice(
        (3, st.sampled_from(STRING_EDGES)),
        (3, st.text(max_size=40)),
        (2, st.sampled_from(known) if known else st.text(max_size=8)),
        (1, huge_strings()),
        (1, nested_json()),
    )


# -- what the fuzzer knows about the server ------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Names and sizes the strategies draw from: valid ones, so requests get past the first
    check, beside invalid ones."""

    model_id: str
    model_source: str
    d_model: int
    num_layers: int
    vocab_size: int
    hook_names: tuple[str, ...]
    artifact_ids: tuple[str, ...]
    sae_ids: tuple[str, ...]
    sae_paths: tuple[str, ...]
    slider_names: tuple[str, ...]
    job_ids: tuple[str, ...]
    paths: tuple[str, ...]
    bake_outputs: tuple[str, ...]
    root: str
    tensor_blobs: tuple[bytes, ...]
    sidecar_blobs: tuple[bytes, ...]

    def model_ids(self) -> SearchStrategy[str]:
        return st.one_of(st.sampled_from(("", self.model_id, self.model_id)), strings("absent"))

    def ids(self, known: Sequence[str]) -> SearchStrategy[str]:
        """Known ids (if any), new valid ones and any string."""
        new = strings("new-id", "x", "A.b_c-9")
        return st.one_of(st.sampled_from(tuple(known)), new) if known else new

    def layers(self) -> SearchStrategy[int]:
        return st.one_of(
            st.integers(0, self.num_layers - 1), uint32s(self.num_layers, self.num_layers + 1)
        )

    def hooks(self) -> SearchStrategy[str]:
        invalid = (
            f"blocks.{self.num_layers}.hook_resid_post",
            "blocks.-1.hook_resid_post",
            "blocks.99999999999999999999.hook_resid_post",
            "blocks.1.hook_nope",
            "blocks.1.attn.hook_z",
            "blocks..hook_resid_post",
            "blocks.1.hook_resid_post.extra",
            "hook_embed",
            "ln_final.hook_normalized",
            "model.layers.1",
            "blocks.1.hook_resid_post ",
        )
        return st.one_of(st.sampled_from(self.hook_names), st.sampled_from(invalid), strings())

    def token_ids(self) -> SearchStrategy[int]:
        return st.one_of(
            st.integers(0, self.vocab_size - 1), uint32s(self.vocab_size, self.vocab_size + 1)
        )

    def path_strings(self) -> SearchStrategy[str]:
        escapes = (
            self.root,
            self.root + "/artifacts",
            self.root + "/../x",
            "bakeout/..",
            "baked/..",
            "baked/prev/..",
            "baked/prev/../..",
            "artifacts/..",
            "artifacts/../..",
            "link-out",
            "link-out/x",
            "link-out/secret.txt",
            "saes/link",
            "saes/link/..",
            f"{SOURCE_DIR}/../../x",
            "./baked/x",
            "baked//x",
            "baked/./x",
            "baked/x/",
            "baked/.x",
            "baked/x\x00y",
            "baked/" + "x" * 300,
            "/".join(["d"] * 200),
        )
        return st.one_of(st.sampled_from(self.paths), st.sampled_from(escapes), strings(*SENTINELS))

    def feature_indices(self) -> SearchStrategy[int]:
        return st.one_of(st.integers(0, SAE_FEATURES - 1), uint32s(SAE_FEATURES))


def tensor_blobs(handle: ModelHandle) -> tuple[bytes, ...]:
    """vectors.safetensors contents: valid for the model, and every way they can be wrong."""
    d_model, layers = handle.d_model, handle.num_layers
    ones = torch.ones(d_model)
    valid = {f"layer.{layer}": ones * (layer + 1) for layer in range(layers)}
    good = safetensors_bytes(valid, metadata={"format": "steer.vector"})
    header_only = struct.pack("<Q", 2**63) + b"{}"
    return (
        good,
        safetensors_bytes({"shared": ones}),
        safetensors_bytes({"shared": torch.ones(d_model + 1)}),
        safetensors_bytes({"layer.abc": ones}),
        safetensors_bytes({"layer.-1": ones}),
        safetensors_bytes({"layer.1.5": ones}),
        safetensors_bytes({f"layer.{layers}": ones}),
        safetensors_bytes({"layer.99999999999999999999": ones}),
        safetensors_bytes({"layer.0": torch.full((d_model,), math.nan)}),
        safetensors_bytes({"layer.0": torch.full((d_model,), math.inf)}),
        safetensors_bytes({"layer.0": torch.zeros(d_model)}),
        safetensors_bytes({"layer.0": torch.ones(d_model, dtype=torch.float64)}),
        safetensors_bytes({"layer.0": torch.ones(d_model, dtype=torch.int64)}),
        safetensors_bytes({"layer.0": torch.ones(2, d_model)}),
        safetensors_bytes({"layer.0": torch.ones(())}),
        safetensors_bytes({"layer.0": torch.ones(0)}),
        safetensors_bytes({"other": ones}),
        safetensors_bytes({}),
        b"",
        good[: len(good) // 2],
        good[:8],
        header_only,
        struct.pack("<Q", 10) + b"not json!!",
        b"\xff" * 64,
    )


#: JSON values a sidecar key (or a scene key) may be replaced with
HOSTILE_JSON: tuple[Any, ...] = (None, "x", "", 5, -1, 0, 1e308, True, [], {}, [1], [None],
                                 {"a": 1}, [{}], "x" * 10_000, [[[[[]]]]])  # fmt: skip


def sidecar_blobs(handle: ModelHandle, valid_sidecar: bytes) -> tuple[bytes, ...]:
    """steer.json contents: the valid sidecar first, then the valid one with each key (and
    each key of its "model" record) replaced by each hostile JSON value or dropped, and
    documents that are not a JSON object, not UTF-8, nested or huge."""
    good = json.loads(valid_sidecar)
    variants: list[Any] = [good]
    for key in sorted(good):
        variants.append({k: v for k, v in good.items() if k != key})
        variants += [{**good, key: value} for value in HOSTILE_JSON]
    model = good.get("model") or {}
    for key in sorted(model):
        variants += [{**good, "model": {**model, key: value}} for value in HOSTILE_JSON]
    variants += [
        {**good, "d_model": handle.d_model + 1},
        {**good, "model": {**model, "weight_hash": "0" * 64}},
        {**good, "hooks": ["blocks.99.hook_resid_post"]},
        {"format": "steer.vector", "model": "x"},
        {"format": "steer.vector"},
        {"format": "other"},
        [],
        None,
        "steer.vector",
        1,
    ]
    blobs = [json.dumps(v).encode() for v in variants]
    blobs += [
        b"",
        b"\xff\xfe\xfd",
        b'{"format": "steer.vector", "name": "\xc3\x28"}',
        b"{" * 100_000,
        b"[" * 50_000 + b"]" * 50_000,
        b'{"format": "steer.vector", "a":' * 5000 + b"1" + b"}" * 5000,
        b'{"format": "steer.vector", "name": "' + b"x" * 200_000 + b'"}',
        b"NaN",
        b'{"format": "steer.vector", "d_model": NaN}',
        b'{"format": "steer.vector", "d_model": Infinity}',
    ]
    return tuple(blobs)


# -- generic request strategies from descriptors ------------------------------------------------

PROMPT_FORMATS: tuple[str, ...] = (
    "",
    "chat_template",
    "chatml",
    "mistral",
    "llama3",
    "alpaca",
    "limamono",
    "shorirp",
)
DTYPES: tuple[str, ...] = (
    "",
    "float32",
    "bfloat16",
    "float16",
    "float64",
    "int8",
    "auto",
    "torch.float32",
)
DEVICES: tuple[str, ...] = (
    "",
    "cpu",
    "auto",
    "cuda",
    "cuda:0",
    "cuda:99",
    "meta",
    "mps",
    "cpu:1",
    "xla",
)
OUTPUT_FORMATS: tuple[str, ...] = (
    "",
    "model",
    "lora",
    "control-vector",
    "gguf",
    "MODEL",
    "safetensors",
)
SAMPLER_NAMES: tuple[str, ...] = (
    "logit_bias",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "dry",
    "temperature",
    "top_k",
    "top_a",
    "top_p",
    "typical_p",
    "tfs",
    "min_p",
    "xtc",
    "mirostat",
)
#: string fields by name: what values mean something to the server there
_STRING_HINTS: dict[str, Callable[[World], SearchStrategy[str]]] = {
    "model": lambda w: w.model_ids(),
    "model_id": lambda w: w.model_ids(),
    "artifact_id": lambda w: w.ids(w.artifact_ids),
    "sae_id": lambda w: w.ids(w.sae_ids),
    "job_id": lambda w: w.ids(w.job_ids),
    "name": lambda w: w.ids(w.slider_names),
    "hooks": lambda w: w.hooks(),
    "hook": lambda w: st.one_of(st.just(""), w.hooks()),
    "hook_names": lambda w: w.hooks(),
    "path": lambda w: st.one_of(st.sampled_from(w.sae_paths), w.path_strings()),
    "source": lambda w: st.one_of(st.just(w.model_source), w.path_strings()),
    "model_source": lambda w: st.one_of(st.just(SOURCE_DIR), w.path_strings()),
    "output": lambda w: w.path_strings(),
    "recipe_path": lambda w: w.path_strings(),
    "recipe_toml": lambda w: recipe_tomls(w),
    "scene_json": lambda w: scene_jsons(),
    "role": lambda w: st.one_of(
        st.sampled_from(("system", "user", "assistant", "tool")), strings()
    ),
    "prompt_format": lambda w: st.one_of(st.sampled_from(PROMPT_FORMATS), strings()),
    "dtype": lambda w: st.one_of(st.sampled_from(DTYPES), strings()),
    "device": lambda w: st.one_of(st.sampled_from(DEVICES), strings()),
    "output_format": lambda w: st.one_of(st.sampled_from(OUTPUT_FORMATS), strings()),
    "sampler_order": lambda w: st.one_of(st.sampled_from(SAMPLER_NAMES), strings()),
    "service": lambda w: st.one_of(
        st.sampled_from(("", *(rpc.service for rpc in RPCS))), strings()
    ),
}
#: integer fields by name
_INT_HINTS: dict[str, Callable[[World], SearchStrategy[int]]] = {
    "layer": lambda w: w.layers(),
    "layers": lambda w: w.layers(),
    "layer_weights": lambda w: w.layers(),
    "feature": lambda w: w.feature_indices(),
    "ids": lambda w: w.token_ids(),
    "logit_bias": lambda w: w.token_ids(),
    "max_new_tokens": lambda w: small_counts(64, 65),
    "top_logprobs": lambda w: small_counts(20, 21),
    "k": lambda w: small_counts(SAE_FEATURES, SAE_FEATURES + 1),
}
_MAX_DEPTH = 5


def _is_real_oneof(oneof: Any) -> bool:
    """proto3 ``optional`` fields sit in synthetic one-field oneofs named ``_field``."""
    fields = oneof.fields
    return not (len(fields) == 1 and oneof.name == "_" + fields[0].name)


def _scalar(field: FieldDescriptor, world: World) -> SearchStrategy[Any]:
    kind = field.type
    name = field.name
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return floats()
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = tuple(value.number for value in field.enum_type.values)
        return st.one_of(st.sampled_from(numbers), st.sampled_from((-1, 4, 99, 2**31 - 1)))
    if kind == FieldDescriptor.TYPE_STRING:
        hint = _STRING_HINTS.get(name)
        return st.one_of(hint(world), strings()) if hint else strings()
    if kind == FieldDescriptor.TYPE_BYTES:
        if name == "vectors_safetensors":
            return st.one_of(st.sampled_from(world.tensor_blobs), st.binary(max_size=256))
        if name == "steer_json":
            return st.one_of(st.sampled_from(world.sidecar_blobs), st.binary(max_size=256))
        return st.binary(max_size=256)
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        int_hint = _INT_HINTS.get(name)
        return st.one_of(int_hint(world), uint32s()) if int_hint else uint32s()
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.sampled_from(UINT64_EDGES), st.integers(0, 2**64 - 1))
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.sampled_from(INT64_EDGES)
    return st.one_of(st.sampled_from(INT_EDGES), st.integers(-(2**31), 2**31 - 1))


def _repeated(field: FieldDescriptor, world: World) -> SearchStrategy[list[Any]]:
    item = _scalar(field, world)
    lists = st.lists(item, max_size=4)
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        # vectors: right and wrong widths, filled with one (possibly extreme) value or random
        widths = st.sampled_from(
            (
                0,
                1,
                world.d_model - 1,
                world.d_model,
                world.d_model,
                world.d_model + 1,
                2 * world.d_model,
            )
        )
        filled = st.builds(lambda n, value: [value] * n, widths, floats())
        random_width = st.lists(finite_reasonable(), min_size=world.d_model, max_size=world.d_model)
        return st.one_of(lists, filled, random_width)
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(lists, st.builds(lambda n, s: [s] * n, st.integers(5, 300), strings()))
    if field.type in (FieldDescriptor.TYPE_UINT32,) and field.name == "ids":
        return st.one_of(lists, st.lists(item, min_size=1, max_size=300))
    return lists


def message_strategy(descriptor: Descriptor, world: World, depth: int = 0) -> SearchStrategy[Any]:
    """Any message of this type: each field unset or set to a value picked by its type and
    name; at most one member of each oneof."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = message_factory.GetMessageClass(descriptor)()
        if depth > _MAX_DEPTH:
            return message
        chosen: set[str] = set()
        for oneof in descriptor.oneofs:
            if _is_real_oneof(oneof):
                member = draw(st.sampled_from((None, *(f.name for f in oneof.fields))))
                if member is not None:
                    chosen.add(member)
        for item in descriptor.fields:
            oneof = item.containing_oneof
            if oneof is not None and _is_real_oneof(oneof):
                if item.name not in chosen:
                    continue
            elif not draw(st.booleans()):
                continue
            _set_field(draw, message, item, world, depth)
        return message

    return build()


def _set_field(
    draw: st.DrawFn, message: Message, item: FieldDescriptor, world: World, depth: int
) -> None:
    target = getattr(message, item.name)
    if item.message_type is not None and item.message_type.GetOptions().map_entry:
        key_field = item.message_type.fields_by_name["key"]
        value_field = item.message_type.fields_by_name["value"]
        keys = draw(st.lists(_scalar(key_field, world), max_size=4, unique=True))
        for key in keys:
            if value_field.message_type is not None:
                target[key].CopyFrom(
                    draw(message_strategy(value_field.message_type, world, depth + 1))
                )
            else:
                target[key] = draw(_scalar(value_field, world))
        return
    if item.message_type is not None:
        if item.is_repeated:
            for child in draw(
                st.lists(message_strategy(item.message_type, world, depth + 1), max_size=3)
            ):
                target.add().CopyFrom(child)
        else:
            target.CopyFrom(draw(message_strategy(item.message_type, world, depth + 1)))
            target.SetInParent()
        return
    if item.is_repeated:
        target.extend(draw(_repeated(item, world)))
        return
    setattr(message, item.name, draw(_scalar(item, world)))


# -- hand-written strategies for the shapes that matter ----------------------------------------


def one_hostile(
    build: Callable[..., Any],
    sane: Mapping[str, SearchStrategy[Any]],
    hostile: Mapping[str, SearchStrategy[Any]],
    weights: Mapping[str, int] | None = None,
) -> SearchStrategy[Any]:
    """``build(**values)`` with every value ordinary except, usually, one (sometimes none or
    two) drawn from ``hostile``: such a request gets past the other checks to the code that
    handles its hostile field. ``weights`` makes some fields hostile more often."""
    names = tuple(n for n in hostile for _ in range((weights or {}).get(n, 1)))

    @st.composite
    def draw_request(draw: st.DrawFn) -> Any:
        count = draw(st.sampled_from((0, 1, 1, 1, 2)))
        chosen = set(draw(st.lists(st.sampled_from(names), min_size=count, max_size=count)))
        values = {name: draw(hostile[name] if name in chosen else sane[name]) for name in sane}
        return build(**values)

    return draw_request()


def scene_jsons(*, hostile: bool = True) -> SearchStrategy[str]:
    """Role-play scenes: one ordinary scene, and scenes with a key missing or replaced by a
    hostile JSON value, not objects, not JSON, nested past any recursion limit."""
    base: dict[str, Any] = {
        "characters": [
            {"name": "Maren", "description": "{{char}} keeps the lighthouse.", "personality": "x"}
        ],
        "user": {"name": "Tomas", "description": "A surveyor."},
        "scenario": "{{user}} is stranded with {{char}}.",
        "turns": [
            {"speaker": "Maren", "content": "Who sent you?"},
            {"speaker": "Tomas", "content": "The harbour board."},
        ],
    }
    if not hostile:
        return st.just(json.dumps(base))
    json_values = st.sampled_from(
        (*HOSTILE_JSON, {"name": None}, [{"name": ""}], [{"name": "A", "bogus": 1}],
         [{"speaker": "nobody", "content": "hi"}], [{"speaker": "Maren", "content": None}],
         [{"speaker": "Maren", "kind": "weird"}], [{"speaker": "Maren"}],
         {"name": "Tomas", "x": []}, [{"name": "Maren"}] * 40, [{"name": "Maren"}] * 2)
    )  # fmt: skip
    # the lists a renderer indexes and walks most often
    keys = st.sampled_from(("characters", "characters", "characters", "turns", "turns", "user",
                            "scenario", "title", "tags", "lore", "system", "extra"))  # fmt: skip

    def mutate(key: str, value: Any, drop: bool) -> str:
        scene = dict(base)
        if drop:
            scene.pop(key, None)
        else:
            scene[key] = value
        return json.dumps(scene)

    return choice(
        (4, st.builds(mutate, keys, json_values, st.booleans())),
        (1, st.sampled_from(("", "{", "[]", "null", "1", '"scene"', '{"characters": "Maren"}'))),
        (1, nested_json()),
        (1, strings()),
    )


def recipe_tomls(world: World) -> SearchStrategy[str]:
    """Bake and direction recipes with extreme values, escaping references, and not TOML."""
    literals = st.sampled_from(
        ("1.0", "0", "-1", "1e308", "-1e308", "5e-324", "3.4e38", "nan", "inf", "-inf", '"x"',
         "[]", "true", "18446744073709551616")
    )  # fmt: skip
    layer_lists = st.sampled_from(
        ("[1, 2]", "[]", "[99]", "[-1]", "[1, 1]", '"x"', "[1.5]", "[4294967296]", "[0, 1, 2, 3]")
    )
    references = mostly(
        st.sampled_from(
            ("bake-direction", "bake-vector", "refusal", "artifacts/bake-direction", "saes/resid",
             "saes/wide", "saes/link")
        ),
        world.path_strings(),
        odds=1,
    )  # fmt: skip
    ablate = st.builds(
        lambda ref, weight, layers: bake_recipe("ablate", ref, weight=weight, layers=layers),
        references,
        literals,
        layer_lists,
    )
    add = st.builds(
        lambda ref, strength, layers: bake_recipe("add", ref, strength=strength, layers=layers),
        references,
        literals,
        layer_lists,
    )
    add_hooks = st.builds(
        lambda ref, hook: bake_recipe("add", ref, hooks=json.dumps([hook])),
        references,
        world.hooks(),
    )
    feature = st.builds(
        lambda ref, index, value: bake_recipe("feature", ref, feature=index, value=value),
        references,
        st.sampled_from(("0", "3", str(SAE_FEATURES - 1), str(SAE_FEATURES), "-1", "4294967296")),
        literals,
    )
    data_paths = mostly(
        st.sampled_from(
            ("data/fire.txt", "strongreject", "recipes:harmless.jsonl", "recipes:../../etc/passwd",
             "recipes:", "recipes", "link-out/secret.txt", "recipes/binary.toml")
        ),
        world.path_strings(),
        odds=1,
    )  # fmt: skip
    contrast = st.builds(
        lambda positive, train, layers, top_k: contrast_recipe(
            positive=json.dumps(positive)[1:-1], train=train, layers=layers, top_k=top_k
        ),
        data_paths,
        st.sampled_from(("0.5", "0", "1", "1.5", "nan", "-1")),
        layer_lists,
        st.sampled_from(("1", "0", "-1", "1000000")),
    )
    broken = st.sampled_from(
        ("", "this is = = not toml", "[[edits]]\n" * 2000, 'name = "x"\n', "edits = 5\n",
         '[[edits]]\nkind = "teleport"\n', 'name = "\\uD800"\n', "a = " + "[" * 5000 + "]" * 5000,
         "a = " + "{b = " * 3000 + "1" + "}" * 3000, "\x00", "# " + "x" * 200_000 + "\n")
    )  # fmt: skip
    return st.one_of(ablate, add, add_hooks, feature, contrast, broken, strings())


def mostly(sane: SearchStrategy[Any], hostile: SearchStrategy[Any], odds: int = 3) -> Any:
    """``sane`` ``odds`` times as often as ``hostile``."""
    return choice((odds, sane), (1, hostile))


#: ordinary values of each sampler field (hostile ones come from floats() and small_counts())
_SANE_SAMPLING: dict[str, tuple[Any, ...]] = {
    "temperature": (0.0, 0.7, 1.0, 1.5),
    "top_k": (0, 1, 5, 40),
    "top_p": (0.5, 0.9, 1.0),
    "min_p": (0.0, 0.05, 0.5),
    "typical_p": (0.5, 1.0),
    "tfs": (0.5, 1.0),
    "top_a": (0.0, 0.2),
    "mirostat_mode": (0, 1, 2),
    "mirostat_tau": (5.0, 0.5),
    "mirostat_eta": (0.1, 1.0),
    "repetition_penalty": (1.0, 1.3, 0.8),
    "repetition_penalty_range": (0, 4),
    "presence_penalty": (0.0, 1.5, -2.0),
    "frequency_penalty": (0.0, 2.0),
    "dry_multiplier": (0.0, 0.8),
    "dry_base": (1.75, 1.0),
    "dry_allowed_length": (1, 2),
    "dry_range": (0, 8),
    "xtc_threshold": (0.1, 0.5),
    "xtc_probability": (0.0, 0.5, 1.0),
    "temperature_last": (False, True),
    "ban_eos": (False, True),
    "min_tokens": (0, 4),
    "logit_bias": ({5: -100.0}, {7: 5.0}, {9: -math.inf}),
    "dry_sequence_breakers": (["\n", ":"], ["dragon"]),
    "banned_strings": (["dragon"], ["The"]),
    "sampler_order": (["temperature", "top_k", "min_p"], list(SAMPLER_NAMES[:13])),
}


#: a sampler field only acts when another is set: the hostile value comes with it
_COMPANIONS: dict[str, tuple[str, Any]] = {
    "dry_base": ("dry_multiplier", 0.8),
    "dry_allowed_length": ("dry_multiplier", 0.8),
    "dry_range": ("dry_multiplier", 0.8),
    "dry_sequence_breakers": ("dry_multiplier", 0.8),
    "mirostat_tau": ("mirostat_mode", 2),
    "mirostat_eta": ("mirostat_mode", 1),
    "xtc_threshold": ("xtc_probability", 1.0),
    "repetition_penalty_range": ("repetition_penalty", 1.3),
    "temperature_last": ("temperature", 5e-324),
}


def _hostile_sampling_value(world: World, name: str) -> SearchStrategy[Any]:
    descriptor = generation_pb2.SamplingParams.DESCRIPTOR.fields_by_name[name]
    if descriptor.message_type is not None:  # logit_bias
        return st.dictionaries(world.token_ids(), floats(), min_size=1, max_size=3)
    if descriptor.is_repeated:
        if name == "sampler_order":
            return st.lists(mostly(st.sampled_from(SAMPLER_NAMES), strings()), max_size=30)
        return st.lists(strings(), min_size=1, max_size=20)
    if descriptor.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if descriptor.type == FieldDescriptor.TYPE_UINT32:
        return small_counts()
    return floats()


def _sampling_params(pairs: Iterable[tuple[str, Any]]) -> generation_pb2.SamplingParams:
    params = generation_pb2.SamplingParams()
    for name, value in pairs:
        target = getattr(params, name)
        if isinstance(value, dict):
            target.update(value)
        elif isinstance(value, list):
            target.extend(value)
        else:
            setattr(params, name, value)
    return params


def samplings(world: World, *, hostile: bool) -> SearchStrategy[generation_pb2.SamplingParams]:
    """Up to three ordinary sampler fields; ``hostile``: plus one or two hostile ones (in-range
    extremes such as 5e-324 and 1e308 as well as out-of-range values)."""
    names = tuple(_SANE_SAMPLING)
    sane_pair = st.sampled_from(names).flatmap(
        lambda name: st.sampled_from(_SANE_SAMPLING[name]).map(lambda value: (name, value))
    )
    sane = st.lists(sane_pair, max_size=3)
    if not hostile:
        return sane.map(_sampling_params)
    bad_pair = st.sampled_from(names).flatmap(
        lambda name: _hostile_sampling_value(world, name).map(
            lambda value: [(name, value), *([_COMPANIONS[name]] if name in _COMPANIONS else [])]
        )
    )
    return st.builds(
        lambda ordinary, bad: _sampling_params([*ordinary, *(p for pairs in bad for p in pairs)]),
        sane,
        st.lists(bad_pair, min_size=1, max_size=2),
    )


def _inline(shared: list[float], layers: list[tuple[int, list[float]]]) -> Any:
    vector = generation_pb2.InlineVector(shared=shared)
    for layer, values in layers:
        vector.layers.add(layer=layer, values=values)
    return vector


def inline_vectors(world: World, *, hostile: bool) -> SearchStrategy[generation_pb2.InlineVector]:
    """Per-layer vectors of the model's width with ordinary values (a shared vector needs
    explicit hooks: see :func:`interventions`); hostile: wrong widths, extreme or non-finite
    values, out-of-range or repeated layers, nothing."""
    values = st.lists(finite_reasonable(), min_size=world.d_model, max_size=world.d_model)
    layer = st.integers(0, world.num_layers - 1)
    sane = st.builds(
        _inline,
        st.just([]),
        st.lists(st.tuples(layer, values), min_size=1, max_size=2, unique_by=lambda t: t[0]),
    )
    if not hostile:
        return sane
    float_field = generation_pb2.InlineVector.DESCRIPTOR.fields_by_name["shared"]
    bad_values = _repeated(float_field, world)
    return st.one_of(
        st.builds(_inline, bad_values, st.just([])),
        st.builds(_inline, st.just([]), st.lists(st.tuples(layer, bad_values), min_size=1,
                                                 max_size=2)),
        st.builds(_inline, st.just([]), st.lists(st.tuples(world.layers(), values), min_size=1,
                                                 max_size=3)),
        st.builds(_inline, values, st.lists(st.tuples(layer, values), min_size=2, max_size=2)),
        st.just(generation_pb2.InlineVector()),
    )  # fmt: skip


def interventions(world: World, *, hostile: bool) -> SearchStrategy[generation_pb2.Intervention]:
    """One intervention of each kind, well formed; ``hostile``: one or two fields hostile."""
    valid_hooks = st.lists(st.sampled_from(world.hook_names), min_size=1, max_size=2)
    phase = st.sampled_from((0, 1, 2, 3))
    strength = st.sampled_from((0.0, 1.0, 4.0, -8.0))
    speaker = st.just("")
    layer = st.integers(0, world.num_layers - 1)
    bad = {
        "strength": floats(),
        "hooks": st.lists(world.hooks(), min_size=1, max_size=3),
        "phase": st.sampled_from((4, -1, 2**31 - 1)),
        "speaker": st.one_of(st.sampled_from(("Maren", "nobody")), strings()),
        "artifact_id": st.one_of(
            st.sampled_from(("foreign", "bake-direction", "bake-vector")),
            world.ids(world.artifact_ids),
        ),
        "allow_other_model": st.just(True),
        "layers": st.lists(world.layers(), min_size=1, max_size=3),
        "weight": floats(),
        "layer_weights": st.dictionaries(world.layers(), floats(), min_size=1, max_size=3),
        "sae_id": world.ids(world.sae_ids),
        "feature": world.feature_indices(),
        "mode": st.sampled_from((0, 4, -1)),
        "name": world.ids(world.slider_names),
    }

    def wrap(kind: str, message: Any, who: str) -> generation_pb2.Intervention:
        return generation_pb2.Intervention(**{kind: message}, speaker=who)

    def add_inline(vector: Any, strength: float, hooks: list[str], phase: Any, speaker: str) -> Any:
        add = generation_pb2.AddVector(inline=vector, strength=strength, hooks=hooks, phase=phase)
        return wrap("add", add, speaker)

    def add_artifact(
        artifact_id: str,
        strength: float,
        hooks: list[str],
        phase: Any,
        allow_other_model: bool,
        speaker: str,
    ) -> Any:
        add = generation_pb2.AddVector(
            artifact_id=artifact_id,
            strength=strength,
            hooks=hooks,
            phase=phase,
            allow_other_model=allow_other_model,
        )
        return wrap("add", add, speaker)

    def ablate(
        artifact_id: str,
        layers: list[int],
        weight: float | None,
        layer_weights: dict[int, float],
        allow_other_model: bool,
        speaker: str,
    ) -> Any:
        message = generation_pb2.AblateDirection(
            artifact_id=artifact_id,
            layers=layers,
            layer_weights=layer_weights,
            allow_other_model=allow_other_model,
        )
        if weight is not None:
            message.weight = weight
        return wrap("ablate", message, speaker)

    def named(name: str, value: float, speaker: str) -> Any:
        return wrap("named", generation_pb2.NamedSlider(name=name, value=value), speaker)

    def slider(sae_id: str, feature: int, mode: Any, value: float, phase: Any, speaker: str) -> Any:
        message = generation_pb2.FeatureSlider(
            sae_id=sae_id, feature=feature, mode=mode, value=value, phase=phase
        )
        return wrap("slider", message, speaker)

    shared = st.builds(
        _inline,
        st.lists(finite_reasonable(), min_size=world.d_model, max_size=world.d_model),
        st.just([]),
    )
    kinds: list[tuple[Callable[..., Any], dict[str, SearchStrategy[Any]]]] = [
        (
            add_inline,
            {"vector": inline_vectors(world, hostile=False), "strength": strength,
             "hooks": st.just([]), "phase": phase, "speaker": speaker},
        ),
        (
            add_inline,
            {"vector": shared, "strength": strength, "hooks": valid_hooks, "phase": phase,
             "speaker": speaker},
        ),
        (
            add_artifact,
            {"artifact_id": st.sampled_from(("calm", "refusal")), "strength": strength,
             "hooks": st.just([]), "phase": phase, "allow_other_model": st.just(False),
             "speaker": speaker},
        ),
        (
            add_artifact,
            {"artifact_id": st.just("shared"), "strength": strength, "hooks": valid_hooks,
             "phase": phase, "allow_other_model": st.just(False), "speaker": speaker},
        ),
        (
            ablate,
            {"artifact_id": st.sampled_from(("refusal", "calm", "shared")),
             "layers": st.lists(layer, max_size=2), "weight": st.sampled_from((None, 1.0, 0.5)),
             "layer_weights": st.one_of(st.just({}), st.dictionaries(layer, strength, max_size=2)),
             "allow_other_model": st.just(False), "speaker": speaker},
        ),
        (
            slider,
            {"sae_id": st.sampled_from(world.sae_ids), "feature": st.integers(0, SAE_FEATURES - 1),
             "mode": st.sampled_from((1, 2, 3)), "value": st.sampled_from((0.0, 1.0, 2.0, -1.0)),
             "phase": phase, "speaker": speaker},
        ),
        (
            named,
            {"name": st.sampled_from(world.slider_names),
             "value": st.sampled_from((0.0, 0.5, 1.0, -0.5)), "speaker": speaker},
        ),
    ]  # fmt: skip
    plain = st.one_of([st.builds(build, **sane) for build, sane in kinds])

    def gate(
        hook: str,
        direction: Any,
        threshold: float,
        below: bool,
        scope: int,
        inner: generation_pb2.Intervention,
        hooks: list[str],
        weights: list[float],
    ) -> Any:
        condition = generation_pb2.GateCondition(
            hook=hook, inline=direction, threshold=threshold, below=below
        )
        condition.hooks.extend(hooks)  # a condition over several hooks: hook "" and these
        condition.weights.extend(weights)
        if hooks:
            condition.hook = ""
        message = generation_pb2.GatedIntervention(condition=condition, inner=inner, scope=scope)
        return generation_pb2.Intervention(gated=message)

    # at hook_embed nothing comes before the condition, so every ordinary inner one fits
    kinds.append(
        (
            gate,
            {"hook": st.just("hook_embed"), "direction": shared,
             "threshold": st.sampled_from((-1e6, 0.0, 0.5, 1e6)), "below": st.booleans(),
             "scope": st.sampled_from((1, 2)), "inner": plain,
             "hooks": st.sampled_from(([], ["hook_embed"])),
             "weights": st.just([])},
        )
    )  # fmt: skip
    bad["hook"] = world.hooks()
    bad["hooks"] = st.lists(world.hooks(), max_size=4)
    bad["weights"] = st.lists(floats(), max_size=4)
    bad["threshold"] = floats()
    bad["scope"] = st.sampled_from((0, 3, -1))
    if not hostile:
        return st.one_of([st.builds(build, **sane) for build, sane in kinds])
    options = []
    for build, sane in kinds:
        hostile_fields = {name: bad[name] for name in sane if name in bad}
        if "vector" in sane:
            hostile_fields["vector"] = inline_vectors(world, hostile=True)
        if "direction" in sane:
            hostile_fields["direction"] = inline_vectors(world, hostile=True)
        if "inner" in sane:
            hostile_fields["inner"] = st.deferred(lambda: interventions(world, hostile=True))
        if "weight" in sane:
            hostile_fields["weight"] = floats()
        if "value" in sane:
            hostile_fields["value"] = floats()
        numeric = {
            "strength": 3, "weight": 3, "layer_weights": 3, "value": 3, "vector": 2,
            "threshold": 3, "direction": 2,
        }  # fmt: skip
        options.append(one_hostile(build, sane, hostile_fields, numeric))
    options.append(st.just(generation_pb2.Intervention()))
    return st.one_of(options)


PromptSetter = Callable[[generation_pb2.GenerateRequest], None]


def _text(value: str) -> PromptSetter:
    return lambda request: setattr(request, "text", value)


def _chat(fmt: str, messages: list[tuple[str, str]]) -> PromptSetter:
    def apply(request: generation_pb2.GenerateRequest) -> None:
        request.chat.prompt_format = fmt
        request.chat.SetInParent()
        for role, content in messages:
            request.chat.messages.add(role=role, content=content)

    return apply


def _token_ids(ids: list[int]) -> PromptSetter:
    def apply(request: generation_pb2.GenerateRequest) -> None:
        request.token_ids.SetInParent()
        request.token_ids.ids.extend(ids)

    return apply


def _roleplay(scene: str, fmt: str, speaker: str, length: str) -> PromptSetter:
    def apply(request: generation_pb2.GenerateRequest) -> None:
        request.roleplay.scene_json = scene
        request.roleplay.prompt_format = fmt
        request.roleplay.speaker = speaker
        request.roleplay.length = length
        request.roleplay.SetInParent()

    return apply


def prompts(world: World, *, hostile: bool) -> SearchStrategy[PromptSetter]:
    """One prompt kind set on a request: ordinary ones, or hostile ones (empty, huge, special
    tokens, unknown roles and formats, token ids past the vocabulary, broken scenes, none)."""
    ordinary = st.sampled_from(("The knight drew her sword", "Hello", "How do I bake bread"))
    roles = st.sampled_from(("system", "user", "assistant"))
    ids = st.lists(st.integers(0, world.vocab_size - 1), min_size=1, max_size=8)
    if not hostile:
        return st.one_of(
            st.builds(_text, ordinary),
            st.builds(_chat, st.sampled_from(("", "chat_template")),
                      st.lists(st.tuples(roles, ordinary), min_size=1, max_size=3)),
            st.builds(_token_ids, ids),
            st.builds(_roleplay, scene_jsons(hostile=False), st.sampled_from(PROMPT_FORMATS),
                      st.sampled_from(("", "Maren")), st.just("")),
        )  # fmt: skip
    specials = st.sampled_from(("<|im_start|>user\nHi<|im_end|>", "🐉 é \x00", "<pad>" * 50))
    texts = st.one_of(specials, strings())
    return st.one_of(
        st.builds(_text, texts),
        st.builds(_chat, mostly(st.sampled_from(("", "chat_template")), strings(), odds=1),
                  st.lists(st.tuples(mostly(roles, strings(), odds=1), texts), max_size=3)),
        st.builds(_token_ids, st.one_of(
            st.lists(world.token_ids(), max_size=8),
            st.lists(st.integers(0, world.vocab_size - 1), min_size=200, max_size=300),
        )),
        st.builds(_roleplay, scene_jsons(), mostly(st.sampled_from(PROMPT_FORMATS), strings()),
                  mostly(st.sampled_from(("", "Maren", "Tomas")), strings()),
                  mostly(st.sampled_from(("", "short", "medium", "long")), strings())),
        st.builds(_roleplay, scene_jsons(hostile=False), st.sampled_from(PROMPT_FORMATS),
                  st.sampled_from(("nobody", "Tomas", " ", "{{char}}")),
                  st.sampled_from(("", "medium", "x" * 300))),
        st.just(lambda request: None),
    )  # fmt: skip


def _generate(
    model: str,
    prompt: PromptSetter,
    sampling: generation_pb2.SamplingParams,
    stop: list[str],
    seed: int | None,
    max_new_tokens: int,
    interventions: list[generation_pb2.Intervention],
    top_logprobs: int,
    compare: bool,
) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(
        model=model,
        sampling=sampling,
        stop=stop,
        max_new_tokens=max_new_tokens,
        interventions=interventions,
        top_logprobs=top_logprobs,
        compare=compare,
    )
    prompt(request)
    if seed is not None:
        request.seed = seed
    return request


def generate_requests(world: World) -> SearchStrategy[generation_pb2.GenerateRequest]:
    """Well-formed Generate requests with one or two hostile parts: sampler values at and past
    their limits, interventions with extreme values or wrong shapes, hostile prompts, limits."""
    sane_interventions = st.lists(interventions(world, hostile=False), max_size=2)
    with_bad = st.builds(
        lambda before, bad, after: [*before, bad, *after],
        st.lists(interventions(world, hostile=False), max_size=1),
        interventions(world, hostile=True),
        st.lists(interventions(world, hostile=False), max_size=1),
    )
    too_many = st.builds(lambda item, n: [item] * n, interventions(world, hostile=False),
                         st.integers(60, 70))  # fmt: skip
    sane = {
        "model": st.sampled_from(("", world.model_id)),
        "prompt": prompts(world, hostile=False),
        "sampling": samplings(world, hostile=False),
        "stop": st.sampled_from(([], [], ["\n"], ["dragon"])),
        "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        "max_new_tokens": st.integers(1, 16),
        "interventions": sane_interventions,
        "top_logprobs": st.integers(0, 5),
        "compare": st.booleans(),
    }
    hostile = {
        "model": world.model_ids(),
        "prompt": prompts(world, hostile=True),
        "sampling": samplings(world, hostile=True),
        "stop": st.lists(strings("\n", "."), min_size=1, max_size=20),
        "seed": st.sampled_from(UINT64_EDGES),
        "max_new_tokens": small_counts(0, 64, 65),
        "interventions": choice((4, with_bad), (1, too_many)),
        "top_logprobs": small_counts(20, 21),
    }
    weights = {"sampling": 5, "interventions": 5, "prompt": 3}
    return one_hostile(_generate, sane, hostile, weights)


def _bake(model_source: str, recipe: tuple[str, str], output: str, output_format: str,
          overwrite: bool) -> bake_pb2.BakeRequest:  # fmt: skip
    request = bake_pb2.BakeRequest(
        model_source=model_source, output=output, output_format=output_format, overwrite=overwrite
    )
    setattr(request, recipe[0], recipe[1])
    return request


def bake_requests(world: World) -> SearchStrategy[bake_pb2.BakeRequest]:
    """Bakes of the tiny source (a fraction of a second each) with hostile outputs (the root,
    its parents, what it holds, escapes), sources, recipes and formats."""
    valid_recipes = st.sampled_from(
        (
            ("recipe_toml", bake_recipe("ablate", "bake-direction")),
            ("recipe_toml", bake_recipe("add", "bake-vector")),
            ("recipe_path", "recipes/ablate.toml"),
        )
    )
    into_root = st.sampled_from(
        (".", "./", "bakeout/..", "baked/..", "a/../.", "artifacts/..", "baked", "artifacts",
         "artifacts/refusal", "saes", SOURCE_DIR, "notes", "recipes", "operator-notes.txt",
         *world.bake_outputs)
    )  # fmt: skip
    recipe_paths = st.sampled_from(
        ("recipes", "recipes/binary.toml", "recipes/nested.toml", "recipes/contrast.toml",
         f"{SOURCE_DIR}/model.safetensors", "link-out/secret.txt", "recipes/missing.toml")
    )  # fmt: skip
    sane = {
        "model_source": st.just(SOURCE_DIR),
        "recipe": valid_recipes,
        "output": st.sampled_from(("baked/new", "baked/new.gguf", "new-bake")),
        "output_format": st.sampled_from(("", "model", "lora", "control-vector")),
        "overwrite": st.booleans(),
    }
    hostile = {
        "model_source": st.one_of(
            st.sampled_from((".", *world.bake_outputs, "saes/resid", "recipes/binary.toml")),
            world.path_strings(),
        ),
        "recipe": st.one_of(
            st.tuples(st.just("recipe_toml"), recipe_tomls(world)),
            st.tuples(st.just("recipe_path"), st.one_of(recipe_paths, world.path_strings())),
        ),
        "output": choice((2, into_root), (1, world.path_strings())),
        "output_format": st.one_of(st.sampled_from(OUTPUT_FORMATS), strings()),
    }
    return one_hostile(_bake, sane, hostile, {"output": 3})


def _compute(model: str, recipe: tuple[str, str], artifact_id: str, overwrite: bool) -> Any:
    request = directions_pb2.ComputeDirectionRequest(
        model=model, artifact_id=artifact_id, overwrite=overwrite
    )
    setattr(request, recipe[0], recipe[1])
    return request


def compute_requests(world: World) -> SearchStrategy[directions_pb2.ComputeDirectionRequest]:
    recipe_paths = st.sampled_from(
        ("recipes", "recipes/binary.toml", "recipes/nested.toml", "recipes/ablate.toml")
    )
    sane = {
        "model": st.sampled_from(("", world.model_id)),
        "recipe": st.sampled_from(
            (("recipe_toml", contrast_recipe()), ("recipe_path", "recipes/contrast.toml"))
        ),
        "artifact_id": st.just("new-direction"),
        "overwrite": st.booleans(),
    }
    hostile = {
        "model": world.model_ids(),
        "recipe": st.one_of(
            st.tuples(st.just("recipe_toml"), recipe_tomls(world)),
            st.tuples(st.just("recipe_path"), st.one_of(recipe_paths, world.path_strings())),
        ),
        "artifact_id": world.ids(world.artifact_ids),
    }
    return one_hostile(_compute, sane, hostile, {"recipe": 2})


def upload_requests(world: World) -> SearchStrategy[directions_pb2.UploadArtifactRequest]:
    """Uploads: the valid files, or hostile tensors (names like ``layer.abc``, wrong widths and
    dtypes, NaN, truncated, bad headers) and sidecars (partial, lists, null, invalid UTF-8,
    nested, huge), under new, existing and hostile ids."""

    def build(artifact_id: str, tensors: bytes, sidecar: bytes, overwrite: bool) -> Any:
        files = directions_pb2.ArtifactFiles(
            artifact_id=artifact_id, vectors_safetensors=tensors, steer_json=sidecar
        )
        return directions_pb2.UploadArtifactRequest(files=files, overwrite=overwrite)

    sane = {
        "artifact_id": st.just("uploaded"),
        "tensors": st.just(world.tensor_blobs[0]),
        "sidecar": st.just(world.sidecar_blobs[0]),
        "overwrite": st.booleans(),
    }
    hostile = {
        "artifact_id": world.ids(world.artifact_ids),
        "tensors": st.one_of(st.sampled_from(world.tensor_blobs[1:]), st.binary(max_size=128)),
        "sidecar": st.one_of(st.sampled_from(world.sidecar_blobs[1:]), st.binary(max_size=128)),
    }
    return one_hostile(build, sane, hostile, {"sidecar": 2, "tensors": 2})


def load_sae_requests(world: World) -> SearchStrategy[features_pb2.LoadSaeRequest]:
    sane = {
        "path": st.just("saes/resid"),
        "sae_id": st.just("second-sae"),
        "model": st.sampled_from(("", world.model_id)),
        "hook": st.just(""),
        "allow_other_model": st.booleans(),
    }
    hostile = {
        "path": st.one_of(st.sampled_from(world.sae_paths), world.path_strings()),
        "sae_id": world.ids(world.sae_ids),
        "model": world.model_ids(),
        "hook": world.hooks(),
    }
    return one_hostile(features_pb2.LoadSaeRequest, sane, hostile)


def feature_texts(*, hostile: bool) -> SearchStrategy[list[str]]:
    ordinary = st.sampled_from(("The dragon laughed", "How do I bake bread", "Hi there"))
    if not hostile:
        return st.lists(ordinary, min_size=1, max_size=3)
    return st.one_of(
        st.just([]),
        st.lists(st.one_of(ordinary, strings()), min_size=1, max_size=4),
        st.builds(lambda n: ["The dragon"] * n, st.integers(8, 12)),
    )


def feature_requests(world: World, rpc: Rpc) -> SearchStrategy[Message] | None:
    """Feature reads on the loaded SAE with hostile texts, counts, features and ids."""
    counts = st.integers(0, 10)
    bad_counts = small_counts(SAE_FEATURES, SAE_FEATURES + 1)
    sae = st.sampled_from(world.sae_ids)
    bad_sae = world.ids(world.sae_ids)
    texts, bad_texts = feature_texts(hostile=False), feature_texts(hostile=True)
    text = st.sampled_from(("The dragon laughed", "Hi"))
    bad_text = st.one_of(st.just(""), strings())
    if rpc.method == "Activations":
        return one_hostile(
            features_pb2.ActivationsRequest,
            {"sae_id": sae, "text": text, "k": counts, "per_token": st.booleans()},
            {"sae_id": bad_sae, "text": bad_text, "k": bad_counts},
        )
    if rpc.method == "Search":
        return one_hostile(
            features_pb2.SearchRequest,
            {"sae_id": sae, "examples": texts, "k": counts},
            {"sae_id": bad_sae, "examples": bad_texts, "k": bad_counts},
        )
    if rpc.method == "Contrast":
        return one_hostile(
            features_pb2.ContrastRequest,
            {"sae_id": sae, "set_a": texts, "set_b": texts, "k": counts},
            {"sae_id": bad_sae, "set_a": bad_texts, "set_b": bad_texts, "k": bad_counts},
        )
    if rpc.method == "Info":
        return one_hostile(
            features_pb2.FeatureInfoRequest,
            {"sae_id": sae, "feature": st.integers(0, SAE_FEATURES - 1),
             "corpus": st.one_of(st.just([]), texts), "num_tokens": counts,
             "num_snippets": counts, "context_tokens": counts},
            {"sae_id": bad_sae, "feature": world.feature_indices(), "corpus": bad_texts,
             "num_tokens": bad_counts, "num_snippets": bad_counts, "context_tokens": bad_counts},
        )  # fmt: skip
    return None


def load_model_requests(world: World) -> SearchStrategy[models_pb2.LoadModelRequest]:
    sane = {
        "source": st.just(SOURCE_DIR),
        "model_id": st.just("second"),
        "dtype": st.sampled_from(("", "float32", "bfloat16")),
        "device": st.sampled_from(("", "cpu")),
    }
    hostile = {
        "source": st.one_of(
            st.sampled_from((f"{SOURCE_DIR}/config.json", *world.bake_outputs, "saes/resid",
                             "artifacts/calm", ".")),
            world.path_strings(),
        ),
        "model_id": st.one_of(st.just(world.model_id), world.ids(())),
        "dtype": st.one_of(st.sampled_from(DTYPES), strings()),
        "device": st.one_of(st.sampled_from(DEVICES), strings()),
    }  # fmt: skip
    return one_hostile(models_pb2.LoadModelRequest, sane, hostile)


def handwritten(world: World, rpc: Rpc) -> SearchStrategy[Message] | None:
    """The hand-written strategy for ``rpc``, if it has one."""
    if rpc.name == "Generation.Generate":
        return generate_requests(world)
    if rpc.name == "Bake.Bake":
        return bake_requests(world)
    if rpc.name == "Directions.Compute":
        return compute_requests(world)
    if rpc.name == "Directions.Upload":
        return upload_requests(world)
    if rpc.name == "Features.LoadSae":
        return load_sae_requests(world)
    if rpc.name == "Models.Load":
        return load_model_requests(world)
    if rpc.service == "steer.v1.Features":
        return feature_requests(world, rpc)
    return None


def requests_for(world: World, rpc: Rpc) -> SearchStrategy[Message]:
    """Hand-written requests (five in six) or any message from the descriptor."""
    generic = message_strategy(rpc.request.DESCRIPTOR, world)
    special = handwritten(world, rpc)
    if special is None:
        return generic
    return choice((5, special), (1, generic))


# -- cases ---------------------------------------------------------------------------------------


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]}…[{len(text)} chars]"


def describe(request: Message | bytes, limit: int = 3000) -> str:
    """A one-line, size-bounded description of a request (long strings are cut)."""
    if isinstance(request, bytes):
        return f"bytes[{len(request)}]={request[:200]!r}{'…' if len(request) > 200 else ''}"
    text = text_format.MessageToString(request, as_one_line=True, as_utf8=True)
    text = re.sub(r'"((?:[^"\\]|\\.){120,})"', lambda m: f'"{_shorten(m.group(1), 120)}"', text)
    return _shorten(text, limit)


@dataclass(frozen=True)
class Case:
    """One request to send: a message of ``rpc`` or raw bytes to ``path``."""

    rpc: Rpc
    request: Message | bytes
    #: the wire path (differs from rpc.path for garbage sent to unknown methods)
    path: str = ""
    #: rpcs in WITH_INNOCENT: "together" (sent with the normal stream) or "join" (sent once
    #: the normal stream runs)
    timing: str = "together"

    @property
    def wire_path(self) -> str:
        return self.path or self.rpc.path

    @property
    def label(self) -> str:
        if isinstance(self.request, bytes):
            known = self.wire_path == self.rpc.path
            return f"raw {self.rpc.name}" if known else "raw (unknown method)"
        return self.rpc.name

    def payload(self) -> bytes:
        if isinstance(self.request, bytes):
            return self.request
        return self.request.SerializeToString()

    def message(self) -> Message | None:
        """The request as its rpc parses it (garbage too, when it parses)."""
        if not isinstance(self.request, bytes):
            return self.request
        if self.wire_path != self.rpc.path:
            return None
        try:
            return self.rpc.request.FromString(self.request)
        except (DecodeError, RuntimeError, ValueError):
            return None

    def __repr__(self) -> str:
        timing = f" timing={self.timing}" if self.rpc.name in WITH_INNOCENT else ""
        where = f" to {self.wire_path}" if self.wire_path != self.rpc.path else ""
        return f"Case({self.label}{where}{timing}: {describe(self.request)})"


#: rpcs sent together with a normal greedy stream of the same model, whose tokens must equal
#: its tokens alone: generation shares the running batch, feature reads its engine thread
WITH_INNOCENT = frozenset(
    ("Generation.Generate", "Features.Activations", "Features.Search", "Features.Contrast",
     "Features.Info", "Features.LoadSae")
)  # fmt: skip
#: how much more often than the others these rpcs are fuzzed (they do the most with a request)
RPC_WEIGHTS = {
    "Generation.Generate": 4,
    "Bake.Bake": 3,
    "Directions.Upload": 3,
    "Directions.Compute": 2,
    "Models.Load": 2,
    "Features.LoadSae": 2,
}


def weighted_rpcs(rpcs: Sequence[Rpc]) -> tuple[Rpc, ...]:
    return tuple(rpc for rpc in rpcs for _ in range(RPC_WEIGHTS.get(rpc.name, 1)))


def message_cases(world: World, rpcs: Sequence[Rpc]) -> SearchStrategy[Case]:
    """Requests for ``rpcs`` (weighted by :data:`RPC_WEIGHTS`)."""
    timings = st.sampled_from(("together", "join"))

    def cases(rpc: Rpc) -> SearchStrategy[Case]:
        timing = timings if rpc.name in WITH_INNOCENT else st.just("together")
        return st.builds(
            lambda request, when: Case(rpc, request, timing=when), requests_for(world, rpc), timing
        )

    return st.sampled_from(weighted_rpcs(rpcs)).flatmap(cases)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _invalid_utf8(rpc: Rpc) -> SearchStrategy[bytes]:
    """A string field of the request holding bytes that are not UTF-8."""
    fields = [f for f in rpc.request.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_STRING]
    nested = [
        (f, g)
        for f in rpc.request.DESCRIPTOR.fields
        if f.message_type is not None and not f.message_type.GetOptions().map_entry
        for g in f.message_type.fields
        if g.type == FieldDescriptor.TYPE_STRING
    ]
    bad = st.sampled_from((b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xf0\x28\x8c\xbc", b"\x80"))
    options: list[SearchStrategy[bytes]] = []
    if fields:
        options.append(
            st.builds(lambda f, b: _field_bytes(f.number, b), st.sampled_from(fields), bad)
        )
    if nested:
        options.append(
            st.builds(
                lambda pair, b: _field_bytes(pair[0].number, _field_bytes(pair[1].number, b)),
                st.sampled_from(nested),
                bad,
            )
        )
    return st.one_of(options) if options else st.binary(max_size=8)


def _mutate(data: bytes, operation: str, position: int, value: int) -> bytes:
    if not data:
        return bytes([value])
    index = position % len(data)
    if operation == "flip":
        return data[:index] + bytes([data[index] ^ (value or 1)]) + data[index + 1 :]
    if operation == "truncate":
        return data[:index]
    if operation == "insert":
        return data[:index] + bytes([value]) + data[index:]
    if operation == "duplicate":
        return data + data
    return data + _varint(2**64 - 1)  # "tail": an overlong varint at the end


def garbage_cases(world: World, rpcs: Sequence[Rpc], max_bytes: int) -> SearchStrategy[Case]:
    """Raw bytes as requests: random, mutated valid requests, invalid UTF-8 in string fields,
    nesting past any parser's limit, overlong varints, oversize; some to unknown methods."""
    unknown_paths = (
        "/steer.v1.Nope/Generate",
        "/steer.v1.Models/Nope",
        "/",
        "/steer.v1.Models/",
        "//",
        "/steer.v1.Models/List/extra",
    )

    def payloads(rpc: Rpc) -> SearchStrategy[bytes]:
        valid = requests_for(world, rpc).map(lambda m: m.SerializeToString())
        mutated = st.builds(
            _mutate,
            valid,
            st.sampled_from(("flip", "truncate", "insert", "duplicate", "tail")),
            st.integers(0, 2**16),
            st.integers(0, 255),
        )
        groups = st.integers(50, 5000).map(lambda n: b"\x0b" * n + b"\x0c" * n)  # start/end group
        messages = st.integers(50, 3000).map(_nest)  # field 1 in field 1 in ... n deep
        return st.one_of(
            st.binary(max_size=512),
            mutated,
            _invalid_utf8(rpc),
            groups,
            messages,
            st.sampled_from(
                (
                    b"\x08" + b"\xff" * 11,
                    b"\x0a\xff\xff\xff\xff\x0f",
                    b"\x07",
                    b"\x00",
                    b"\xff" * 32,
                )
            ),
            st.just(b"\x00" * (max_bytes + 1)),
        )

    def build(rpc: Rpc, data: bytes, unknown: str | None) -> Case:
        return Case(rpc, data, path=unknown or "")

    return st.sampled_from(tuple(rpcs)).flatmap(
        lambda rpc: st.builds(
            build,
            st.just(rpc),
            payloads(rpc),
            choice((3, st.none()), (1, st.sampled_from(unknown_paths))),
        )
    )


def _nest(depth: int) -> bytes:
    data = b""
    for _ in range(depth):
        data = _field_bytes(1, data)
    return data


# -- the harness ---------------------------------------------------------------------------------

BAD_CODES = ("INTERNAL", "UNKNOWN")
#: a valid artifact id (a single directory name), as the server's paths.check_id accepts it
ARTIFACT_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
#: rpcs that write or remove one artifact: the id they name
_ARTIFACT_WRITERS: dict[str, Callable[[Any], str]] = {
    "Directions.Upload": lambda message: message.files.artifact_id,
    "Directions.Compute": lambda message: message.artifact_id,
    "Directions.Delete": lambda message: message.artifact_id,
}
CALL_TIMEOUT = 60.0
#: how long a started job may run before the fuzzer cancels it (tiny bakes take ~0.1 s)
JOB_WAIT = 10.0
JOB_STOP = 30.0


@dataclass
class Outcome:
    """What one case did, and which properties it broke."""

    label: str
    code: str
    details: str = ""
    error_field: str = ""
    #: final job state and error code, for rpcs that start a job ("SUCCEEDED", "FAILED:INTERNAL")
    job: str = ""
    #: Generate only: "ok", or how the innocent stream was harmed
    innocent: str = ""
    #: server-side exceptions logged while the case ran (type, message, innermost steer frame)
    causes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"{self.label} -> {self.code}" + (f" [{self.error_field}]" if self.error_field else "")
        ]
        if self.details:
            lines.append(f"  details: {_shorten(self.details, 500)}")
        if self.job:
            lines.append(f"  job: {self.job}")
        if self.innocent:
            lines.append(f"  innocent stream: {self.innocent}")
        lines += [f"  server log: {_shorten(cause, 600)}" for cause in self.causes]
        lines += [f"  VIOLATION: {_shorten(v, 800)}" for v in self.violations]
        return "\n".join(lines)


@dataclass
class _Call:
    code: str
    details: str = ""
    error_field: str = ""
    responses: list[bytes] = field(default_factory=list)


class _LogCapture(logging.Handler):
    """Server log records with an exception or a warning, as one line each."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            line += " | " + exception_summary(record.exc_info[1])
        with self._lock:
            self.lines.append(line)

    def drain(self) -> list[str]:
        with self._lock:
            lines, self.lines = self.lines, []
        return lines


def exception_summary(error: BaseException) -> str:
    """``Type: message at file:line`` of the innermost frame inside the steer package."""
    frames = traceback.extract_tb(error.__traceback__)
    inside = [f for f in frames if "/steer/" in f.filename] or frames
    where = ""
    if inside:
        frame = inside[-1]
        where = f" at {frame.filename.split('/steer/', 1)[-1]}:{frame.lineno} ({frame.name})"
    return f"{type(error).__name__}{where}: {_shorten(str(error), 300)}"


class Client:
    """Raw calls to one server: any bytes to any method; the status, details and the field
    named in the trailing metadata come back instead of an exception."""

    def __init__(self, target: str) -> None:
        self.target = target
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self.channel = grpc.insecure_channel(target, options=options)

    def close(self) -> None:
        self.channel.close()

    def call(
        self,
        path: str,
        payload: bytes,
        streaming: bool,
        timeout: float = CALL_TIMEOUT,
        on_message: Callable[[bytes], None] | None = None,
    ) -> _Call:
        try:
            if streaming:
                stream = self.channel.unary_stream(path)(payload, timeout=timeout)
                responses = []
                for item in stream:
                    responses.append(item)
                    if on_message is not None:
                        on_message(item)
                return _Call("OK", responses=responses)
            return _Call("OK", responses=[self.channel.unary_unary(path)(payload, timeout=timeout)])
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
            trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else ()
            fields = [value for key, value in (trailing or ()) if key == "steer-field"]
            details = error.details() if hasattr(error, "details") else str(error)
            return _Call(code.name, details or "", str(fields[0]) if fields else "")

    def rpc(self, name: str, request: Message, timeout: float = CALL_TIMEOUT) -> _Call:
        rpc = RPCS_BY_NAME[name]
        return self.call(rpc.path, request.SerializeToString(), rpc.streaming, timeout)

    def jobs(self) -> list[jobs_pb2.Job]:
        result = self.rpc("Jobs.List", jobs_pb2.ListJobsRequest())
        if result.code != "OK":
            return []
        return list(jobs_pb2.ListJobsResponse.FromString(result.responses[0]).jobs)


class Fuzzer(Client):
    """Sends cases to a running server and checks the properties after each.

    Every case starts from the fixture state: :meth:`restore` puts the files back, unloads
    models and SAEs the fuzzer's requests loaded and reloads the fixture ones they unloaded.
    """

    def __init__(
        self, target: str, world: World, fixture: Fixture, fixture_saes: Mapping[str, str]
    ) -> None:
        super().__init__(target)
        self.world, self.fixture = world, fixture
        self.fixture_saes = dict(fixture_saes)
        self.capture = _LogCapture()
        logging.getLogger("steer").addHandler(self.capture)  # steer.server's records too
        self.seen_jobs: set[str] = set()
        self.reference: tuple[tuple[int, ...], int] | None = None
        self.root_text = str(fixture.root.resolve())
        self.outside_text = str(fixture.outside.resolve())
        #: the HTTP API's base URL when the server serves it (fuzz_server(..., http_port=0))
        self.http_url: str | None = None

    def close(self) -> None:
        logging.getLogger("steer").removeHandler(self.capture)
        super().close()

    def innocent_request(self) -> generation_pb2.GenerateRequest:
        request = generation_pb2.GenerateRequest(
            model=self.world.model_id, text=INNOCENT_PROMPT, max_new_tokens=INNOCENT_TOKENS
        )
        request.sampling.temperature = 0.0
        return request

    def innocent(self, on_first: threading.Event | None = None) -> tuple[str, tuple[int, ...], int]:
        """(status, tokens, finish reason) of the normal greedy stream."""
        tokens: list[int] = []
        finish = [0]

        def seen(raw: bytes) -> None:
            message = generation_pb2.GenerateResponse.FromString(raw)
            tokens.extend(message.token_ids)
            if message.finish_reason:
                finish[0] = message.finish_reason
            if on_first is not None:
                on_first.set()

        rpc = RPCS_BY_NAME["Generation.Generate"]
        result = self.call(
            rpc.path, self.innocent_request().SerializeToString(), True, on_message=seen
        )
        if on_first is not None:
            on_first.set()
        return result.code, tuple(tokens), finish[0]

    def start(self) -> None:
        """Record the innocent stream's tokens alone."""
        code, tokens, finish = self.innocent()
        if code != "OK" or not tokens:
            raise RuntimeError(f"the reference stream failed: {code}")
        self.reference = (tokens, finish)
        self.seen_jobs = {job.job_id for job in self.jobs()}

    # -- one case ---------------------------------------------------------------------------------

    def run(self, case: Case) -> Outcome:
        began = time.monotonic()
        self.capture.drain()
        before = self._files()
        if case.rpc.name in WITH_INNOCENT and not isinstance(case.request, bytes):
            result, innocent = self._with_innocent(case)
        else:
            result, innocent = self.call(case.wire_path, case.payload(), case.rpc.streaming), ""
        outcome = Outcome(
            case.label, result.code, result.details, result.error_field, innocent=innocent
        )
        if result.code in BAD_CODES:
            outcome.violations.append(f"internal: status {result.code}: {result.details}")
        if result.code == "DEADLINE_EXCEEDED":
            outcome.violations.append(f"hang: no answer within {CALL_TIMEOUT:.0f} s")
        if innocent and innocent != "ok":
            outcome.violations.append(f"innocent: the normal stream {innocent}")
        outcome.violations += self._settle_jobs(outcome, case, result)
        outcome.violations += self._check_files(case, before)
        outcome.violations += self._check_leaks(case, outcome)
        outcome.violations += [f"health: {problem}" for problem in self._check_health()]
        outcome.causes = self.capture.drain()
        outcome.violations += [f"health: {problem}" for problem in self.restore()]
        outcome.seconds = time.monotonic() - began
        return outcome

    def _with_innocent(self, case: Case) -> tuple[_Call, str]:
        assert self.reference is not None, "call start() first"
        started = threading.Event()
        together = threading.Barrier(2)
        innocent: list[tuple[str, tuple[int, ...], int]] = []

        def run_innocent() -> None:
            if case.timing == "together":
                together.wait(timeout=30)
            innocent.append(self.innocent(started))

        thread = threading.Thread(target=run_innocent, name="fuzz-innocent")
        thread.start()
        if case.timing == "together":
            together.wait(timeout=30)
        else:
            started.wait(timeout=30)
        result = self.call(case.wire_path, case.payload(), case.rpc.streaming)
        thread.join(timeout=CALL_TIMEOUT + 10)
        if not innocent:
            return result, "did not finish"
        code, tokens, finish = innocent[0]
        expected, expected_finish = self.reference
        if code != "OK":
            return result, f"ended with {code}"
        if tokens != expected:
            return result, f"tokens {list(tokens)} != alone {list(expected)}"
        if finish != expected_finish:
            return result, f"finish reason {finish} != alone {expected_finish}"
        return result, "ok"

    # -- jobs -----------------------------------------------------------------------------------

    def _settle_jobs(self, outcome: Outcome, case: Case, result: _Call) -> list[str]:
        """Let jobs this case started finish (cancel them after JOB_WAIT); check their codes."""
        violations = []
        deadline = time.monotonic() + JOB_WAIT
        cancelled: set[str] = set()
        while True:
            new = [job for job in self.jobs() if job.job_id not in self.seen_jobs]
            running = [
                j for j in new if j.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING)
            ]
            if not running:
                break
            if time.monotonic() > deadline:
                for job in running:
                    if job.job_id not in cancelled:
                        self.rpc("Jobs.Cancel", jobs_pb2.JobRequest(job_id=job.job_id))
                        cancelled.add(job.job_id)
                if time.monotonic() > deadline + JOB_STOP:
                    names = ", ".join(j.job_id for j in running)
                    violations.append(
                        f"hang: jobs still running {JOB_STOP:.0f} s after Cancel: {names}"
                    )
                    break
            time.sleep(0.02)
        for job in new:
            self.seen_jobs.add(job.job_id)
            state = jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
            outcome.job = f"{state}:{job.error_code}" if job.error_code else state
            if job.error_code in BAD_CODES:
                violations.append(f"internal: job failed with {job.error_code}: {job.error}")
            for text in (job.error, job.result):
                if self._leaks(text, case):
                    violations.append(f"leak: the job shows an absolute server path: {text}")
        return violations

    # -- files ----------------------------------------------------------------------------------

    def _files(self) -> tuple[dict[str, tuple[int, int, str]], dict[str, tuple[int, int, str]]]:
        return snapshot(self.fixture.root), snapshot(self.fixture.outside)

    def _own_area(self, case: Case) -> tuple[str | None, bool]:
        """(the path under the root this request may write, whether it may replace or remove
        what is there): a bake's output (a previous bake output may be replaced), the artifact
        an upload, computation or delete names."""
        message = case.message()
        if message is None:
            return None, False
        if isinstance(message, bake_pb2.BakeRequest):
            output = message.output
            if not output or "\x00" in output or output.startswith("/"):
                return None, False
            resolved = os.path.normpath(output)
            if resolved.startswith("..") or resolved == ".":
                return None, False
            return resolved, resolved in self.fixture.bake_outputs
        artifact = _ARTIFACT_WRITERS.get(case.rpc.name)
        if artifact is not None and re.fullmatch(ARTIFACT_ID, artifact(message)):
            return f"artifacts/{artifact(message)}", True
        return None, False

    def _check_files(self, case: Case, before: tuple[dict[str, Any], dict[str, Any]]) -> list[str]:
        root_before, outside_before = before
        root_after, outside_after = self._files()
        area, may_replace = self._own_area(case)

        def own(path: str) -> bool:
            if area is None:
                return False
            inside = path == area or path.startswith(area + "/")
            existed = any(p == area or p.startswith(area + "/") for p in root_before)
            return inside and (may_replace or not existed)

        removed = sorted(p for p in root_before if p not in root_after and not own(p))
        changed = sorted(
            p
            for p in root_before
            if p in root_after and root_after[p] != root_before[p] and not own(p)
        )
        added = sorted(p for p in root_after if p not in root_before and not own(p))
        violations = []
        for what, paths in (("removed", removed), ("replaced", changed), ("added", added)):
            if paths:
                shown = ", ".join(paths[:6]) + (
                    f" (+{len(paths) - 6} more)" if len(paths) > 6 else ""
                )
                violations.append(f"data: {what} outside its own output: {shown}")
        if outside_before != outside_after:
            violations.append("data: changed files outside the models root (through a link)")
        return violations

    # -- leaks and health -------------------------------------------------------------------------

    def _leaks(self, text: str, case: Case | HttpCase) -> bool:
        if not text:
            return False
        payload = case.payload()
        for absolute in (self.root_text, self.outside_text):
            if absolute in text and absolute.encode() not in payload:
                return True
        return False

    def _check_leaks(self, case: Case, outcome: Outcome) -> list[str]:
        if self._leaks(outcome.details, case):
            return [f"leak: the error shows an absolute server path: {outcome.details}"]
        return []

    def _check_health(self) -> list[str]:
        problems = []
        health = self.rpc("Health.Check", health_pb2.HealthCheckRequest(), timeout=10)
        if health.code != "OK":
            problems.append(f"health check answered {health.code}: {health.details}")
        else:
            status = health_pb2.HealthCheckResponse.FromString(health.responses[0]).status
            if status != health_pb2.HealthCheckResponse.SERVING:
                problems.append(
                    f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
                )
        for name, request in (
            ("Models.List", models_pb2.ListModelsRequest()),
            ("Directions.List", directions_pb2.ListArtifactsRequest()),
            ("Features.ListSaes", features_pb2.ListSaesRequest()),
            ("Jobs.List", jobs_pb2.ListJobsRequest()),
        ):
            result = self.rpc(name, request, timeout=10)
            if result.code != "OK":
                problems.append(f"{name} answered {result.code}: {result.details}")
        return problems

    def restore(self) -> list[str]:
        """Put the fixture back (files, models, SAEs); what could not be restored is a failure."""
        _restore_tree(self.fixture.root, self.fixture.files, self.fixture.links)
        _restore_tree(self.fixture.outside, self.fixture.outside_files, {})
        problems = []
        listed = self.rpc("Models.List", models_pb2.ListModelsRequest(), timeout=10)
        if listed.code == "OK":
            models = models_pb2.ListModelsResponse.FromString(listed.responses[0]).models
            for model in models:
                if model.model_id != self.world.model_id:
                    self.rpc(
                        "Models.Unload", models_pb2.UnloadModelRequest(model_id=model.model_id)
                    )
            if self.world.model_id not in {m.model_id for m in models}:
                loaded = self.rpc(
                    "Models.Load",
                    models_pb2.LoadModelRequest(
                        source=self.world.model_source, model_id=self.world.model_id
                    ),
                )
                if loaded.code != "OK":
                    problems.append(
                        f"could not load the model again: {loaded.code} {loaded.details}"
                    )
        saes = self.rpc("Features.ListSaes", features_pb2.ListSaesRequest(), timeout=10)
        if saes.code == "OK":
            loaded_saes = features_pb2.ListSaesResponse.FromString(saes.responses[0]).saes
            present = set()
            for sae in loaded_saes:
                wanted = self.fixture_saes.get(sae.sae_id)
                if wanted == sae.path and sae.model == self.world.model_id:
                    present.add(sae.sae_id)
                else:
                    self.rpc("Features.UnloadSae", features_pb2.UnloadSaeRequest(sae_id=sae.sae_id))
            for sae_id, path in self.fixture_saes.items():
                if sae_id not in present:
                    again = self.rpc(
                        "Features.LoadSae",
                        features_pb2.LoadSaeRequest(
                            path=path, sae_id=sae_id, model=self.world.model_id
                        ),
                    )
                    if again.code != "OK":
                        problems.append(f"could not load SAE {sae_id} again: {again.code}")
        info = self.rpc(
            "Models.Info", models_pb2.ModelInfoRequest(model_id=self.world.model_id), 10
        )
        if info.code != "OK":
            problems.append(f"Models.Info answered {info.code}: {info.details}")
        return problems


# -- running many cases --------------------------------------------------------------------------


class PropertyBroken(AssertionError):
    """A case broke a property (subclasses name which, most severe first, so that hypothesis
    shrinks a failing case to a smaller one that breaks the same property)."""


class DataTouched(PropertyBroken):
    """Files outside the request's own output were removed, replaced or added."""


class InnocentHarmed(PropertyBroken):
    """The normal stream sent with the case did not get its tokens alone."""


class Unhealthy(PropertyBroken):
    """Health, a List or Info stopped answering, or the fixture could not be put back."""


class InternalStatus(PropertyBroken):
    """INTERNAL or UNKNOWN, as the answer or as a job's error code."""


class Hang(PropertyBroken):
    """No answer within the deadline, or a job that does not stop."""


class PathLeak(PropertyBroken):
    """An error or job result shows an absolute server path (or, over HTTP, a traceback)."""


class StreamBroken(PropertyBroken):
    """HTTP: a connection dropped, or an SSE stream that does not end with ``data: [DONE]``
    right after its error chunk (if any)."""


class BadShape(PropertyBroken):
    """HTTP: an error body not in OpenAI's shape, or a body or chunk that is not strict JSON."""


#: violation kind (the prefix of each :attr:`Outcome.violations` entry) -> its exception, most
#: severe first
PROPERTIES: dict[str, type[PropertyBroken]] = {
    "data": DataTouched,
    "innocent": InnocentHarmed,
    "health": Unhealthy,
    "internal": InternalStatus,
    "stream": StreamBroken,
    "hang": Hang,
    "shape": BadShape,
    "leak": PathLeak,
}


def broken(outcome: Outcome) -> type[PropertyBroken]:
    """The exception for the most severe property ``outcome`` broke."""
    kinds = {violation.split(":", 1)[0] for violation in outcome.violations}
    return next(error for kind, error in PROPERTIES.items() if kind in kinds)


def failure_key(case: Case | HttpCase, outcome: Outcome) -> str:
    """What makes two failures the same: the rpc, the status and what broke, without ids."""

    def plain(text: str) -> str:
        text = re.sub(r"incident [0-9a-f]+", "incident N", text)
        text = re.sub(r"\[[^\]]*\]|\{[^}]*\}", "[…]", text)
        text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
        text = re.sub(r"(?<![A-Za-z_])-?\d[\d.e+-]*", "N", text)
        return text[:160]

    parts = [outcome.label, outcome.code]
    raised = [c.split(" | ", 1)[1] for c in outcome.causes if " | " in c]
    if raised:  # the exception's type and where it was raised
        parts.append(raised[0].split(": ", 1)[0])
    elif outcome.causes:
        parts.append(plain(outcome.causes[0]))
    parts += sorted({plain(":".join(v.split(":", 2)[:2])) for v in outcome.violations})
    return " / ".join(parts)


@dataclass
class FuzzResult:
    """Every outcome of a run and the failing cases (one per distinct failure kept in full)."""

    outcomes: list[Outcome] = field(default_factory=list)
    failures: dict[str, tuple[Any, Outcome, int]] = field(default_factory=dict)

    def add(self, case: Case | HttpCase, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.violations:
            key = failure_key(case, outcome)
            known = self.failures.get(key)
            if known is None:
                self.failures[key] = (case, outcome, 1)
            else:
                first, first_outcome, count = known
                smaller = len(case.payload()) < len(first.payload())
                self.failures[key] = (
                    (case, outcome, count + 1) if smaller else (first, first_outcome, count + 1)
                )

    @property
    def statuses(self) -> Counter[str]:
        return Counter(o.code for o in self.outcomes)

    def by_rpc(self) -> dict[str, Counter[str]]:
        table: dict[str, Counter[str]] = {}
        for outcome in self.outcomes:
            table.setdefault(outcome.label, Counter())[outcome.code] += 1
        return table

    @property
    def jobs(self) -> Counter[str]:
        return Counter(o.job for o in self.outcomes if o.job)

    @property
    def innocent_streams(self) -> int:
        return sum(1 for o in self.outcomes if o.innocent)

    @property
    def innocent_harmed(self) -> int:
        return sum(1 for o in self.outcomes if o.innocent and o.innocent != "ok")

    @property
    def internal(self) -> int:
        """INTERNAL or UNKNOWN answers (HTTP: any 5xx status), and jobs that failed with
        either."""
        return sum(
            1
            for o in self.outcomes
            if o.code in BAD_CODES
            or o.code.startswith("5")
            or any(o.job.endswith(":" + code) for code in BAD_CODES)
        )

    @property
    def violating(self) -> int:
        return sum(1 for o in self.outcomes if o.violations)


def all_cases(world: World, rpcs: Sequence[Rpc], *, garbage: float, max_bytes: int) -> Any:
    """Message cases, and garbage with probability about ``garbage``."""
    messages = message_cases(world, rpcs)
    if garbage <= 0:
        return messages
    if garbage >= 1:
        return garbage_cases(world, rpcs, max_bytes)
    tenths = max(1, round(garbage * 10))
    return choice((tenths, garbage_cases(world, rpcs, max_bytes)), (10 - tenths, messages))


#: examples per hypothesis run. Hypothesis spends its first ten valid examples on health
#: checks; after that it mutates every example it generates about five times (copying parts of
#: it into others), which on a budget of a few hundred would make most examples near-copies.
#: Short runs with seeds of their own keep every example a fresh draw.
CHUNK = 10


def run_fuzz(
    fuzzer: Fuzzer,
    count: int,
    seed: int,
    *,
    rpcs: Sequence[Rpc] = RPCS,
    garbage: float = 0.1,
    strict: bool = False,
    max_bytes: int = 4 * 1024 * 1024,
    progress: Callable[[int, Any, Outcome], None] | None = None,
) -> FuzzResult:
    """Run about ``count`` cases drawn with ``seed`` (deterministic for a given seed).

    Recording (the default): every outcome is counted and failures are collected by
    :func:`failure_key` (scripts/fuzz_service.py). ``strict`` (CI): each distinct failure is
    shrunk by hypothesis to a minimal case breaking the same property, the run goes on, and at
    the end the shrunk failures are raised (one :class:`PropertyBroken`, or a group of them).
    """
    strategy = all_cases(fuzzer.world, rpcs, garbage=garbage, max_bytes=max_bytes)
    return run_cases(fuzzer.run, strategy, count, seed, strict=strict, progress=progress)


def run_cases(
    run: Callable[[Any], Outcome],
    strategy: SearchStrategy[Any],
    count: int,
    seed: int,
    *,
    strict: bool = False,
    progress: Callable[[int, Any, Outcome], None] | None = None,
) -> FuzzResult:
    """:func:`run_fuzz` for any cases (:class:`Case` or :class:`HttpCase`): ``run`` sends one
    and checks the properties."""
    result = FuzzResult()
    phases = (Phase.explicit, Phase.generate, Phase.shrink) if strict else (Phase.generate,)
    #: cases already run without a failure (each chunk starts with the same simplest case)
    passed: set[tuple[str, str, bytes]] = set()
    #: failures already shrunk and reported (strict), and those raised in the current chunk
    reported: set[str] = set()
    raised: set[str] = set()
    failures: list[PropertyBroken] = []

    def one(case: Case | HttpCase) -> None:
        key = (case.wire_path, case.timing, hashlib.sha256(case.payload()).digest())
        if key in passed or (not strict and len(result.outcomes) >= count):
            return
        outcome = run(case)
        result.add(case, outcome)
        if progress is not None:
            progress(len(result.outcomes), case, outcome)
        if not outcome.violations:
            passed.add(key)
            return
        failure = failure_key(case, outcome)
        if strict and failure not in reported:
            raised.add(failure)
            error = broken(outcome)
            raise error(
                f"a fuzzed request broke a property ({error.__doc__})\n"
                f"request: {case!r}\n{outcome.summary()}"
            )

    # at least count cases (strict: a chunk's shrinking may run more; recording: exactly count)
    chunk = 0
    while len(result.outcomes) < count and chunk < 10 * (count // CHUNK + 1):
        run_chunk = settings(
            max_examples=CHUNK,
            deadline=None,
            database=None,
            phases=phases,
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
            print_blob=False,
        )(given(case=strategy)(one))
        try:
            hypothesis_seed(seed * 100_003 + chunk)(run_chunk)()
        except PropertyBroken as error:
            failures.append(error)
        reported.update(raised)
        raised.clear()
        chunk += 1
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise ExceptionGroup(f"{len(failures)} fuzzed requests broke properties", failures)
    return result


def _wait_for_jobs(client: Client, timeout: float = JOB_WAIT + JOB_STOP) -> None:
    deadline = time.monotonic() + timeout
    running = (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING)
    while any(job.state in running for job in client.jobs()) and time.monotonic() < deadline:
        time.sleep(0.02)


@contextlib.contextmanager
def fuzz_server(
    served: ModelHandle,
    root: Path,
    *,
    model_id: str = "tiny",
    model_source: str = SOURCE_DIR,
    bake_source: ModelHandle | None = None,
    **settings_overrides: Any,
) -> Iterator[Fuzzer]:
    """Prepare ``root``, serve ``served`` as ``model_id`` in process (with the named sliders of
    :data:`SLIDERS`), and yield a started :class:`Fuzzer` (``http_port=0``: the HTTP API too,
    for :class:`HttpFuzzer`). ``model_source`` is how the fuzzer
    loads the model again after a request unloaded it (the saved tiny model, or an offline
    name); ``bake_source`` defaults to ``served`` (then ``model_source`` may be the saved copy)."""
    fixture = prepare_root(root, served, bake_source or served)
    sliders = fixture.outside / "sliders.toml"
    fixture_saes = {"resid": "saes/resid"}
    settings_value = fuzz_settings(root, **{"sliders": sliders, **settings_overrides})
    with SteerServer(settings_value, models={model_id: served}) as server:
        setup = Client(server.target)
        try:
            for sae_id, path in fixture_saes.items():
                request = features_pb2.LoadSaeRequest(path=path, sae_id=sae_id, model=model_id)
                loaded = setup.rpc("Features.LoadSae", request)
                assert loaded.code == "OK", loaded.details
            # a finished job, so that Jobs requests can name one
            bake = bake_pb2.BakeRequest(
                model_source=SOURCE_DIR, recipe_path="recipes/ablate.toml", output="baked/first"
            )
            started = setup.rpc("Bake.Bake", bake)
            assert started.code == "OK", started.details
            _wait_for_jobs(setup)
            jobs = tuple(job.job_id for job in setup.jobs())
            described = setup.rpc("Models.Info", models_pb2.ModelInfoRequest(model_id=model_id))
            info = models_pb2.ModelInfo.FromString(described.responses[0])
        finally:
            setup.close()
        world = World(
            model_id=model_id,
            model_source=model_source,
            d_model=info.d_model,
            num_layers=info.num_layers,
            vocab_size=info.vocab_size,
            hook_names=tuple(info.hook_names),
            artifact_ids=("refusal", "calm", "shared", "foreign", "bake-direction", "bake-vector"),
            sae_ids=tuple(fixture_saes),
            sae_paths=(
                "saes/resid",
                "saes/wide",
                "saes/link",
                "saes",
                ".",
                SOURCE_DIR,
                "artifacts/calm",
            ),
            slider_names=("calm", "refusal", "feature", "scaled", "gentle"),
            job_ids=jobs,
            paths=tuple(sorted({*fixture.files, *fixture.links, *fixture.bake_outputs})),
            bake_outputs=fixture.bake_outputs,
            root=str(root.resolve()),
            tensor_blobs=tensor_blobs(served),
            sidecar_blobs=sidecar_blobs(served, fixture.files["artifacts/calm/steer.json"]),
        )
        fuzzer = Fuzzer(server.target, world, fixture, fixture_saes)
        if server.http_port is not None:
            fuzzer.http_url = server.http_url
        try:
            fuzzer.restore()  # removes baked/first
            fuzzer.start()
            yield fuzzer
        finally:
            fuzzer.close()


# -- the HTTP API: the same properties over the OpenAI-compatible JSON bodies (issue #15) ---------

#: the routes that take a generation body
HTTP_GENERATION = ("/v1/completions", "/v1/chat/completions")
#: routes FastAPI serves without listing them in /openapi.json
HTTP_UNLISTED = ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect")
#: paths no route serves, and spellings of served ones a router might get wrong
HTTP_ODD_PATHS = (
    "/",
    "/v1",
    "/v1/",
    "/v1/completions/",
    "/v1/chat",
    "/v1/embeddings",
    "/v1/engines",
    "/v1/models/tiny",
    "/v1/chat/completions/x",
    "/v1/steer/sliders/calm",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/v1/%2e%2e/health",
    "//v1/models",
    "/V1/MODELS",
    "/health/",
    "/docs/x",
    "/static/x",
    "/%00",
    "/%ff%fe",
    "/v1/%F0%9F%90%89",
    "/" + "a" * 5000,
    "/v1/models?limit=-1&after=%00",
    "/v1/completions?stream=true",
)
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
#: what a client may claim its body is (the server reads JSON whatever the header says)
CONTENT_TYPES = (
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=utf-16",
    "application/octet-stream",
    "text/event-stream",
    "",
)
#: the keys of OpenAI's error object
ERROR_KEYS = frozenset(("message", "type", "param", "code"))
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")


@dataclass(frozen=True)
class Raw:
    """JSON text put into a body as it is: what Python's json module does not write (an
    integer past its 4300-digit limit, ``1e999``, lone surrogates, a duplicated key)."""

    text: str


def json_text(value: Any) -> str:
    """``value`` as JSON text, :class:`Raw` parts as they are (NaN and Infinity as Python
    writes them)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (
            f"{json_text(key if isinstance(key, Raw) else str(key))}:{json_text(item)}"
            for key, item in value.items()
        )
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(json_text(item) for item in value) + "]"
    return json.dumps(value)


#: numbers and strings only :class:`Raw` can write
RAW_JSON = (
    Raw("1" + "0" * 5000),
    Raw("-" + "9" * 4301),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("1E-400"),
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("-0"),
    Raw("123456789012345678901234567890"),
    Raw('"\\ud800"'),
    Raw('"a\\udfffb"'),
    Raw('"\\u0000"'),
)
JSON_INT_EDGES = (*INT64_EDGES, 2**63, 2**64, -(2**63) - 1, 2**31, 2**32, 10**30, 4096, 65536)
#: items of long JSON lists (a long list costs nothing to draw)
_LIST_ITEMS = ("0", "1.5", '"a"', "null", "{}", "[]", "true", '{"role":"user","content":"a"}')


#: strings JSON carries that are not Unicode text (unpaired surrogates), and a pair that is
SURROGATES = ("\ud800", "a\udfffb", "\udbff", "x" * 10 + "\udc00", "\ud83d\udc09")


def http_strings(*known: str) -> SearchStrategy[str]:
    """:func:`strings`, and now and then one of :data:`SURROGATES` (which protobuf, and so the
    gRPC fuzzer, cannot carry)."""
    return choice((8, strings(*known)), (1, st.sampled_from(SURROGATES)))


def json_scalars() -> SearchStrategy[Any]:
    return choice(
        (1, st.none()),
        (1, st.booleans()),
        (2, st.sampled_from(JSON_INT_EDGES)),
        (1, st.integers()),
        (2, st.sampled_from(EXTREME_FLOATS)),
        (1, st.floats()),
        (3, http_strings()),
        (2, st.sampled_from(RAW_JSON)),
    )


def json_values() -> SearchStrategy[Any]:
    """Any JSON value: scalars, small containers, nesting past any limit, long lists."""
    containers = st.recursive(
        json_scalars(),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=8), children, max_size=4),
        ),
        max_leaves=8,
    )
    long_lists = st.builds(
        lambda item, count: Raw("[" + ",".join([item] * count) + "]"),
        st.sampled_from(_LIST_ITEMS),
        st.integers(1000, 50_000),
    )
    return choice(
        (5, json_scalars()), (3, containers), (1, nested_json().map(Raw)), (1, long_lists)
    )


def _hostile_of(converter: str) -> SearchStrategy[Any]:
    """Hostile values for a field read by ``steer.http.fields.<converter>``."""
    if converter == "_number":
        typed = st.one_of(floats(), st.sampled_from(RAW_JSON[:10]))
    elif converter in ("_integer", "_top_k", "_seed", "_whole_context"):
        typed = st.sampled_from((*JSON_INT_EDGES, -2, 1.5, 40.0, 1e30, -1e308, "5", True))
    elif converter == "_boolean":
        typed = st.sampled_from(("true", "false", 0, 1, [], {}, "", 1.0))
    else:  # lists of strings, DRY breakers
        typed = st.one_of(
            st.lists(http_strings(), max_size=5),
            st.lists(json_scalars(), min_size=1, max_size=3),
            http_strings(),
            st.sampled_from(("[", '["a", 1]', "[" * 5000, '"\\n", ":"', ",,,", "[]")),
            st.integers(65, 5000).map(lambda n: ["x"] * n),
        )
    return choice((3, typed), (1, json_values()))


#: ordinary values of fields that are not SamplingConfig fields of the same name
_HTTP_SANE: dict[str, tuple[Any, ...]] = {
    "seed": (-1, 0, 7, 2**32),
    "ban_eos": (False, True),
    "dry_sequence_breakers": (["\n", ":"], '["\\n", ":", "\\"", "*"]', '"\\n", ":"', "\n,:", []),
    "do_sample": (True, False),
    "stop": ([], ["\n"], "\n", ["dragon", "The"], [""]),
    "n": (1, 1, 2, 3),
    "stream": (False, True),
    "stream_options": ({"include_usage": True}, {"include_usage": False}, {}),
    "logprobs": (0, 2, 5, True, False),
    "n_probs": (0, 3),
    "top_logprobs": (0, 1, 5),
    "steer_prompt_format": tuple(FORMATS),
}
#: bookkeeping keys clients add (ignored)
HTTP_BOOKKEEPING = (
    "api_type",
    "truncation_length",
    "user",
    "add_bos_token",
    "skip_special_tokens",
    "max_context_length",
    "genamt",
    "quiet",
    "trim_stop",
    "mode",
    "instruction_template",
    "character",
    "preset",
    "system_prompt",
    "spaces_between_special_tokens",
    "auto_max_new_tokens",
)


def http_vocabulary(world: World) -> dict[str, tuple[SearchStrategy[Any], SearchStrategy[Any]]]:
    """Every body key steer.http.fields knows (each sampler under every alias, the unsupported
    samplers and their parameters, output and steering keys), as (ordinary values, hostile
    values). Read from its tables, so a new field or alias is fuzzed without a change here."""
    vocabulary: dict[str, tuple[SearchStrategy[Any], SearchStrategy[Any]]] = {}
    for name, (aliases, convert) in http_fields.SAMPLER_FIELDS.items():
        sane = _HTTP_SANE.get(name) or _SANE_SAMPLING[name]
        for alias in aliases:
            vocabulary[alias] = (st.sampled_from(sane), _hostile_of(convert.__name__))
    tokens = st.integers(0, world.vocab_size - 1)
    token_keys = st.one_of(
        tokens.map(str),
        st.sampled_from(("-1", "1e3", " 5", "5 ", "٣", "0x10", "", "99999999999", "2147483648")),
    )
    vocabulary["logit_bias"] = (
        st.dictionaries(tokens.map(str), st.sampled_from((-100.0, 5.0, 0.0, 100)), max_size=3),
        choice(
            (
                3,
                st.dictionaries(
                    token_keys, choice((2, floats()), (1, json_values())), min_size=1, max_size=3
                ),
            ),
            (1, st.integers(4097, 6000).map(lambda n: {str(i): 1.0 for i in range(n)})),
            (1, json_values()),
        ),
    )
    ids = st.lists(tokens, max_size=3)
    vocabulary["custom_token_bans"] = (
        st.one_of(ids.map(lambda t: ",".join(map(str, t))), ids),
        st.one_of(
            st.sampled_from(("1,,2", "a", ",", " 7 , 8", "-1", "1" * 30, "٣,٤")),
            st.integers(4096, 5000).map(lambda n: ",".join(["3"] * n)),
            st.lists(st.sampled_from((-1, 2**31, 1.5, "3", None, True)), min_size=1, max_size=3),
            json_values(),
        ),
    )
    vocabulary["sampler_order"] = (
        st.permutations(range(7)).map(list),
        st.one_of(
            st.lists(st.sampled_from((7, -1, 0, 6, True, 2**63, "top_k", 1.0)), max_size=9),
            json_values(),
        ),
    )
    names = tuple(http_fields.PRIORITY_NAMES)
    vocabulary["sampler_priority"] = (
        st.one_of(
            st.lists(st.sampled_from(names), unique=True, max_size=8),
            st.lists(st.sampled_from(names), unique=True, max_size=8).map("\n".join),
        ),
        st.one_of(
            st.lists(mostly(st.sampled_from(names), http_strings(), odds=1), max_size=30),
            st.lists(st.sampled_from(names), min_size=2, max_size=8),  # repeats
            json_values(),
        ),
    )
    for key in (
        "max_tokens",
        "max_new_tokens",
        "max_completion_tokens",
        "n_predict",
        "num_predict",
    ):
        vocabulary[key] = (
            st.sampled_from((1, 2, 4, 8, -1 if "predict" in key else 3)),
            _hostile_of("_integer"),
        )
    for key in ("stop", "stopping_strings"):
        vocabulary[key] = (st.sampled_from(_HTTP_SANE["stop"]), _hostile_of("_strings"))
    for key in (
        "do_sample",
        "n",
        "stream",
        "stream_options",
        "logprobs",
        "n_probs",
        "top_logprobs",
        http_fields.PROMPT_FORMAT_FIELD,
    ):
        vocabulary[key] = (st.sampled_from(_HTTP_SANE[key]), json_values())
    vocabulary["n"] = (vocabulary["n"][0], _hostile_of("_integer"))
    switches = st.sampled_from(
        (0, False, 1, 0.5, True, "", "x", {"type": "text"}, {"type": "json_object"}, 'root ::= "a"')
    )
    for key in http_fields.UNSUPPORTED:
        vocabulary[key] = (switches, json_values())
    for key in http_fields.PARAMETERS:
        vocabulary[key] = (st.sampled_from((0, 0.5, 1.0, 2)), json_values())
    for key in HTTP_BOOKKEEPING:
        vocabulary[key] = (st.sampled_from((0, 4096, "x", True, "tabby")), json_values())
    return vocabulary


def _replace_leaf(value: Any, replacement: SearchStrategy[Any]) -> SearchStrategy[Any]:
    """``value`` (JSON) with one leaf, list item or object value replaced by a draw of
    ``replacement``."""

    @st.composite
    def replaced(draw: st.DrawFn) -> Any:
        copied = copy.deepcopy(value)
        places: list[tuple[Any, Any]] = []
        pending = [copied]
        while pending:
            item = pending.pop()
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                places.append((item, key))
                if isinstance(child, (dict, list)) and child:
                    pending.append(child)
        if not places:
            return draw(replacement)
        container, key = draw(st.sampled_from(places))
        container[key] = draw(replacement)
        return copied

    return replaced()


def steering_entries(world: World) -> SearchStrategy[Any]:
    """Entries of the ``steering`` list: JSON forms of Intervention messages (ordinary ones and
    the hostile ones of :func:`interventions`), with one value replaced by any JSON value, and
    objects that are no Intervention at all."""
    as_json = json_format.MessageToDict
    sane = interventions(world, hostile=False).map(as_json)
    speakers = st.one_of(st.sampled_from(("Maren", "Kai", "User", "")), http_strings())
    junk = st.sampled_from(
        (
            {"bogus": 1},
            {"add": 1},
            {"add": {}},
            {"ablate": None},
            {},
            {"named": {"name": "calm", "value": "x"}},
            {"add": {"artifactId": "calm"}, "ablate": {}},
            {"named": {"name": "calm", "value": 1}, "speaker": None},
            {
                "add": {
                    "inline": {"shared": [1.0] * 3},
                    "strength": 1,
                    "hooks": ["blocks.0.hook_resid_post"],
                }
            },
        )
    )
    return choice(
        (4, sane),
        (3, interventions(world, hostile=True).map(as_json)),
        (2, sane.flatmap(lambda entry: _replace_leaf(entry, json_values()))),
        (1, st.builds(lambda entry, who: {**entry, "speaker": who}, sane, speakers)),
        (1, junk),
        (1, json_values()),
    )


def slider_fields(world: World, *, hostile: bool) -> SearchStrategy[tuple[str, Any]]:
    """One flat ``steer.NAME`` field: a known slider at an ordinary value; ``hostile``: also
    unknown names and values out of range, extreme or of the wrong JSON type."""
    name = st.sampled_from(world.slider_names)
    value = st.sampled_from((0.0, 0.25, 1.0, -1.0, 0.5))
    if hostile:
        unknown = ("nope", "", "calm ", "CALM", "calm.x", "steer.calm", "\x00", "a" * 300, "\ud800")
        name = mostly(name, st.one_of(st.sampled_from(unknown), http_strings()), odds=2)
        bad = choice((3, floats()), (1, st.sampled_from(RAW_JSON)), (1, json_values()))
        value = mostly(value, bad, odds=1)
    return st.tuples(name.map(lambda n: http_fields.SLIDER_PREFIX + n), value)


_SANE_TEXTS = ("The knight drew her sword", "Hello", "Once upon a time", "How do I bake bread")


def http_prompts(world: World, *, hostile: bool) -> SearchStrategy[Any]:
    """``prompt`` values: a text or a list of one; hostile ones: empty, special tokens, huge,
    several prompts, token ids, any JSON."""
    sane = st.sampled_from(_SANE_TEXTS)
    if not hostile:
        return st.one_of(sane, sane.map(lambda text: [text]))
    return st.one_of(
        st.sampled_from(("", "<|im_start|>user\nHi<|im_end|>", "<pad>" * 50, "🐉 é \x00")),
        http_strings(),
        st.lists(http_strings(), max_size=3),
        st.lists(world.token_ids(), min_size=1, max_size=5),
        huge_strings(),
        json_values(),
    )


_ROLES = ("system", "user", "assistant", "developer")
_ODD_ROLES = ("tool", "function", "", "User", "narrator", "model", None, 1, ["user"])
_NAMES = ("Maren", "Kai", "User", "Assistant")
_ODD_NAMES = ("", " ", "{{char}}", "\n", "Maren\x00", "<|im_end|>", "a" * 300, 5, None, ["Kai"])


@st.composite
def chat_messages(draw: st.DrawFn, hostile: bool = False) -> dict[Any, Any]:
    """One chat message: role, content (text or content parts) and sometimes a ``name``;
    ``hostile``: one part of it odd."""
    text = st.sampled_from(_SANE_TEXTS)
    message: dict[Any, Any] = {
        "role": draw(st.sampled_from(_ROLES)),
        "content": draw(
            st.one_of(
                text,
                st.lists(text.map(lambda t: {"type": "text", "text": t}), min_size=1, max_size=2),
            )
        ),
    }
    if draw(st.integers(0, 3)) == 0:
        message["name"] = draw(st.sampled_from(_NAMES))
    if not hostile:
        return message
    part = draw(st.sampled_from(("role", "content", "name", "extra")))
    if part == "role":
        message["role"] = draw(st.one_of(st.sampled_from(_ODD_ROLES), http_strings()))
    elif part == "name":
        message["name"] = draw(
            st.one_of(st.sampled_from(_ODD_NAMES), http_strings(), json_values())
        )
    elif part == "content":
        odd_parts: SearchStrategy[Any] = st.sampled_from(
            (
                [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                [{"type": "text"}],
                [{"type": "text", "text": 5}],
                ["text"],
                [],
                [None],
                [{"type": "text", "text": "a"}, {"type": "input_audio"}],
                None,
                5,
                {},
            )
        )
        message["content"] = draw(
            st.one_of(odd_parts, http_strings(), huge_strings(), json_values())
        )
    else:
        extra = draw(st.sampled_from(("tool_calls", "function_call", "tool_call_id", "weight")))
        message[extra] = draw(
            st.one_of(st.sampled_from(([{"id": "x"}], [], None, 1)), json_values())
        )
    return message


def http_messages(world: World, *, hostile: bool) -> SearchStrategy[Any]:
    """``messages`` values: one to five ordinary messages; hostile: one odd message among
    them, none, thousands, not a list."""
    sane = st.lists(chat_messages(), min_size=1, max_size=5)
    if not hostile:
        return sane
    return choice(
        (
            5,
            st.builds(
                lambda before, odd, after: [*before, odd, *after],
                st.lists(chat_messages(), max_size=2),
                chat_messages(hostile=True),
                st.lists(chat_messages(), max_size=2),
            ),
        ),
        (
            1,
            st.integers(1000, 5000).map(
                lambda n: Raw("[" + ",".join(['{"role":"user","content":"Hi"}'] * n) + "]")
            ),
        ),
        (1, st.just([])),
        (1, json_values()),
    )


@st.composite
def generation_bodies(
    draw: st.DrawFn,
    world: World,
    vocabulary: Mapping[str, tuple[SearchStrategy[Any], SearchStrategy[Any]]],
    chat: bool,
) -> dict[Any, Any]:
    """A completion (``chat``: chat completion) body as a client would build it, with up to six
    ordinary fields of the vocabulary and, usually, one or two hostile ones: a sampler value
    at or past its limits, a wrong JSON type, an unknown or out-of-range slider, an odd
    ``steering`` entry or message, a huge or missing prompt, an unknown model."""
    hostile = set(
        draw(
            st.lists(
                st.sampled_from(
                    (
                        "field",
                        "field",
                        "field",
                        "field",
                        "slider",
                        "steering",
                        "prompt",
                        "prompt",
                        "model",
                        "swap",
                        "duplicate",
                    )
                ),
                min_size=draw(st.sampled_from((0, 1, 1, 1, 2))),
                max_size=2,
            )
        )
    )
    body: dict[Any, Any] = {}
    if draw(st.integers(0, 5)):
        model = st.sampled_from((world.model_id, world.model_id, ""))
        odd = st.one_of(world.model_ids(), st.sampled_from(SURROGATES))
        body["model"] = draw(odd if "model" in hostile else model)
    key = "messages" if chat else "prompt"
    if "swap" in hostile:  # the other route's key (as well, or instead)
        body[("prompt" if chat else "messages")] = draw(
            http_prompts(world, hostile=False) if chat else http_messages(world, hostile=False)
        )
    if "swap" not in hostile or draw(st.booleans()):
        strategy = http_messages if chat else http_prompts
        body[key] = draw(strategy(world, hostile="prompt" in hostile))
    body["max_tokens"] = draw(st.integers(1, 8))
    if draw(st.integers(0, 2)):
        body["temperature"] = draw(st.sampled_from((0, 0.0, 0.7, 1.0)))
    # the output's shape: a stream half the time (with usage), several choices, logprobs
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": True}
    if draw(st.integers(0, 4)) == 0:
        body["n"] = draw(st.integers(2, 3))
    if draw(st.integers(0, 4)) == 0:
        if chat:
            body["logprobs"], body["top_logprobs"] = True, draw(st.integers(0, 5))
        else:
            body["logprobs"] = draw(st.integers(1, 5))
    keys = tuple(vocabulary)
    for name in draw(st.lists(st.sampled_from(keys), max_size=6, unique=True)):
        body[name] = draw(vocabulary[name][0])
    if draw(st.integers(0, 3)) == 0:
        body.update(draw(st.lists(slider_fields(world, hostile=False), max_size=3)))
    if draw(st.integers(0, 4)) == 0:
        body["steering"] = draw(
            st.lists(
                interventions(world, hostile=False).map(json_format.MessageToDict),
                min_size=1,
                max_size=2,
            )
        )
    if "field" in hostile:
        name = draw(
            st.one_of(st.sampled_from(keys), st.text(max_size=12), st.sampled_from(SURROGATES))
        )
        body[name] = draw(vocabulary[name][1] if name in vocabulary else json_values())
    if "slider" in hostile:
        body.update(draw(st.lists(slider_fields(world, hostile=True), min_size=1, max_size=3)))
    if "steering" in hostile:
        body["steering"] = draw(
            choice(
                (4, st.lists(steering_entries(world), min_size=1, max_size=3)),
                (
                    1,
                    st.integers(60, 80).map(
                        lambda n: [{"named": {"name": "calm", "value": 1}}] * n
                    ),
                ),
                (1, json_values()),
            )
        )
    if "duplicate" in hostile and body:
        name = draw(st.sampled_from(sorted(map(str, body))))
        body[Raw(json.dumps(name))] = draw(json_values())
    return body


def _http_garbage(world: World, valid: SearchStrategy[bytes], max_bytes: int) -> Any:
    """Bodies that are no JSON object: random bytes, mutated or truncated valid bodies, other
    encodings, a BOM, trailing data, nothing, more than the body limit, JSON that is not an
    object or nests past any limit."""
    operations = st.sampled_from(("flip", "truncate", "insert", "duplicate"))
    return st.one_of(
        st.binary(max_size=200),
        st.builds(_mutate, valid, operations, st.integers(0, 2**16), st.integers(0, 255)),
        valid.map(lambda data: data.decode().encode("utf-16")),
        valid.map(lambda data: data.decode().encode("utf-32")),
        valid.map(lambda data: b"\xef\xbb\xbf" + data),
        valid.map(lambda data: data + b"\n" + data),
        valid.map(lambda data: data + b"}{"),
        valid.map(lambda data: data.replace(b'"', b"'")),
        st.sampled_from(
            (
                b"",
                b" ",
                b"{",
                b'{"prompt": "\xff\xfe", "max_tokens": 2}',
                b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}',
                b"{" * 100_000,
                b"[" * 100_000,
                b'{"a":' * 50_000,
            )
        ),
        st.just(b'{"prompt": "' + b"a" * (max_bytes + 16) + b'", "max_tokens": 1}'),
        json_values().map(lambda value: json_text(value).encode("utf-8", "surrogatepass")),
    )


@dataclass(frozen=True)
class HttpCase:
    """One HTTP request: ``body`` a JSON value (with :class:`Raw` parts), raw bytes or None."""

    method: str
    path: str
    body: Any = None
    content_type: str | None = "application/json"
    #: "json" (a JSON object to a generation route), "raw" (anything else to one), "route"
    #: (a method and route the server serves), "other" (a route or method it does not)
    kind: str = "route"
    #: "json" cases are sent with a normal stream: "together" with it or once it "join"ed
    timing: str = "together"

    @property
    def generation(self) -> bool:
        return self.kind == "json"

    @property
    def wire_path(self) -> str:
        return f"{self.method} {self.path} {self.content_type}"

    @property
    def label(self) -> str:
        if self.kind == "json":
            return f"POST {self.path}"
        if self.kind == "raw":
            return f"raw POST {self.path}"
        if self.kind == "other":
            return "other routes and methods"
        return f"{self.method} {self.path.split('?', 1)[0]}"

    @cached_property
    def data(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        return json_text(self.body).encode("utf-8", "surrogatepass")

    def payload(self) -> bytes:
        return self.data

    def describe(self, limit: int = 3000) -> str:
        text = self.data.decode("utf-8", "backslashreplace")
        text = re.sub(r'"((?:[^"\\]|\\.){120,})"', lambda m: f'"{_shorten(m.group(1), 120)}"', text)
        text = re.sub(r"(.)\1{199,}", lambda m: f"{m.group(1)}…[x{len(m.group(0))}]", text)
        header = f"{self.method} {_shorten(self.path, 200)}"
        if self.body is not None:
            header += f" [{self.content_type}] "
        return header + _shorten(text, limit)

    def __repr__(self) -> str:
        timing = f" timing={self.timing}" if self.generation else ""
        return f"HttpCase({self.kind}{timing}: {self.describe()})"


def describe_case(case: Case | HttpCase, limit: int = 3000) -> str:
    if isinstance(case, HttpCase):
        return case.describe(limit)
    return describe(case.request, limit)


def http_cases(
    world: World,
    routes: Mapping[str, Sequence[str]],
    max_bytes: int = 4 * 1024 * 1024,
    *,
    generation: Sequence[str] = HTTP_GENERATION,
    parts: Sequence[str] = ("json", "raw", "other"),
) -> SearchStrategy[HttpCase]:
    """Requests to the HTTP API (``routes``: path -> methods, as /openapi.json lists them):
    generation bodies to the ``generation`` routes ("json", most of them), bodies that are no
    JSON object ("raw") to them, and every route, method and path ("other")."""
    vocabulary = http_vocabulary(world)
    timings = st.sampled_from(("together", "join"))
    content_types = mostly(st.just("application/json"), st.sampled_from(CONTENT_TYPES), odds=12)

    def json_case(path: str) -> SearchStrategy[HttpCase]:
        chat = path == "/v1/chat/completions"
        return st.builds(
            lambda body, ctype, when: HttpCase("POST", path, body, ctype, "json", when),
            generation_bodies(world, vocabulary, chat),
            content_types,
            timings,
        )

    def raw_case(path: str) -> SearchStrategy[HttpCase]:
        chat = path == "/v1/chat/completions"
        valid = generation_bodies(world, vocabulary, chat).map(
            lambda body: json_text(body).encode("utf-8", "surrogatepass")
        )
        return st.builds(
            lambda body, ctype: HttpCase("POST", path, body, ctype, "raw"),
            _http_garbage(world, valid, max_bytes),
            mostly(st.just("application/json"), st.sampled_from((*CONTENT_TYPES, None))),
        )

    served = {(method, path) for path, methods in routes.items() for method in methods}
    gets = sorted(path for method, path in served if method == "GET")

    def route_case(method: str, path: str, body: Any = None) -> HttpCase:
        kind = "route" if (method, path.split("?", 1)[0]) in served else "other"
        return HttpCase(method, path, body, "application/json", kind)

    other = st.one_of(
        st.builds(route_case, st.just("GET"), st.sampled_from(gets)),
        st.builds(  # a query string or a body the route does not take
            lambda path, query, body: route_case("GET", path + query, body),
            st.sampled_from(gets),
            st.sampled_from(("?limit=-1", "?a=" + "%00" * 10, "?" + "x=1&" * 500, "")),
            st.one_of(st.none(), json_values()),
        ),
        # a method the route does not take (or does, without a body), a path no route serves
        st.builds(route_case, st.sampled_from(HTTP_METHODS), st.sampled_from(sorted(routes))),
        st.builds(
            route_case,
            st.sampled_from(HTTP_METHODS),
            st.sampled_from(HTTP_ODD_PATHS),
            st.one_of(st.none(), json_values()),
        ),
    )
    posts = [path for path in generation if path in routes]
    options = []
    if "json" in parts:
        options += [(8, json_case(path)) for path in posts]
    if "raw" in parts:
        options += [(1, raw_case(path)) for path in posts]
    if "other" in parts:
        options.append((2, other))
    return choice(*options)


def strict_json(data: bytes | str) -> Any:
    """JSON as RFC 8259 has it: NaN and Infinity are not JSON (a strict client refuses them)."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(data, parse_constant=refuse)


def openai_error_problems(value: Any) -> list[str]:
    """What is wrong with ``value`` as OpenAI's error body ``{"error": {"message", "type",
    "param", "code"}}`` (nothing: an empty list)."""
    if not isinstance(value, dict) or set(value) != {"error"}:
        return [f"shape: the error body is not {{'error': ...}}: {_shorten(repr(value), 300)}"]
    error = value["error"]
    if not isinstance(error, dict) or set(error) != ERROR_KEYS:
        keys = sorted(error) if isinstance(error, dict) else type(error).__name__
        return [f"shape: the error object has {keys}, not {sorted(ERROR_KEYS)}"]
    problems = []
    if not isinstance(error["message"], str) or not error["message"]:
        problems.append(f"shape: the error message is {error['message']!r}")
    if not isinstance(error["type"], str):
        problems.append(f"shape: the error type is {error['type']!r}")
    if error["param"] is not None and not isinstance(error["param"], str):
        problems.append(f"shape: the error param is {error['param']!r}")
    if error["code"] is not None and not isinstance(error["code"], (str, int)):
        problems.append(f"shape: the error code is {error['code']!r}")
    return problems


@dataclass
class _HttpAnswer:
    code: str
    message: str = ""
    param: str = ""
    problems: list[str] = field(default_factory=list)


def sse_problems(text: str) -> tuple[list[str], dict[str, Any] | None]:
    """What is wrong with an SSE body (``data: {json}`` events, then ``data: [DONE]``; an
    error is an ``{"error": ...}`` chunk right before it), and the error chunk if any."""
    problems: list[str] = []
    if not text.endswith("\n\n"):
        problems.append(f"stream: the stream ends mid-event: …{text[-200:]!r}")
    datas = []
    for block in (b for b in text.split("\n\n") if b.strip()):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines or not all(line.startswith("data: ") for line in lines):
            problems.append(f"stream: an event that is not data: {_shorten(block, 200)!r}")
            continue
        datas.append("\n".join(line[len("data: ") :] for line in lines))
    if not datas or datas[-1] != "[DONE]":
        last = datas[-1] if datas else ""
        problems.append(f"stream: the stream does not end with data: [DONE] (last: {last[:200]!r})")
    if datas.count("[DONE]") > 1:
        problems.append("stream: data: [DONE] more than once")
    error: dict[str, Any] | None = None
    chunks = [data for data in datas if data != "[DONE]"]
    for index, data in enumerate(chunks):
        try:
            chunk = strict_json(data)
        except ValueError as failure:
            problems.append(f"shape: a chunk is not JSON ({failure}): {_shorten(data, 200)}")
            continue
        if isinstance(chunk, dict) and "error" in chunk:
            problems += openai_error_problems(chunk)
            error = chunk["error"] if isinstance(chunk["error"], dict) else None
            if index != len(chunks) - 1:
                problems.append("stream: chunks after the error chunk")
        elif not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            problems.append(f"shape: a chunk without choices: {_shorten(data, 200)}")
    return problems, error


class HttpFuzzer:
    """Sends :class:`HttpCase` requests to the HTTP API of a :func:`fuzz_server` started with
    ``http_port=0`` and checks the properties after each: no 5xx; every error in OpenAI's shape
    (a streamed one as an error chunk followed by ``data: [DONE]``) with no traceback and no
    absolute server path; no dropped connection or hang; health (HTTP and gRPC) and the model
    still served; a normal greedy stream over HTTP sent with each generation body gets the text
    it gets alone."""

    def __init__(self, fuzzer: Fuzzer) -> None:
        if fuzzer.http_url is None:
            raise ValueError("the server does not serve HTTP: fuzz_server(..., http_port=0)")
        self.grpc, self.world, self.url = fuzzer, fuzzer.world, fuzzer.http_url
        self.client = httpx.Client(base_url=self.url, timeout=CALL_TIMEOUT)
        self.innocent_client = httpx.Client(base_url=self.url, timeout=CALL_TIMEOUT)
        #: path -> methods (from /openapi.json, and the unlisted OpenAPI pages)
        self.routes: dict[str, tuple[str, ...]] = {}
        self.reference: tuple[str, str] | None = None

    def close(self) -> None:
        self.client.close()
        self.innocent_client.close()

    def start(self) -> None:
        """Read the routes, and record the normal stream's text alone."""
        spec = self.client.get("/openapi.json").json()
        self.routes = {
            path: tuple(sorted(method.upper() for method in methods))
            for path, methods in spec["paths"].items()
        }
        for path in HTTP_UNLISTED:
            self.routes.setdefault(path, ("GET",))
        ended, text, finish = self.innocent()
        if ended != "ok" or not text:
            raise RuntimeError(f"the reference stream failed: {ended}")
        self.reference = (text, finish)

    def cases(self, max_bytes: int = 4 * 1024 * 1024, **kinds: Any) -> SearchStrategy[HttpCase]:
        """:func:`http_cases` for this server's routes (``kinds``: its keyword arguments)."""
        return http_cases(self.world, self.routes, max_bytes, **kinds)

    def innocent_body(self) -> dict[str, Any]:
        return {
            "model": self.world.model_id,
            "prompt": INNOCENT_PROMPT,
            "max_tokens": INNOCENT_TOKENS,
            "temperature": 0,
            "stream": True,
        }

    def innocent(self, on_first: threading.Event | None = None) -> tuple[str, str, str]:
        """(how the normal stream ended: "ok" or what went wrong, its text, finish reason)."""
        texts: list[str] = []
        finish = ""
        ended = "was cut before data: [DONE]"
        try:
            with self.innocent_client.stream(
                "POST", "/v1/completions", json=self.innocent_body()
            ) as response:
                if response.status_code != 200:
                    body = response.read()[:300]
                    return f"answered HTTP {response.status_code}: {body!r}", "", ""
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        ended = "ok"
                    elif line.startswith("data: "):
                        chunk = json.loads(line[len("data: ") :])
                        if "error" in chunk:
                            return f"got an error chunk: {chunk['error']}", "".join(texts), ""
                        for choice_ in chunk.get("choices", ()):
                            texts.append(choice_.get("text") or "")
                            finish = choice_.get("finish_reason") or finish
                        if on_first is not None:
                            on_first.set()
        except (httpx.HTTPError, ValueError) as error:
            return f"failed: {type(error).__name__}: {error}", "".join(texts), finish
        finally:
            if on_first is not None:
                on_first.set()
        return ended, "".join(texts), finish

    def run(self, case: HttpCase) -> Outcome:
        began = time.monotonic()
        self.grpc.capture.drain()
        if case.generation:
            answer, innocent = self._with_innocent(case)
        else:
            answer, innocent = self.send(case), ""
        outcome = Outcome(case.label, answer.code, answer.message, answer.param, innocent=innocent)
        outcome.violations += answer.problems
        if innocent and innocent != "ok":
            outcome.violations.append(f"innocent: the normal stream {innocent}")
        outcome.violations += [f"health: {problem}" for problem in self._check_health()]
        outcome.causes = self.grpc.capture.drain()
        outcome.seconds = time.monotonic() - began
        return outcome

    def _with_innocent(self, case: HttpCase) -> tuple[_HttpAnswer, str]:
        assert self.reference is not None, "call start() first"
        started = threading.Event()
        together = threading.Barrier(2)
        innocent: list[tuple[str, str, str]] = []

        def run_innocent() -> None:
            if case.timing == "together":
                together.wait(timeout=30)
            innocent.append(self.innocent(started))

        thread = threading.Thread(target=run_innocent, name="fuzz-http-innocent")
        thread.start()
        if case.timing == "together":
            together.wait(timeout=30)
        else:
            started.wait(timeout=30)
        answer = self.send(case)
        thread.join(timeout=CALL_TIMEOUT + 10)
        if not innocent:
            return answer, "did not finish"
        ended, text, finish = innocent[0]
        expected, expected_finish = self.reference
        if ended != "ok":
            return answer, ended
        if text != expected:
            return answer, f"text {text!r} != alone {expected!r}"
        if finish != expected_finish:
            return answer, f"finish reason {finish!r} != alone {expected_finish!r}"
        return answer, "ok"

    def send(self, case: HttpCase) -> _HttpAnswer:
        """Send ``case``, read the whole answer (a stream to its end) and check its form."""
        headers = {"content-type": case.content_type} if case.content_type is not None else {}
        status, body = 0, b""
        try:
            with self.client.stream(
                case.method, case.path, content=case.data or None, headers=headers
            ) as response:
                status, content_type = (
                    response.status_code,
                    response.headers.get("content-type", ""),
                )
                body = response.read()
        except httpx.TimeoutException:
            return _HttpAnswer(
                str(status or "no answer"),
                problems=[f"hang: no answer within {CALL_TIMEOUT:.0f} s"],
            )
        except httpx.HTTPError as error:
            return _HttpAnswer(
                str(status or "no answer"),
                problems=[f"stream: the connection broke: {type(error).__name__}: {error}"],
            )
        answer = _HttpAnswer(str(status))
        text = body.decode("utf-8", "replace")
        if status >= 500:
            answer.problems.append(f"internal: HTTP {status}: {_shorten(text, 300)}")
        if self.grpc._leaks(text, case):
            answer.problems.append(f"leak: the answer shows an absolute server path: {text[:300]}")
        if _TRACEBACK.search(text):
            answer.problems.append(f"leak: the answer shows a traceback: {_shorten(text, 300)}")
        if case.method == "HEAD":
            return answer
        if content_type.startswith("text/event-stream"):
            problems, chunk = sse_problems(text)
            answer.problems += problems
            if chunk is not None:
                answer.code = f"{status} error chunk"
                answer.message = str(chunk.get("message", ""))
                answer.param = str(chunk.get("param") or "")
            return answer
        try:
            value = strict_json(body) if content_type.startswith("application/json") else None
        except ValueError as failure:
            answer.problems.append(f"shape: the body is not JSON ({failure}): {text[:200]!r}")
            return answer
        if status >= 400:
            if value is None:
                answer.problems.append(f"shape: the error is {content_type!r}: {text[:200]!r}")
                return answer
            answer.problems += openai_error_problems(value)
            shown = value.get("error") if isinstance(value, dict) else None
            if isinstance(shown, dict):
                answer.message = str(shown.get("message", ""))
                answer.param = str(shown.get("param") or "")
        elif case.kind in ("json", "raw") and not (
            isinstance(value, dict) and isinstance(value.get("choices"), list)
        ):
            answer.problems.append(f"shape: a completion without choices: {text[:200]!r}")
        return answer

    def _check_health(self) -> list[str]:
        problems = []
        try:
            health = self.client.get("/health", timeout=10)
            if health.status_code != 200 or health.json() != {"status": "ok"}:
                problems.append(f"GET /health answered {health.status_code}: {health.text[:200]}")
            models = self.client.get("/v1/models", timeout=10)
            served = [model["id"] for model in models.json()["data"]]
            if models.status_code != 200 or self.world.model_id not in served:
                problems.append(f"GET /v1/models answered {models.status_code}: {served}")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            problems.append(f"the HTTP API does not answer: {type(error).__name__}: {error}")
        return problems + self.grpc._check_health()


def run_http_fuzz(
    fuzzer: HttpFuzzer,
    count: int,
    seed: int,
    *,
    strategy: SearchStrategy[HttpCase] | None = None,
    strict: bool = False,
    progress: Callable[[int, Any, Outcome], None] | None = None,
) -> FuzzResult:
    """:func:`run_fuzz` over the HTTP API (``strategy``: default every route)."""
    cases = strategy if strategy is not None else fuzzer.cases()
    return run_cases(fuzzer.run, cases, count, seed, strict=strict, progress=progress)


def status_table(result: FuzzResult) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (one per rpc) and columns (rpc, then every status code seen) of a counts table."""
    table = result.by_rpc()
    codes = sorted(
        {code for counts in table.values() for code in counts}, key=lambda c: (c != "OK", c)
    )
    rows = []
    for label in sorted(table, key=lambda name: (name.startswith("raw"), name)):
        counts = table[label]
        rows.append({"rpc": label, **{code: counts.get(code, "") for code in codes}})
    total = result.statuses
    rows.append({"rpc": "**all**", **{code: total.get(code, "") for code in codes}})
    return rows, ["rpc", *codes]


__all__ = [
    "RPCS",
    "Case",
    "Fixture",
    "FuzzResult",
    "Fuzzer",
    "HttpCase",
    "HttpFuzzer",
    "Outcome",
    "Rpc",
    "World",
    "all_cases",
    "describe",
    "describe_case",
    "failure_key",
    "fuzz_server",
    "garbage_cases",
    "http_cases",
    "message_cases",
    "message_strategy",
    "prepare_root",
    "rpcs_of",
    "run_cases",
    "run_fuzz",
    "run_http_fuzz",
    "server_rpcs",
    "status_table",
]
