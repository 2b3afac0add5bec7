"""SAE feature sliders in Generate and the Features rpcs, on loopback over tiny random models.

Every remote result is compared with the library on the same inputs: sliders with the
in-process engine, feature reads with :mod:`steer.sae.features`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_sae import HOOK, _planted_sae, _random_sae
from test_server import LONG_PROMPT, PROMPTS, make_settings
from tiny import tiny_handle

from steer.client import (
    NotFound,
    SteerClient,
    Unauthenticated,
    generate_request,
    slider,
)
from steer.errors import InvalidArgumentError, SteerError
from steer.generation import Engine, GenerationRequest
from steer.interventions import Intervention, Phase
from steer.models import ModelHandle
from steer.proto.v1 import generation_pb2
from steer.sae import AddDecoder, Clamp, Scale, SparseAutoencoder, load_sae
from steer.sae.features import contrast, encode_texts, feature_info, search, top_features
from steer.sampling import SamplingConfig
from steer.server import SteerServer

GREEDY = SamplingConfig(temperature=0.0)
#: the planted feature of the "embed" SAE fires on " dra" (" dragon") and nowhere else
PLANTED, MARKER = 42, "Ġdra"
WITH_DRAGON = [
    "Write a poem about the dragon",
    "The knight saw the dragon",
    "A dragon sleeps.",
    "The dragon laughed.",
    "Sure! a dragon story.",
]
WITHOUT = ["Write a poem", "The knight saw the sea", "I bake bread", "The fox jumps.", "Hi there"]


def save_saes(root: Path, handle: ModelHandle) -> None:
    """resid: random, 96 features at blocks.1.hook_resid_post; embed: a planted detector;
    wide: d_in 32 (does not fit the model); link: a symlink out of the models root."""
    _random_sae("standard", handle.d_model).save_model(root / "saes" / "resid")
    _planted_sae(handle, MARKER, PLANTED).sae.save_model(root / "saes" / "embed")
    _random_sae("standard", 32).save_model(root / "saes" / "wide")
    outside = root.parent / f"{root.name}-outside"
    _random_sae("standard", handle.d_model).save_model(outside / "sae")
    (root / "saes" / "link").symlink_to(outside / "sae", target_is_directory=True)


@pytest.fixture(scope="module")
def served(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("models")
    save_saes(root, tiny_llama)
    models = {"tiny": tiny_llama, "other": tiny_handle("llama", seed=1)}
    with SteerServer(make_settings(root, max_feature_texts=12), models=models) as server:
        with SteerClient(server.target, timeout=60) as client:
            client.load_sae("saes/resid")
            client.load_sae("saes/embed")
        yield server


@pytest.fixture
def client(served: SteerServer) -> Iterator[SteerClient]:
    with SteerClient(served.target, timeout=60) as connected:
        yield connected


@pytest.fixture(scope="module")
def resid(served: SteerServer, tiny_llama: ModelHandle) -> SparseAutoencoder:
    """The "resid" SAE loaded in this process from the same directory."""
    return load_sae(served.settings.models_root / "saes" / "resid", tiny_llama)


@pytest.fixture(scope="module")
def embed(served: SteerServer, tiny_llama: ModelHandle) -> SparseAutoencoder:
    return load_sae(served.settings.models_root / "saes" / "embed", tiny_llama)


def alone(
    handle: ModelHandle, prompt: str, interventions: tuple[Intervention, ...], tokens: int = 10
) -> tuple[int, ...]:
    request = GenerationRequest(
        prompt=prompt, sampling=GREEDY, max_new_tokens=tokens, interventions=interventions
    )
    return Engine(handle).run([request])[0].token_ids


def ranked(features: Any) -> list[tuple[Any, ...]]:
    """Remote (proto) or library ranked features as comparable tuples."""
    rows = []
    for item in features:
        has = getattr(item, "HasField", None)
        mean_b = item.mean_activation_b if has is None or has("mean_activation_b") else None
        auroc = item.auroc if has is None or has("auroc") else None
        rows.append((item.feature, item.score, item.mean_activation, item.frequency, mean_b, auroc))
    return rows


# -- loading -----------------------------------------------------------------------------------


def test_load_list_and_unload_saes(client: SteerClient, served: SteerServer) -> None:
    listed = {info.sae_id: info for info in client.saes()}
    assert {"resid", "embed"} <= set(listed)
    resid = listed["resid"]
    assert (resid.model, resid.path, resid.hook_name) == ("tiny", "saes/resid", HOOK)
    assert (resid.d_in, resid.num_features, resid.architecture) == (64, 96, "standard")
    assert resid.sliders and listed["embed"].hook_name == "hook_embed"

    again = client.load_sae("saes/resid", "resid-2", model="other")
    assert again.model == "other"
    client.unload_sae("resid-2")
    assert "resid-2" not in {info.sae_id for info in client.saes()}
    with pytest.raises(NotFound) as gone:
        client.feature_activations("resid-2", "Hello")
    assert gone.value.field == "sae_id"

    # unloading a model drops its SAEs (they would keep the model in memory)
    served.registry.add("third", tiny_handle("llama", seed=2))
    client.load_sae("saes/resid", "resid-3", model="third")
    client.unload_model("third")
    assert "resid-3" not in {info.sae_id for info in client.saes()}


# -- sliders in Generate -----------------------------------------------------------------------


def test_neutral_sliders_equal_no_slider(client: SteerClient) -> None:
    def run(*sliders: generation_pb2.Intervention) -> tuple[list[int], list[Any]]:
        events = list(
            client.generate(
                PROMPTS[1],
                temperature=0,
                max_new_tokens=8,
                top_logprobs=5,
                interventions=list(sliders),
            )
        )
        return [t for e in events for t in e.token_ids], [e.top_logprobs for e in events]

    plain = run()
    assert run(slider("resid", 5, "scale", 1.0)) == plain
    assert run(slider("resid", 5, "add_decoder", 0.0)) == plain
    assert run(slider("resid", 5, "scale", 1.0), slider("embed", PLANTED, "add_decoder", 0.0)) == (
        plain
    )
    # the same conversion path with a non-neutral value does move the model
    assert run(slider("resid", 5, "add_decoder", 4.0))[1] != plain[1]


def test_speaker_scoped_slider_acts_on_that_speaker_only(client: SteerClient) -> None:
    def tokens(*sliders: generation_pb2.Intervention) -> list[int]:
        options = {"temperature": 0, "max_new_tokens": 8, "interventions": list(sliders)}
        return client.complete(PROMPTS[2], **options)[None].token_ids

    # a plain prompt has no speakers, so a slider scoped to one covers no token
    assert tokens(slider("resid", 4, "clamp", 10.0, speaker="Vex")) == tokens()
    assert tokens(slider("resid", 4, "clamp", 10.0)) != tokens()


def test_clamp_over_grpc_equals_in_process_engine(
    client: SteerClient, tiny_llama: ModelHandle, resid: SparseAutoencoder
) -> None:
    remote = client.complete(
        PROMPTS[3], temperature=0, max_new_tokens=10, interventions=[slider("resid", 7, "clamp", 8)]
    )[None]
    local = alone(tiny_llama, PROMPTS[3], (Clamp(resid, 7, 8.0),))
    assert tuple(remote.token_ids) == local
    assert local != alone(tiny_llama, PROMPTS[3], ())


def _slider_case(
    index: int, resid: SparseAutoencoder
) -> tuple[list[generation_pb2.Intervention], tuple[Intervention, ...]]:
    """Request ``index``'s sliders, as proto and as library objects."""
    feature = (3 * index) % 96
    if index % 4 == 0:
        return [], ()
    if index % 4 == 1:
        return [slider("resid", feature, "clamp", 6.0 + index)], (
            Clamp(resid, feature, 6.0 + index),
        )
    if index % 4 == 2:
        return [
            slider("resid", feature, "scale", 0.0),
            slider("resid", feature + 1, "add_decoder", 3.0, phase="generated"),
        ], (Scale(resid, feature, 0.0), AddDecoder(resid, feature + 1, 3.0, Phase.GENERATED))
    return [slider("resid", feature, "clamp", 9.0, phase="prompt")], (
        Clamp(resid, feature, 9.0, Phase.PROMPT),
    )


