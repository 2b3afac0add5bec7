"""The gRPC service on loopback with real clients, over tiny random models (fast, exact)."""

from __future__ import annotations

import itertools
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from tiny import tiny_handle

from steer.artifacts import save_vector
from steer.client import (
    FailedPrecondition,
    NotFound,
    SteerClient,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    ablate,
    add,
)
from steer.errors import InvalidArgumentError
from steer.generation import Engine, GenerationEvent, GenerationRequest
from steer.interventions import Ablate, Add, RowFunction
from steer.interventions import Intervention as EngineIntervention
from steer.models import ModelHandle
from steer.sampling import SamplingConfig
from steer.server import ServerSettings, SteerServer
from steer.server.status import status_of
from steer.service.jobs import JobState
from steer.service.scheduler import ModelWorker
from steer.vectors import SteeringVector

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = [
    "The quick brown fox",
    "Write a short poem about the sea",
    "How do I bake bread",
    "The knight drew her sword",
    "Sure! Here is a story",
    "I'm sorry, but",
]
#: greedy on the tiny llama, this prompt never reaches EOS within 400 tokens (checked in the test)
LONG_PROMPT = "The dragon laughed"


def make_settings(root: Path, **overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "port": 0,
        "models_root": root,
        "max_batch": 32,
        "max_new_tokens_cap": 400,
        "max_prompt_tokens": 256,
        "max_message_bytes": 2 * 1024 * 1024,
        "shutdown_grace": 2.0,
    }
    values.update(overrides)
    return ServerSettings(**values)  # type: ignore[arg-type]


