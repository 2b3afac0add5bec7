"""Property-based fuzzing of every rpc on an in-process server over the tiny llama (issue #14).

A fixed seed and a bounded count per group of services (about 430 requests in all, run in CI);
``python scripts/fuzz_service.py --count 1000`` runs the long version. Each request starts from
the same models root, models and SAEs (tests/fuzzing.py) and must keep five properties: no
INTERNAL or UNKNOWN status (jobs included); the server stays healthy; a normal greedy stream
sent with a Generate request or a feature read gets exactly its tokens alone; nothing outside
the request's own output is removed, replaced or added under the models root (or beyond a link
out of it); errors show no absolute server path. A failure names the request hypothesis shrank
it to, the status, the server's logged exception and the broken property; every distinct
failure of a group is reported.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzzing import RPCS, Fuzzer, fuzz_server, rpcs_of, run_fuzz

from steer.models import ModelHandle

SEED = 14
#: requests per group: with the garbage, about 430 in all, a minute or two on 2 cores
GROUPS = {
    "Generation": (rpcs_of("Generation"), 100),
    "Models": (rpcs_of("Models", "Health"), 40),
    "Features": (rpcs_of("Features"), 50),
    "Directions": (rpcs_of("Directions"), 60),
    "Bake": (rpcs_of("Bake"), 60),
    "Jobs": (rpcs_of("Jobs"), 25),
}
GARBAGE = 100


@pytest.fixture(scope="module")
def fuzzer(tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzer]:
    with fuzz_server(tiny_llama, tmp_path_factory.mktemp("fuzz") / "models") as running:
        yield running


def test_every_rpc_is_fuzzed() -> None:
    """The groups cover every rpc the server registers (a new rpc joins one by itself)."""
    grouped = {rpc.path for rpcs, _ in GROUPS.values() for rpc in rpcs}
    assert grouped == {rpc.path for rpc in RPCS}
    assert len(RPCS) >= 24  # the steer rpcs and the health check


@pytest.mark.parametrize("group", list(GROUPS))
def test_fuzzed_requests_keep_the_properties(fuzzer: Fuzzer, group: str) -> None:
    rpcs, count = GROUPS[group]
    result = run_fuzz(fuzzer, count, SEED, rpcs=rpcs, garbage=0.0, strict=True)
    assert {o.label for o in result.outcomes} == {rpc.name for rpc in rpcs}
    if group == "Generation":
        # the requests must reach the engine, not only its validation, and run beside the
        # normal stream
        assert result.statuses["OK"] >= count // 5, result.statuses
        assert result.innocent_streams == len(result.outcomes)
    if group == "Bake":
        assert result.jobs["SUCCEEDED"] >= 3, result.jobs


def test_wire_garbage_keeps_the_properties(fuzzer: Fuzzer) -> None:
    """Raw bytes for every rpc (and unknown methods): random, mutated requests, invalid UTF-8,
    deep nesting, overlong varints, over the message limit."""
    result = run_fuzz(fuzzer, GARBAGE, SEED, garbage=1.0, strict=True)
    assert {"INVALID_ARGUMENT", "UNIMPLEMENTED"} <= set(result.statuses), result.statuses