def test_concurrent_streams_with_different_sliders_equal_each_alone(
    served: SteerServer, tiny_llama: ModelHandle, resid: SparseAutoencoder
) -> None:
    count, results = 8, {}
    barrier = threading.Barrier(count)
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            remote, _ = _slider_case(index, resid)
            with SteerClient(served.target, timeout=120) as own:
                barrier.wait()
                completion = own.complete(
                    PROMPTS[index % len(PROMPTS)],
                    temperature=0,
                    max_new_tokens=10,
                    interventions=remote,
                )
                results[index] = tuple(completion[None].token_ids)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    moved = 0
    for index in range(count):
        prompt = PROMPTS[index % len(PROMPTS)]
        expected = alone(tiny_llama, prompt, _slider_case(index, resid)[1])
        assert results[index] == expected, f"request {index} differs from running alone"
        moved += expected != alone(tiny_llama, prompt, ())
    assert moved >= 3  # the sliders really act


# -- Features rpcs -----------------------------------------------------------------------------


def test_feature_rpcs_equal_the_library(
    client: SteerClient, tiny_llama: ModelHandle, embed: SparseAutoencoder
) -> None:
    text = WITH_DRAGON[3]
    remote = client.feature_activations("embed", text, k=5, per_token=True)
    assert ranked(remote.top) == ranked(top_features(tiny_llama, embed, text, 5))
    (encoded,) = encode_texts(tiny_llama, embed, [text])
    assert [t.token_id for t in remote.tokens] == list(encoded.token_ids)
    assert [t.token for t in remote.tokens] == list(encoded.tokens)
    assert [[(f.feature, f.activation) for f in t.features] for t in remote.tokens] == (
        encoded.top_per_token(5)
    )
    assert not client.feature_activations("embed", text).tokens  # per_token off

    assert ranked(client.search_features("embed", WITH_DRAGON, k=4)) == ranked(
        search(tiny_llama, embed, WITH_DRAGON, 4)
    )
    assert ranked(client.contrast_features("embed", WITH_DRAGON, WITHOUT, k=6)) == ranked(
        contrast(tiny_llama, embed, WITH_DRAGON, WITHOUT, 6)
    )

    corpus = WITH_DRAGON + WITHOUT
    info = client.feature_info("embed", PLANTED, corpus=corpus, num_tokens=4, num_snippets=3)
    expected = feature_info(tiny_llama, embed, PLANTED, corpus=corpus, num_tokens=4, num_snippets=3)
    assert (info.feature, info.hook_name, info.decoder_norm, info.density) == (
        expected.feature,
        expected.hook_name,
        expected.decoder_norm,
        expected.density,
    )
    assert [(t.token, t.logit) for t in info.promoted] == list(expected.promoted)
    assert [(t.token, t.logit) for t in info.suppressed] == list(expected.suppressed)
    assert [(s.text, s.activation, s.token, s.marked) for s in info.top_snippets] == [
        (s.text, s.activation, s.token, s.marked) for s in expected.top_snippets
    ]
    assert len(info.top_snippets) == 3 and all("[[ dra]]" in s.marked for s in info.top_snippets)
    bare = client.feature_info("embed", PLANTED)  # no corpus: no snippets, no density
    assert not bare.top_snippets and not bare.HasField("density") and len(bare.promoted) == 10


