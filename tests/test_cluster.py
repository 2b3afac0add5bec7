"""steer on Ray Serve: the deployment file, and two replicas of SmolLM2 behind one endpoint.

The config tests run everywhere; the Ray tests need the [ray] extra and run in a pytest process
of their own (scripts/test.sh): a local Ray with 2 CPUs, two replicas holding one model each,
HTTP and gRPC requests with their own steering equal to the single-process engine (on a replica
running vLLM too), routing by model id, a direction job run as a Ray task equal to the same
compute in process, a replica killed mid-stream, and a shutdown that leaves no Ray process behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from steer.client import FailedPrecondition, NotFound, SteerClient, Unavailable, add
from steer.cluster import ClusterConfig
from steer.errors import InvalidArgumentError
from steer.generation import Engine, GenerationRequest, Message
from steer.interventions import Add
from steer.models import ModelHandle
from steer.sampling import SamplingConfig
from steer.vectors import SteeringVector

HOOK = "blocks.12.hook_resid_post"
MODELS = {"a": {"source": "smollm2-135m-instruct"}, "b": {"source": "smollm2-135m-instruct"}}


def _config(port: int = 8000, grpc_port: int = 50051, **replicas: object) -> ClusterConfig:
    return ClusterConfig.from_dict(
        {
            "cluster": {"port": port, "grpc_port": grpc_port, "num_cpus": 2},
            "replicas": {"num_replicas": 2, "num_cpus": 1, "max_models_per_replica": 1, **replicas},
            "server": {"models_root": "models", "max_batch": 8},
            "models": MODELS,
        }
    )


# -- the deployment file (no Ray needed) -----------------------------------------------------------


def test_a_config_round_trips_and_maps_to_ray_serve_options(tmp_path: Path) -> None:
    config = ClusterConfig.from_dict(
        {
            **_config().to_dict(),
            "saes": {"res": {"model": "a", "path": "saes/res"}},
            "jobs": {"num_cpus": 2, "num_gpus": 1},
        }
    )
    assert ClusterConfig.from_dict(config.to_dict()) == config
    assert config.saes["res"].model == "a" and config.jobs.num_gpus == 1
    options = config.replicas.deployment_options()
    assert options["num_replicas"] == 2 and options["ray_actor_options"]["num_cpus"] == 1
    scaled = _config(min_replicas=1, max_replicas=8)
    autoscaling = scaled.replicas.deployment_options()["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 8)
    assert config.server_settings().max_batch == 8 and config.default_model == "a"
    path = tmp_path / "deploy.toml"
    path.write_text(
        '[replicas]\nnum_replicas = 3\n[server]\nbackend = "vllm"\n'
        '[models.m]\nsource = "smollm2-135m-instruct"\n'
    )
    loaded = ClusterConfig.load(path)
    assert loaded.replicas.num_replicas == 3 and loaded.server_settings().backend == "vllm"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"extra": {}}, "extra"),
        ({"models": {}}, "models"),
        ({"models": {"m": {"dtype": "float32"}}}, "models.m"),
        ({"models": {"m": {"source": 3}}}, "models.m.source"),
        ({"replicas": {"num_replicas": 0}}, "replicas.num_replicas"),
        ({"replicas": {"num_replicas": "two"}}, "replicas.num_replicas"),
        ({"replicas": {"num_gpus": -1}}, "replicas.num_gpus"),
        ({"replicas": {"colour": 1}}, "replicas.colour"),
        ({"server": {"max_batch": 0}}, "max_batch"),
        ({"server": {"port": 1}}, "server.port"),
        ({"server": {"backend": "tgi"}}, "backend"),
        ({"cluster": {"port": 0}}, "cluster.port"),
        ({"cluster": {"port": 9000, "grpc_port": 9000}}, "cluster.grpc_port"),
        ({"saes": {"s": {"model": "nope", "path": "saes/s"}}}, "saes.s.model"),
        ({"saes": {"s": {"model": "m"}}}, "saes.s"),
        ({"jobs": {"num_cpus": -1}}, "jobs.num_cpus"),
        ({"jobs": {"max_running": 0}}, "jobs.max_running"),
    ],
)
def test_a_bad_config_is_refused_by_field(change: dict, field: str) -> None:
    data = {"models": {"m": {"source": "smollm2-135m-instruct"}}, **change}
    with pytest.raises(InvalidArgumentError) as refused:
        ClusterConfig.from_dict(data)
    assert refused.value.field == field


# -- on Ray Serve ---------------------------------------------------------------------------------


def _short_temp_dir() -> str:
    """Ray's socket paths must fit in 107 bytes: pytest's temp paths are too long."""
    return tempfile.mkdtemp(prefix="steer-ray-", dir="/tmp")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    pytest.importorskip("ray")
    from steer.cli.deploy import start, stop

    temp = _short_temp_dir()
    root = tmp_path_factory.mktemp("models")
    _random_sae().save_model(str(root / "saes" / "res"))
    config = ClusterConfig.from_dict(
        {
            **_config().to_dict(),
            "saes": {"res": {"model": "a", "path": "saes/res"}},
            # a third logical CPU: the replicas hold two, a job's Ray task takes its own
            "cluster": {
                "port": _free_port(),
                "grpc_port": _free_port(),
                "metrics_port": _free_port(),
                "num_cpus": 3,
            },
            "server": {"models_root": str(root), "max_batch": 8},
            "jobs": {"num_cpus": 1},
        }
    )
    start(config, temp_dir=temp)
    try:
        yield config
    finally:
        stop()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def endpoint(cluster: ClusterConfig) -> str:
    return f"http://{cluster.host}:{cluster.port}/v1"


@pytest.fixture(scope="module")
def client(cluster: ClusterConfig) -> Iterator[SteerClient]:
    with SteerClient(f"{cluster.host}:{cluster.grpc_port}", timeout=600) as connected:
        yield connected


SAE_HOOK = "blocks.6.hook_resid_post"


def _random_sae() -> Any:
    """A SAELens standard SAE for SmolLM2's residual stream, random weights."""
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=576, d_sae=32))
    sae.cfg.metadata.hook_name = SAE_HOOK
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.05 if parameter.ndim == 1 else 0.3)
    return sae