def direction_artifact(root: Path, handle: ModelHandle, name: str, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    vector = SteeringVector(
        per_layer={layer: torch.randn(handle.d_model, generator=generator) for layer in range(4)}
    )
    return save_vector(root / "artifacts" / name, vector, handle=handle, kind="direction")


@pytest.fixture(scope="module")
def served(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("models")
    direction_artifact(root, tiny_llama, "refusal")
    with SteerServer(make_settings(root), models={"tiny": tiny_llama}) as server:
        yield server


@pytest.fixture
def client(served: SteerServer) -> Iterator[SteerClient]:
    with SteerClient(served.target, timeout=60) as connected:
        yield connected


def alone(handle: ModelHandle, request: GenerationRequest) -> tuple[int, ...]:
    """Token ids the in-process engine gives for ``request`` with nothing else in the batch."""
    return Engine(handle).run([request])[0].token_ids


def random_vector(seed: int, size: int = 64) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


# -- streaming, seeds, stop strings, compare ----------------------------------------------------


def test_stream_matches_in_process_engine(client: SteerClient, tiny_llama: ModelHandle) -> None:
    events = list(client.generate(PROMPTS[0], temperature=0, max_new_tokens=12))
    assert len(events) == 12  # one message per token
    assert all(e.finish_reason is None for e in events[:-1])
    final = events[-1]
    assert final.finish_reason == "length" and final.completion_tokens == 12
    tokens = tuple(t for e in events for t in e.token_ids)
    expected = alone(
        tiny_llama, GenerationRequest(prompt=PROMPTS[0], sampling=GREEDY, max_new_tokens=12)
    )
    assert tokens == expected
    assert "".join(e.text for e in events) == tiny_llama.tokenizer.decode(
        list(tokens), skip_special_tokens=True
    )


def test_seed_reproduces_sampling(client: SteerClient) -> None:
    first = client.complete(PROMPTS[1], temperature=1.0, seed=7, max_new_tokens=16)[None]
    again = client.complete(PROMPTS[1], temperature=1.0, seed=7, max_new_tokens=16)[None]
    other = client.complete(PROMPTS[1], temperature=1.0, seed=8, max_new_tokens=16)[None]
    assert first.seed == 7 and first.token_ids == again.token_ids
    assert other.token_ids != first.token_ids
    unseeded = client.complete(PROMPTS[1], temperature=1.0, max_new_tokens=16)[None]
    assert unseeded.seed is not None
    replay = client.complete(PROMPTS[1], temperature=1.0, seed=unseeded.seed, max_new_tokens=16)
    assert replay[None].token_ids == unseeded.token_ids


def test_stop_string_ends_before_it(client: SteerClient) -> None:
    full = client.complete(PROMPTS[2], temperature=0, max_new_tokens=30)[None]
    assert len(full.text) > 8
    stop = full.text[5:8]
    cut = full.text.find(stop)
    stopped = client.complete(PROMPTS[2], temperature=0, max_new_tokens=30, stop=[stop])[None]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]


def test_top_logprobs(client: SteerClient, tiny_llama: ModelHandle) -> None:
    events = list(client.generate(PROMPTS[0], temperature=0, max_new_tokens=3, top_logprobs=5))
    for event in events:
        (candidates,) = event.top_logprobs
        assert len(candidates) == 5
        assert candidates[0][0] == event.token_ids[0]  # greedy picks the most likely
        assert all(a[1] >= b[1] for a, b in itertools.pairwise(candidates))


def test_compare_streams_default_and_steered_with_one_seed(
    client: SteerClient, tiny_llama: ModelHandle
) -> None:
    vector = random_vector(1)
    steer = add(vector.tolist(), 6.0, hooks=["blocks.1.hook_resid_post"])
    sides = client.complete(
        PROMPTS[3], compare=True, interventions=[steer], temperature=0.8, seed=11, max_new_tokens=10
    )
    assert set(sides) == {"default", "steered"}
    assert sides["default"].seed == sides["steered"].seed == 11
    sampling = SamplingConfig(temperature=0.8, seed=11)
    plain = alone(
        tiny_llama, GenerationRequest(prompt=PROMPTS[3], sampling=sampling, max_new_tokens=10)
    )
    steered = alone(
        tiny_llama,
        GenerationRequest(
            prompt=PROMPTS[3],
            sampling=sampling,
            max_new_tokens=10,
            interventions=(
                Add(SteeringVector.from_shared(vector), 6.0, hooks=("blocks.1.hook_resid_post",)),
            ),
        ),
    )
    assert tuple(sides["default"].token_ids) == plain
    assert tuple(sides["steered"].token_ids) == steered
    assert plain != steered
    unseeded = client.complete(PROMPTS[3], compare=True, interventions=[steer], max_new_tokens=4)
    assert unseeded["default"].seed == unseeded["steered"].seed is not None


def test_zero_strength_is_no_steering(client: SteerClient) -> None:
    plain = client.complete(PROMPTS[4], temperature=0, max_new_tokens=10)[None]
    zero = client.complete(
        PROMPTS[4],
        temperature=0,
        max_new_tokens=10,
        interventions=[add(random_vector(2).tolist(), 0.0, hooks=["blocks.2.hook_resid_pre"])],
    )[None]
    assert zero.token_ids == plain.token_ids


def test_ablation_by_artifact_id_matches_in_process(
    client: SteerClient, served: SteerServer, tiny_llama: ModelHandle
) -> None:
    from steer.artifacts import load_vector

    direction = load_vector(served.settings.artifacts_dir / "refusal").vector
    remote = client.complete(
        PROMPTS[5], temperature=0, max_new_tokens=10, interventions=[ablate("refusal")]
    )[None]
    local = alone(
        tiny_llama,
        GenerationRequest(
            prompt=PROMPTS[5],
            sampling=GREEDY,
            max_new_tokens=10,
            interventions=(Ablate(direction),),
        ),
    )
    assert tuple(remote.token_ids) == local


def test_chat_messages_use_the_chat_template(client: SteerClient, tiny_llama: ModelHandle) -> None:
    messages = [{"role": "user", "content": "Tell me about the moon"}]
    completion = client.complete(messages=messages, temperature=0, max_new_tokens=6)[None]
    text = tiny_llama.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert completion.prompt_tokens == len(
        tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    )


# -- isolation -----------------------------------------------------------------------------------


def _isolation_case(index: int) -> tuple[str, list, tuple[EngineIntervention, ...]]:
    """Request ``index``: a prompt and an intervention list, as proto and as engine objects."""
    prompt = PROMPTS[index % len(PROMPTS)]
    hook = f"blocks.{index % 4}.hook_resid_post"
    vector = random_vector(100 + index)
    strength = 0.5 + 0.25 * index
    if index % 4 == 3:
        return prompt, [], ()
    remote = [add(vector.tolist(), strength, hooks=[hook])]
    local: tuple[EngineIntervention, ...] = (
        Add(SteeringVector.from_shared(vector), strength, hooks=(hook,)),
    )
    return prompt, remote, local


def test_32_concurrent_streams_equal_each_alone(
    served: SteerServer, tiny_llama: ModelHandle
) -> None:
    count, results = 32, {}
    barrier = threading.Barrier(count)
    failures: list[BaseException] = []
    before = served.registry.get("tiny").worker.stats.requests_total

    def run(index: int) -> None:
        try:
            prompt, remote, _ = _isolation_case(index)
            with SteerClient(served.target, timeout=120) as own:
                barrier.wait()
                results[index] = tuple(
                    own.complete(prompt, temperature=0, max_new_tokens=12, interventions=remote)[
                        None
                    ].token_ids
                )
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert served.registry.get("tiny").worker.stats.requests_total - before == count
    distinct = set()
    for index in range(count):
        prompt, _, local = _isolation_case(index)
        expected = alone(
            tiny_llama,
            GenerationRequest(
                prompt=prompt, sampling=GREEDY, max_new_tokens=12, interventions=local
            ),
        )
        assert results[index] == expected, f"request {index} differs from running alone"
        distinct.add(expected)
    assert len(distinct) > 8  # the interventions really differ


def test_requests_announced_together_share_the_first_prefill(
    tiny_llama: ModelHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A window far longer than the test: the engine waits for the announcement, not a clock.
    worker = ModelWorker(tiny_llama, admission_window=30.0)
    steps: list[set[str]] = []
    dispatch = worker._dispatch

    def record(events: Sequence[GenerationEvent]) -> None:
        steps.append({event.request_id for event in events})
        dispatch(events)

    monkeypatch.setattr(worker, "_dispatch", record)
    request = GenerationRequest(prompt=PROMPTS[0], sampling=GREEDY, max_new_tokens=3)
    try:
        with worker.arrival():
            with worker.arrival():
                first = worker.submit([request])
            time.sleep(0.2)  # an engine that did not wait would step on `first` alone here
            second = worker.submit([replace(request, prompt=PROMPTS[1])])
        tokens = [event.token_ids for _, event in itertools.chain(first, second)]
        # a request whose preparation fails must not hold back the next one
        with pytest.raises(InvalidArgumentError), worker.arrival():
            worker.submit([replace(request, prompt="")])
        third = worker.submit([request])
        final = third.queue.get(timeout=10)  # not 30 s: the failed arrival was withdrawn
        while isinstance(final, GenerationEvent) and final.finish_reason is None:
            final = third.queue.get(timeout=10)
    except queue.Empty:
        pytest.fail("the engine kept waiting for a request whose preparation failed")
    finally:
        worker.close(0)
    (a,), (b,) = first.request_ids, second.request_ids
    assert steps[0] == {a, b}, "the two requests were prefilled apart"
    assert len(tokens) == 6 and all(len(ids) == 1 for ids in tokens)
    assert isinstance(final, GenerationEvent) and final.finish_reason == "length"


# -- cancellation, failures -------------------------------------------------------------------


def _wait_for(condition, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_cancel_frees_the_row(
    client: SteerClient, served: SteerServer, tiny_llama: ModelHandle
) -> None:
    # This prompt runs to the length limit greedily (no EOS), so only the cancel can end it early.
    request = GenerationRequest(prompt=LONG_PROMPT, sampling=GREEDY, max_new_tokens=400)
    assert len(alone(tiny_llama, request)) == 400
    before = client.model_info("tiny").stats
    stream = client.generate(LONG_PROMPT, temperature=0, max_new_tokens=400)
    next(stream)
    next(stream)
    assert client.model_info("tiny").stats.running >= 1
    stream.close()  # cancels the call
    assert _wait_for(
        lambda: client.model_info("tiny").stats.cancelled_total > before.cancelled_total
    )
    after = client.model_info("tiny").stats
    assert after.running == 0 and after.waiting == 0
    assert after.tokens_total - before.tokens_total < 400


class _OutOfMemory(EngineIntervention):
    """Raises the CUDA/CPU out-of-memory error when its hook runs."""

    def lower(self, resolver, d_model):  # type: ignore[no-untyped-def]
        def explode(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("simulated")

        return [(resolver.parse("blocks.0.hook_resid_pre"), RowFunction(explode))]


def test_out_of_memory_in_one_request_keeps_the_loop_serving(
    client: SteerClient, served: SteerServer
) -> None:
    worker = served.registry.get("tiny").worker
    subscription = worker.submit(
        [GenerationRequest(prompt=PROMPTS[0], interventions=(_OutOfMemory(),), max_new_tokens=4)]
    )
    with pytest.raises(torch.OutOfMemoryError) as raised:
        list(subscription)
    assert status_of(raised.value)[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert worker.stats.failed_total >= 1
    after = client.complete(PROMPTS[0], temperature=0, max_new_tokens=5)[None]
    assert after.completion_tokens == 5


# -- models, artifacts, jobs ------------------------------------------------------------------


def test_models_load_info_unload(client: SteerClient, served: SteerServer) -> None:
    handle = tiny_handle("qwen2", seed=3)
    directory = served.settings.models_root / "tiny-qwen2"
    handle.model.save_pretrained(directory)
    handle.tokenizer.save_pretrained(directory)
    info = client.load_model("tiny-qwen2", "qwen")
    assert (info.architecture, info.num_layers, info.d_model) == ("qwen2", 4, 64)
    assert "blocks.3.hook_resid_post" in info.hook_names and info.chat_template
    assert {m.model_id for m in client.models().models} == {"tiny", "qwen"}
    assert client.models().default_model == "tiny"
    text = client.complete("The quick", model="qwen", temperature=0, max_new_tokens=4)[None]
    assert text.completion_tokens == 4
    client.unload_model("qwen")
    with pytest.raises(NotFound) as missing:
        client.complete("The quick", model="qwen", max_new_tokens=2)
    assert missing.value.field == "model"


def test_paths_are_confined_to_the_models_root(
    client: SteerClient, served: SteerServer, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = served.settings.models_root / "escape"
    link.symlink_to(outside, target_is_directory=True)
    for source in ("../elsewhere", "/etc", "escape", "escape/x"):
        with pytest.raises(InvalidArgumentError) as refused:
            client.load_model(source, "x")
        assert refused.value.field == "source"
        assert "models root" in str(refused.value)


def test_artifact_upload_list_download_roundtrip(
    client: SteerClient, tiny_llama: ModelHandle, tmp_path: Path
) -> None:
    local = direction_artifact(tmp_path, tiny_llama, "calm", seed=5)
    info = client.upload_artifact(local, "calm")
    assert info.d_model == 64 and list(info.layers) == [0, 1, 2, 3]
    assert "calm" in {a.artifact_id for a in client.artifacts()}
    fetched = client.download_artifact("calm", tmp_path / "fetched")
    assert (fetched / "vectors.safetensors").read_bytes() == (
        local / "vectors.safetensors"
    ).read_bytes()
    with pytest.raises(Exception) as exists:
        client.upload_artifact(local, "calm")
    assert exists.value.code is grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    assert client.upload_artifact(local, "calm", overwrite=True).artifact_id == "calm"


def test_artifact_for_other_weights_is_refused_unless_allowed(
    client: SteerClient, served: SteerServer
) -> None:
    other = tiny_handle("llama", seed=9)
    direction_artifact(served.settings.models_root, other, "foreign")
    with pytest.raises(FailedPrecondition) as refused:
        client.complete("Hi", max_new_tokens=2, interventions=[ablate("foreign")])
    assert refused.value.field == "interventions[0].ablate.artifact_id"
    allowed = client.complete(
        "Hi",
        temperature=0,
        max_new_tokens=2,
        interventions=[ablate("foreign", allow_other_model=True)],
    )
    assert allowed[None].completion_tokens == 2


def test_jobs_progress_and_cancel_over_grpc(client: SteerClient, served: SteerServer) -> None:
    def work(progress, cancelled):  # type: ignore[no-untyped-def]
        for step in range(4):
            progress(f"step {step}", step / 4)
            time.sleep(0.02)
        return "out", '{"ok": true}'

    started = served.jobs.start("test", work)
    states = list(client.watch_job(started.job_id))
    assert states[-1].result == "out" and states[-1].progress == 1.0
    assert len({s.stage for s in states}) >= 2
    assert client.job(started.job_id).state == 3  # JOB_STATE_SUCCEEDED

    release = threading.Event()

    def waits(progress, cancelled):  # type: ignore[no-untyped-def]
        progress("waiting", 0.1)
        while not cancelled.wait(0.01):
            pass
        raise RuntimeError("stopped")

    job = served.jobs.start("test", waits)
    assert _wait_for(lambda: served.jobs.get(job.job_id).state is JobState.RUNNING)
    client.cancel_job(job.job_id)
    assert _wait_for(lambda: served.jobs.get(job.job_id).state is JobState.CANCELLED)
    release.set()


def test_model_work_off_the_engine_runs_in_threads_that_end(
    served: SteerServer, tiny_llama: ModelHandle
) -> None:
    """Loading, the weight hash and jobs run in threads that end with them (libgomp keeps a
    thread pool per thread that ran torch, which slowed the engine's steps; see
    in_short_thread), never on the caller's thread."""
    from steer.service.scheduler import in_short_thread

    caller = threading.get_ident()
    ran_on: list[threading.Thread] = []

    def work() -> int:
        ran_on.append(threading.current_thread())
        return threading.get_ident()

    assert in_short_thread(work) != caller
    assert not ran_on[0].is_alive()
    with pytest.raises(ZeroDivisionError):
        in_short_thread(lambda: 1 / 0)
    # the registry hashes the weights when a model is added: Info reads the cached value
    from steer.service.registry import ModelRegistry

    registry = ModelRegistry(served.settings)
    fresh = ModelHandle(tiny_llama.model, tiny_llama.tokenizer, "fresh", tiny_llama.resolver)
    assert "weight_hash" not in vars(fresh)
    registry.add("fresh", fresh)
    registry.close(0)
    assert vars(fresh)["weight_hash"] == tiny_llama.weight_hash

    def job(progress, cancelled):  # type: ignore[no-untyped-def]
        ran_on.append(threading.current_thread())
        return "", "{}"

    started = served.jobs.start("test", job)
    assert _wait_for(lambda: served.jobs.get(started.job_id).state is JobState.SUCCEEDED)
    assert ran_on[-1].name == "steer-model-work"
    assert _wait_for(lambda: not ran_on[-1].is_alive())


def test_compute_and_bake_answer_unimplemented_without_their_library(client: SteerClient) -> None:
    import importlib.util

    for module, call in (
        ("steer.directions.api", lambda: client.compute_direction("x = 1\n", "new")),
        ("steer.bake.api", lambda: client.bake("smollm2-135m-instruct", "x = 1\n", "baked")),
    ):
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            present = False
        if present:
            continue  # the library landed; its own tests cover it
        with pytest.raises(Unimplemented) as missing:
            call()
        assert module in str(missing.value)


# -- auth, health, reflection, shutdown -------------------------------------------------------


def test_token_auth(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, token="s3cret")
    with SteerServer(settings, models={"tiny": tiny_llama}) as server:
        for token in (None, "wrong"):
            with SteerClient(server.target, token=token) as anonymous:
                assert anonymous.health() == "SERVING"  # health needs no token
                with pytest.raises(Unauthenticated):
                    anonymous.models()
                with pytest.raises(Unauthenticated):
                    anonymous.complete("Hi", max_new_tokens=2)
        with SteerClient(server.target, token="s3cret") as member:
            assert (
                member.complete("Hi", temperature=0, max_new_tokens=2)[None].completion_tokens == 2
            )


def test_reflection_lists_the_services(client: SteerClient) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert {
        "steer.v1.Generation",
        "steer.v1.Models",
        "steer.v1.Directions",
        "steer.v1.Bake",
        "steer.v1.Jobs",
        "grpc.health.v1.Health",
    } <= names


@pytest.mark.parametrize("grace", [30.0, 0.0])
def test_graceful_shutdown(grace: float, tiny_llama: ModelHandle, tmp_path: Path) -> None:
    """With time to spare an open stream finishes; with none it ends cancelled. Either way the
    health check says NOT_SERVING and new streams are refused while the server drains."""
    server = SteerServer(make_settings(tmp_path, shutdown_grace=grace), models={"tiny": tiny_llama})
    server.start()
    client = SteerClient(server.target, timeout=30)
    assert client.health() == "SERVING"
    stream = client.generate(LONG_PROMPT, temperature=0, max_new_tokens=400)
    next(stream)
    server.draining.set()  # what stop() does first; checked here before the port closes
    with pytest.raises(Unavailable):
        client.complete("Hi", max_new_tokens=2)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    if grace:
        assert _wait_for(lambda: client.health() == "NOT_SERVING", timeout=5)
    rest = list(stream)
    if grace:
        assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 400
    else:
        assert rest[-1].finish_reason == "cancelled"
    stopper.join(timeout=60)
    assert not stopper.is_alive()
    client.close()


def test_committed_stubs_are_current() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dependency_floors_cover_the_stubs_version_stamps() -> None:
    """A stub refuses a grpcio or protobuf older than the generator that wrote it (its stamp),
    and ``gen_protos.py --check`` ignores the stamps; so pyproject.toml's floors must be at least
    the committed stamps, or an install the floors allow fails at import."""
    import re
    import tomllib

    from packaging.version import Version

    floors = {}
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        if found := re.match(r"(grpcio|protobuf)>=([\d.]+)", spec):
            floors[found[1]] = Version(found[2])
    stubs = ROOT / "steer" / "proto" / "v1"
    stamps = {
        "grpcio": (r"^GRPC_GENERATED_VERSION = '([\d.]+)'", "*_grpc.py"),
        "protobuf": (r"^# Protobuf Python Version: ([\d.]+)$", "*_pb2.py"),
    }
    for package, (pattern, files) in stamps.items():
        found = [
            Version(v)
            for path in stubs.glob(files)
            for v in re.findall(pattern, path.read_text(), re.M)
        ]
        assert found, f"no {package} stamp in {files}"
        assert floors[package] >= max(found), (package, floors[package], max(found))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    settings = make_settings(tmp_path, tls_cert=cert, tls_key=key)
    with SteerServer(settings, models={"tiny": tiny_llama}) as server:
        with SteerClient(f"localhost:{server.port}", root_certificates=cert.read_bytes()) as secure:
            assert (
                secure.complete("Hi", temperature=0, max_new_tokens=2)[None].completion_tokens == 2
            )
        with SteerClient(server.target, timeout=5) as plaintext, pytest.raises(Unavailable):
            plaintext.models()


def test_full_queue_is_resource_exhausted(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    from steer.client import ResourceExhausted

    settings = make_settings(tmp_path, max_batch=1, max_waiting=1)
    with SteerServer(settings, models={"tiny": tiny_llama}) as server:
        worker = server.registry.get("tiny").worker
        with SteerClient(server.target, timeout=30) as client:
            running = client.generate(LONG_PROMPT, temperature=0, max_new_tokens=400)
            next(running)  # admitted: the batch of one is full
            # greedy: a sampled reply may draw EOS in its two tokens and end "stop" instead
            waiting = worker.submit(
                [GenerationRequest(prompt="Hi", sampling=GREEDY, max_new_tokens=2)]
            )
            assert worker.waiting == 1
            with pytest.raises(ResourceExhausted) as full:
                client.complete("Hi", max_new_tokens=2)
            assert full.value.field == "queue"
            running.close()
            assert [event.finish_reason for _, event in waiting][-1] == "length"