def test_contrast_over_grpc_finds_the_planted_feature(client: SteerClient) -> None:
    (first,) = client.contrast_features("embed", WITH_DRAGON, WITHOUT, k=1)
    assert first.feature == PLANTED and first.score > 0 and first.auroc == 1.0
    assert first.mean_activation > 0 and first.mean_activation_b == 0.0
    (reversed_first,) = client.contrast_features("embed", WITHOUT, WITH_DRAGON, k=1)
    assert reversed_first.feature == PLANTED and reversed_first.score < 0
    top = client.feature_activations("embed", "The dragon laughed.", k=3, per_token=True)
    assert PLANTED in [f.feature for f in top.top]
    fired = [t.token for t in top.tokens if PLANTED in [f.feature for f in t.features]]
    assert fired == [MARKER]


def test_feature_reads_during_a_steered_stream_are_isolated(
    client: SteerClient, served: SteerServer, tiny_llama: ModelHandle, resid: SparseAutoencoder
) -> None:
    """Feature reads hook the same module a running slider hooks; each must see only its own
    forward pass (they run on the engine thread between steps)."""
    texts = [PROMPTS[0], PROMPTS[2], LONG_PROMPT]
    # computed while the server is idle: the in-process library shares the model's modules
    expected = [ranked(top_features(tiny_llama, resid, text, 5)) for text in texts]
    stream = client.generate(
        LONG_PROMPT,
        temperature=0,
        max_new_tokens=400,
        interventions=[slider("resid", 11, "clamp", 12.0)],
    )
    tokens = list(next(stream).token_ids)
    reads = []
    for round_ in range(3):
        for text in texts:
            reads.append(ranked(client.feature_activations("resid", text, k=5).top))
        tokens.extend(next(stream).token_ids)
        assert served.registry.get("tiny").worker.running == 1, round_  # still mid-stream
    stream.close()
    assert reads == expected * 3
    assert tuple(tokens) == alone(tiny_llama, LONG_PROMPT, (Clamp(resid, 11, 12.0),), len(tokens))