def _vector(seed: int) -> torch.Tensor:
    return torch.randn(576, generator=torch.Generator().manual_seed(seed))


def _body(model: str, index: int, **extra: object) -> dict[str, object]:
    steering = [
        {"add": {"inline": {"shared": _vector(index).tolist()}, "strength": 4.0, "hooks": [HOOK]}}
    ]
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Describe a harbour at dawn ({index})."}],
        "max_tokens": 10,
        "temperature": 0,
        "steering": steering if index else [],
        **extra,
    }


def _expected(handle: ModelHandle, index: int) -> str:
    interventions = (
        (Add(SteeringVector.from_shared(_vector(index)), 4.0, hooks=(HOOK,)),) if index else ()
    )
    request = GenerationRequest(
        messages=(Message("user", f"Describe a harbour at dawn ({index})."),),
        sampling=SamplingConfig.greedy_config(),
        max_new_tokens=10,
        interventions=interventions,
    )
    return Engine(handle).run([request])[0].text


@pytest.mark.ray
@pytest.mark.slow
def test_requests_with_their_own_steering_equal_the_single_process_engine(
    endpoint: str, smollm2: ModelHandle, cluster: ClusterConfig
) -> None:
    replicas: dict[str, set[str]] = {}
    for index, model in enumerate(["a", "b", "a", "b"]):
        response = httpx.post(f"{endpoint}/chat/completions", json=_body(model, index), timeout=600)
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["message"]["content"]
        assert text == _expected(smollm2, index), (model, index)
        replicas.setdefault(model, set()).add(response.headers["x-steer-replica"])
    # each model stays on the replica that holds it, and the two are held apart
    assert len(replicas["a"]) == 1 and len(replicas["b"]) == 1 and replicas["a"] != replicas["b"]
    for route in ("models", "model/list"):  # the OpenAI list and TabbyAPI's status check
        listed = httpx.get(f"{endpoint}/{route}", timeout=30).json()
        assert [entry["id"] for entry in listed["data"]] == ["a", "b"], route
    assert httpx.get(f"{endpoint}/model", timeout=30).json()["id"] == cluster.default_model
    text = "Describe a harbour at dawn."
    counted = httpx.post(f"{endpoint}/tokenize", json={"model": "b", "prompt": text}, timeout=600)
    assert counted.json()["tokens"] == smollm2.tokenizer(text)["input_ids"]  # by a replica
    llama = {"model": "b", "prompt": text, "n_predict": 3, "temperature": 0}  # llama.cpp's route
    completed = httpx.post(f"{endpoint.removesuffix('/v1')}/completion", json=llama, timeout=600)
    assert completed.status_code == 200, completed.text
    assert completed.json()["model"] == "b" and completed.json()["tokens_predicted"] == 3
    missing = httpx.post(f"{endpoint}/chat/completions", json=_body("zzz", 0), timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    unknown_artifact = _body("a", 0, steering=[{"add": {"artifactId": "nope", "strength": 1}}])
    refused = httpx.post(f"{endpoint}/chat/completions", json=unknown_artifact, timeout=60)
    assert refused.status_code == 404 and "nope" in refused.text  # never served unsteered


@pytest.mark.ray
@pytest.mark.slow
def test_each_replica_reports_its_metrics(cluster: ClusterConfig, endpoint: str) -> None:
    import re

    for model in ("a", "b"):
        response = httpx.post(f"{endpoint}/chat/completions", json=_body(model, 0), timeout=600)
        assert response.status_code == 200
    deadline = time.monotonic() + 120
    replicas: set[str] = set()
    gauged: set[str] = set()
    while time.monotonic() < deadline and (len(replicas) < 2 or gauged != {"a", "b"}):
        time.sleep(3)  # Ray exports every few seconds; steer's gauges follow the health probe
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith("ray_serve_deployment_request_counter") and (
                'deployment="SteerReplica"' in line
            ):
                replicas.update(re.findall(r'replica="([^"]+)"', line))
            if line.split("{")[0] in ("steer_rows_running", "ray_steer_rows_running"):
                gauged.update(re.findall(r'model="([^"]+)"', line))
    assert len(replicas) == 2 and gauged == {"a", "b"}, (replicas, gauged)


@pytest.mark.ray
@pytest.mark.slow
def test_grpc_requests_equal_the_single_process_engine(
    client: SteerClient, smollm2: ModelHandle
) -> None:
    for index, model in enumerate(["b", "a", "b"]):
        steering = [add(_vector(index), 4.0, hooks=[HOOK])] if index else []
        completion = client.complete(
            messages=[{"role": "user", "content": f"Describe a harbour at dawn ({index})."}],
            model=model,
            interventions=steering,
            temperature=0,
            max_new_tokens=10,
        )[None]
        assert completion.text == _expected(smollm2, index), (model, index)
    listed = client.models()
    assert [info.model_id for info in listed.models] == ["a", "b"]
    assert listed.default_model == "a"
    assert client.model_info().model_id == "a"  # no model named: the deployment's first
    with pytest.raises(NotFound) as unknown:
        client.complete("Hi", model="zzz", max_new_tokens=2)
    assert unknown.value.field == "model"
    with pytest.raises(NotFound) as missing:  # the replica's own error, never unsteered text
        client.complete("Hi", model="b", interventions=[add("nope", 1.0)], max_new_tokens=2)
    assert "nope" in missing.value.message
    with pytest.raises(FailedPrecondition):  # a cluster's models are its deployment file's
        client.load_model("smollm2-135m-instruct", "c")
    assert client.health() == "SERVING"


@pytest.mark.ray
@pytest.mark.slow
def test_a_configured_sae_slider_equals_the_single_process_engine(
    client: SteerClient, cluster: ClusterConfig, smollm2: ModelHandle
) -> None:
    from steer.client import slider
    from steer.sae import feature_slider, load_sae

    prompt = [{"role": "user", "content": "Describe a harbour at dawn (0)."}]
    moved = slider("res", 3, "add_decoder", 8.0)
    completion = client.complete(
        messages=prompt, model="a", interventions=[moved], temperature=0, max_new_tokens=10
    )[None]
    sae = load_sae(cluster.server_settings().models_root / "saes" / "res", smollm2)
    request = GenerationRequest(
        messages=(Message("user", prompt[0]["content"]),),
        sampling=SamplingConfig.greedy_config(),
        max_new_tokens=10,
        interventions=(feature_slider("add_decoder", sae, 3, 8.0),),
    )
    expected = Engine(smollm2).run([request])[0].text
    assert completion.text == expected and expected != _expected(smollm2, 0)
    with pytest.raises(NotFound):  # configured for model "a" only
        client.complete(messages=prompt, model="b", interventions=[moved], max_new_tokens=2)


CONTRAST = """
name = "harbour"
kind = "contrast"
[data]
positive = "data/sea.txt"
negative = "data/bread.txt"
train = 0.5
validation = 0.25
filter = false
[search]
layers = [6]
positions = [-1]
top_k = 1
[evaluate]
max_new_tokens = 2
kl_tokens = 2
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_direction_job_runs_as_a_ray_task_and_equals_the_same_compute_in_process(
    client: SteerClient, cluster: ClusterConfig, smollm2: ModelHandle, tmp_path: Path
) -> None:
    import threading

    from steer.artifacts import load_vector
    from steer.directions.api import compute
    from steer.proto.v1 import jobs_pb2

    root = cluster.server_settings().models_root
    for directory in (root, tmp_path):
        (directory / "data").mkdir(exist_ok=True)
        (directory / "data" / "sea.txt").write_text(
            "\n".join(f"The ship sailed out of harbour {i}" for i in range(8))
        )
        (directory / "data" / "bread.txt").write_text(
            "\n".join(f"How do I bake bread {i}" for i in range(8))
        )
    job = client.compute_direction(CONTRAST, "harbour", model="b")
    states = list(client.watch_job(job.job_id))
    assert states[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, states[-1].error
    assert any(state.stage.startswith("running as Ray task") for state in states)
    assert client.job(job.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED  # any replica sees it
    recipe = tmp_path / "harbour.toml"
    recipe.write_text(CONTRAST)
    local = compute(
        smollm2, recipe, tmp_path / "local", progress=lambda *_: None, cancelled=threading.Event()
    )
    remote = load_vector(root / "artifacts" / "harbour", handle=smollm2).vector
    expected = load_vector(local, handle=smollm2).vector
    (layer,) = expected.layers
    torch.testing.assert_close(remote.at(layer), expected.at(layer), rtol=1e-4, atol=1e-5)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_replica_fails_only_its_streams_and_the_app_recovers(
    endpoint: str, client: SteerClient
) -> None:
    import ray

    from steer.errors import SteerError

    holder = httpx.post(f"{endpoint}/chat/completions", json=_body("a", 0), timeout=600)
    victim = holder.headers["x-steer-replica"]
    outcome: dict[str, object] = {}

    def stream(model: str) -> None:
        body = _body(model, 0, max_tokens=120, stream=True)
        lines: list[str] = []
        try:
            with httpx.stream("POST", f"{endpoint}/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if model == "a" and len(lines) == 6:
                        outcome["started"] = True
        except httpx.HTTPError as error:
            outcome[f"{model}_error"] = error
        outcome[model] = lines

    def grpc_stream(model: str) -> None:
        prompt = [{"role": "user", "content": "Describe a harbour at dawn (0)."}]
        try:
            events = list(
                client.generate(messages=prompt, model=model, temperature=0, max_new_tokens=120)
            )
            outcome[f"grpc_{model}"] = events[-1].finish_reason
        except SteerError as error:
            outcome[f"grpc_{model}"] = error

    threads = [threading.Thread(target=stream, args=(m,)) for m in ("a", "b")]
    threads += [threading.Thread(target=grpc_stream, args=(m,)) for m in ("a", "b")]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 300
    while "started" not in outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    names = ray.util.list_named_actors(all_namespaces=True)
    (actor,) = [n for n in names if n["name"].endswith(victim)]
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    for thread in threads:
        thread.join(600)
    b_lines = outcome["b"]
    assert isinstance(b_lines, list) and "data: [DONE]" in b_lines  # the other one finished
    a_lines = outcome["a"]
    assert isinstance(a_lines, list) and "data: [DONE]" not in a_lines  # this one did not
    assert outcome["grpc_b"] == "length"  # over gRPC: the same
    assert isinstance(outcome["grpc_a"], Unavailable), outcome["grpc_a"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # Ray Serve replaces the replica; "a" is served again
        again = httpx.post(f"{endpoint}/chat/completions", json=_body("a", 0), timeout=600)
        if again.status_code == 200:
            assert again.headers["x-steer-replica"] != victim
            return
        time.sleep(2)
    pytest.fail("the application did not recover from the killed replica")


@pytest.mark.ray
@pytest.mark.slow
def test_a_replica_on_the_vllm_backend_equals_the_single_process_engine(
    smollm2: ModelHandle, tmp_path: Path
) -> None:
    """The replica runs vLLM inside its Ray actor; steered and plain requests give the hf
    engine's text (the module's application is stopped first: one Ray per process)."""
    pytest.importorskip("ray")
    pytest.importorskip("vllm")
    import ray

    from steer.cli.deploy import start, stop

    if ray.is_initialized():
        stop()
    config = ClusterConfig.from_dict(
        {
            **_config(_free_port(), _free_port()).to_dict(),
            "models": {"a": MODELS["a"]},
            "replicas": {"num_replicas": 1, "num_cpus": 1},
            "server": {
                "models_root": str(tmp_path),
                "max_batch": 8,
                "backend": "vllm",
                "kv_cache_gib": 1,
            },
        }
    )
    temp = _short_temp_dir()
    start(config, temp_dir=temp)
    try:
        for index in (0, 1):
            response = httpx.post(
                f"http://{config.host}:{config.port}/v1/chat/completions",
                json=_body("a", index),
                timeout=600,
            )
            assert response.status_code == 200, response.text
            text = response.json()["choices"][0]["message"]["content"]
            assert text == _expected(smollm2, index), index
    finally:
        stop()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_shutdown_leaves_no_ray_process() -> None:
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("ray")
    from steer.cli.deploy import start, stop

    config = ClusterConfig.from_dict(
        {
            **_config(_free_port()).to_dict(),
            "models": {"m": MODELS["a"]},
            "replicas": {"num_replicas": 1, "num_cpus": 1},
        }
    )
    import ray

    if ray.is_initialized():  # the module's application first
        stop()
    temp = _short_temp_dir()
    start(config, temp_dir=temp)
    stop()
    shutil.rmtree(temp, ignore_errors=True)
    time.sleep(2)
    own = psutil.Process(os.getpid())
    left = [p.name() for p in own.children(recursive=True) if p.is_running()]
    assert not [name for name in left if "ray" in name or "gcs" in name], left