# -- errors ------------------------------------------------------------------------------------


def _raw_slider(**fields: Any) -> generation_pb2.GenerateRequest:
    """A Generate request with one FeatureSlider built field by field (no client checks)."""
    message = generation_pb2.FeatureSlider(**fields)
    return generate_request(
        "Hello", max_new_tokens=2, interventions=[generation_pb2.Intervention(slider=message)]
    )


def test_bad_input_gets_its_status_and_field_then_the_server_still_serves(
    client: SteerClient, served: SteerServer, tmp_path: Path
) -> None:
    clamp = generation_pb2.SLIDER_MODE_CLAMP
    scale = generation_pb2.SLIDER_MODE_SCALE
    prefix = "interventions[0].slider"
    cases: list[tuple[str, Any, grpc.StatusCode, str, str]] = [
        # (name, call, status, field, a word the message must contain)
        (
            "unknown SAE id",
            lambda: client.complete(interventions=[slider("nope", 1, "clamp", 1.0)], prompt="Hi"),
            grpc.StatusCode.NOT_FOUND,
            f"{prefix}.sae_id",
            "LoadSae",
        ),
        (
            "feature out of range",
            lambda: client.complete("Hi", interventions=[slider("resid", 96, "clamp", 1.0)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}.feature",
            "0..95",
        ),
        (
            "NaN clamp value",
            lambda: list(
                client.stream(_raw_slider(sae_id="resid", mode=clamp, value=float("nan")))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}.value",
            "finite",
        ),
        (
            "infinite scale factor",
            lambda: list(
                client.stream(_raw_slider(sae_id="resid", mode=scale, value=float("inf")))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}.value",
            "finite",
        ),
        (
            "no mode",
            lambda: list(client.stream(_raw_slider(sae_id="resid", feature=1, value=1.0))),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}.mode",
            "clamp",
        ),
        (
            "no SAE id",
            lambda: list(client.stream(_raw_slider(mode=clamp, value=1.0))),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}.sae_id",
            "required",
        ),
        (
            "SAE loaded for another model",
            lambda: client.complete(
                "Hi", model="other", interventions=[slider("resid", 1, "clamp", 1.0)]
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{prefix}.sae_id",
            "tiny",
        ),
        (
            "SAE path leaving the models root",
            lambda: client.load_sae("../elsewhere", "x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "path",
            "models root",
        ),
        (
            "absolute SAE path",
            lambda: client.load_sae(str(tmp_path), "x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "path",
            "absolute",
        ),
        (
            "SAE path through a symlink out of the root",
            lambda: client.load_sae("saes/link", "x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "path",
            "models root",
        ),
        (
            "missing SAE directory",
            lambda: client.load_sae("saes/absent", "x"),
            grpc.StatusCode.NOT_FOUND,
            "path",
            "does not exist",
        ),
        (
            "not an SAE directory",
            lambda: client.load_sae("saes", "x"),
            grpc.StatusCode.NOT_FOUND,
            "path",
            "cfg.json",
        ),
        (
            "wrong d_in",
            lambda: client.load_sae("saes/wide", "x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sae.d_in",
            "d_model 64",
        ),
        (
            "SAE id taken",
            lambda: client.load_sae("saes/embed", "resid"),
            grpc.StatusCode.ALREADY_EXISTS,
            "sae_id",
            "already",
        ),
        (
            "bad SAE id",
            lambda: client.load_sae("saes/embed", "a/b"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sae_id",
            "invalid id",
        ),
        (
            "SAE for an unknown model",
            lambda: client.load_sae("saes/embed", "x", model="nope"),
            grpc.StatusCode.NOT_FOUND,
            "model",
            "nope",
        ),
        (
            "activations of an unknown SAE",
            lambda: client.feature_activations("nope", "Hello"),
            grpc.StatusCode.NOT_FOUND,
            "sae_id",
            "nope",
        ),
        (
            "empty text",
            lambda: client.feature_activations("resid", ""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "text",
            "empty",
        ),
        (
            "info of a feature out of range",
            lambda: client.feature_info("resid", 96),
            grpc.StatusCode.INVALID_ARGUMENT,
            "feature",
            "0..95",
        ),
        (
            "search without examples",
            lambda: client.search_features("resid", []),
            grpc.StatusCode.INVALID_ARGUMENT,
            "examples",
            "non-empty",
        ),
        (
            "too many examples",
            lambda: client.search_features("resid", ["a dragon"] * 13),
            grpc.StatusCode.INVALID_ARGUMENT,
            "examples",
            "at most 12",
        ),
        (
            "an empty text in a contrast set",
            lambda: client.contrast_features("resid", ["a dragon"], ["the sea", " "]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "set_b",
            "text 1",
        ),
        (
            "a text over the prompt limit",
            lambda: client.feature_info("resid", 1, corpus=["word " * 300]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "corpus[0]",
            "at most 256",
        ),
    ]
    for name, call, code, field, word in cases:
        with pytest.raises(SteerError) as raised:
            call()
        error = raised.value
        assert error.code is code, (name, error)  # type: ignore[attr-defined]
        assert error.field == field, (name, error.field)
        assert word in error.message and "Traceback" not in error.message, (name, error.message)
    assert {info.sae_id for info in client.saes()} == {"resid", "embed"}  # nothing half-loaded

    # the server still serves, sliders and features alike, and no engine batch failed
    steered = client.complete(
        "Hello", temperature=0, max_new_tokens=3, interventions=[slider("resid", 1, "clamp", 2.0)]
    )[None]
    assert steered.completion_tokens == 3
    assert client.feature_activations("embed", "The dragon laughed.", k=1).top[0].feature == PLANTED
    assert served.registry.get("tiny").worker.stats.failed_total == 0


def test_client_helper_checks_mode_and_phase() -> None:
    with pytest.raises(InvalidArgumentError) as mode:
        slider("resid", 1, "nudge", 1.0)
    assert mode.value.field == "mode"
    with pytest.raises(InvalidArgumentError) as phase:
        slider("resid", 1, "clamp", 1.0, phase="later")
    assert phase.value.field == "phase"
    built = slider("resid", 3, "add_decoder", 2.5, phase="generated", speaker="Vex")
    assert built.slider.mode == generation_pb2.SLIDER_MODE_ADD_DECODER
    assert (built.slider.feature, built.slider.value, built.speaker) == (3, 2.5, "Vex")
    assert built.slider.phase == generation_pb2.PHASE_GENERATED


def test_cli_loads_an_sae_and_generates_with_a_slider(
    served: SteerServer, client: SteerClient, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from steer.cli import main

    server = ["--server", served.target]
    assert main(["models", "load-sae", "saes/resid", "--id", "resid-cli", "--json", *server]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert loaded["saeId"] == "resid-cli" and loaded["hookName"] == HOOK
    assert main(["models", "saes", *server]) == 0
    assert "resid-cli" in capsys.readouterr().out
    options = ["--raw", "--temperature", "0", "--max-new-tokens", "8", "--json", *server]
    assert main(["generate", PROMPTS[3], "--slider", "clamp:resid-cli:7=8", *options]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = client.complete(
        PROMPTS[3], temperature=0, max_new_tokens=8, interventions=[slider("resid", 7, "clamp", 8)]
    )[None]
    assert record["token_ids"] == expected.token_ids
    assert main(["generate", "Hi", "--slider", "clamp:resid-cli=8", *options]) == 1
    assert "--slider" in capsys.readouterr().err
    assert main(["models", "unload-sae", "resid-cli", *server]) == 0
    assert "resid-cli" not in {info.sae_id for info in client.saes()}


# -- auth, reflection ----------------------------------------------------------------------------


def test_features_service_is_reflected(client: SteerClient) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert "steer.v1.Features" in names and "steer.v1.Generation" in names


def test_features_need_the_token(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    save_saes(tmp_path, tiny_llama)
    settings = make_settings(tmp_path, token="s3cret")
    with SteerServer(settings, models={"tiny": tiny_llama}) as server:
        with SteerClient(server.target, token="wrong") as anonymous:
            for call in (
                lambda: anonymous.load_sae("saes/embed"),
                anonymous.saes,
                lambda: anonymous.feature_activations("embed", "Hi"),
            ):
                with pytest.raises(Unauthenticated):
                    call()
        with SteerClient(server.target, token="s3cret") as member:
            assert member.load_sae("saes/embed").num_features == 96
            assert member.feature_activations("embed", "The dragon", k=1).top[0].feature == PLANTED
