"""Bakes destroy nothing they should not: output rules, overwrite, temporaries, bakes of bakes.

Issue #14: the output rule (never the models root or what the server keeps; overwrite replaces
only a previous bake output), ALREADY_EXISTS at request time, stale temporaries of killed bakes,
bakes from bake outputs that verify, cancellation while opening a slow GGUF source, and errors
and results without the server's absolute paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from equivalence import interventions_of, logits, random_vector, relative_difference
from test_server import make_settings
from tiny import tiny_handle

from steer.artifacts import save_vector
from steer.bake import BakeCancelled, bake, verify
from steer.bake.api import check_output
from steer.bake.provenance import OutputExistsError, is_bake_output, remove_stale_under
from steer.client import SteerClient
from steer.errors import FailedPreconditionError, InvalidArgumentError
from steer.models import ModelHandle, load_model
from steer.proto.v1 import bake_pb2, jobs_pb2
from steer.server import SteerServer


def _recipe(kind: str, direction: Path, **extra: object) -> dict[str, object]:
    key = "direction" if kind == "ablate" else "vector"
    return {"edits": [{"kind": kind, key: str(direction), **extra}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelHandle, Path, Path]:
    """A tiny Llama saved as a source, and a direction (naming no model: bakes of bakes use it
    too), outside any models root."""
    root = tmp_path_factory.mktemp("safety-source")
    handle = tiny_handle("llama", seed=5)
    handle.model.save_pretrained(root / "source")
    handle.tokenizer.save_pretrained(root / "source")
    direction = save_vector(root / "direction", random_vector(2))
    return handle, root / "source", direction


# ---------------------------------------------------------------------------------------------
# Defect 7: a bake from a bake output verifies, and equals the run-time edit on its source


@pytest.mark.parametrize("second", ["add", "ablate"])
def test_bake_from_a_bake_output_verifies_and_is_exact(tiny, tmp_path, second) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = tiny
    # the first bake adds a vector: the output has the MLP biases and a steer_provenance.json
    first = bake(str(source), _recipe("add", direction, layers=[1, 2]), tmp_path / "first")
    edit = {"layers": [2], "strength": 0.5} if second == "add" else {}
    recipe = _recipe(second, direction, **edit)
    out = bake(str(first), recipe, tmp_path / "second")
    assert verify(out) == []
    record = json.loads((out / "steer_provenance.json").read_text())
    assert record["recipe"]["edits"][0]["kind"] == second  # its own record, not the source's
    # the second bake equals its recipe at run time on the first bake's model (the stored biases
    # are summed with new vectors and ablated with their matrices, not written twice or kept)
    expected = logits(load_model(first), interventions_of(recipe))
    assert relative_difference(expected, logits(load_model(out))) <= 1e-4


def test_lora_refuses_a_source_bias_it_cannot_edit(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = tiny
    first = bake(str(source), _recipe("add", direction, layers=[1, 2]), tmp_path / "first")
    with pytest.raises(InvalidArgumentError, match="bias") as refused:
        bake(
            str(first),
            _recipe("ablate", direction),
            tmp_path / "lora",
            output_format="lora",
        )
    assert refused.value.field == "output_format"
    assert not (tmp_path / "lora").exists()


# ---------------------------------------------------------------------------------------------
# Defect 1 in the library: overwrite replaces only a previous bake output (so the CLI too)


def test_overwrite_never_replaces_what_a_bake_did_not_write(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = tiny
    recipe = _recipe("ablate", direction)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("an operator's own file")
    with pytest.raises(FailedPreconditionError, match="not a previous steer bake output"):
        bake(str(source), recipe, plain, overwrite=True)
    assert (plain / "notes.txt").read_text() == "an operator's own file"
    # a bake output someone added a file to is no longer only a bake output
    out = bake(str(source), recipe, tmp_path / "out")
    assert is_bake_output(out)
    (out / "README.md").write_text("mine")
    with pytest.raises(FailedPreconditionError):
        bake(str(source), recipe, out, overwrite=True)
    (out / "README.md").unlink()
    assert bake(str(source), recipe, out, overwrite=True) == out and verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]


def test_cli_overwrite_refuses_a_plain_directory(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from steer.cli import main as steer_main

    _handle, source, direction = tiny
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep.txt").write_text("x")
    argv = ["bake", "--model", str(source), "--ablate", str(direction), "--out", str(plain)]
    assert steer_main([*argv, "--overwrite"]) == 1
    assert [p.name for p in plain.iterdir()] == ["keep.txt"]


def test_control_vector_overwrite_replaces_only_a_control_vector(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = tiny
    recipe = _recipe("add", direction, layers=[1, 2])
    vector = bake(str(source), recipe, tmp_path / "v.gguf", output_format="control-vector")
    assert is_bake_output(vector)
    assert bake(str(source), recipe, vector, output_format="control-vector", overwrite=True)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not really")
    model = bake(str(source), recipe, tmp_path / "model")
    for target in (other, model):
        with pytest.raises(FailedPreconditionError):
            bake(str(source), recipe, target, output_format="control-vector", overwrite=True)
    assert other.read_bytes() == b"GGUF not really" and verify(model) == []
    with pytest.raises(FailedPreconditionError):  # a model does not replace a control vector
        bake(str(source), recipe, vector, overwrite=True)


def test_existing_output_is_output_exists(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = tiny
    out = bake(str(source), _recipe("ablate", direction), tmp_path / "out")
    with pytest.raises(OutputExistsError) as exists:
        bake(str(source), _recipe("ablate", direction), out)
    assert exists.value.status_code == "ALREADY_EXISTS"
    assert isinstance(exists.value, FailedPreconditionError)  # what library callers caught


def test_output_never_holds_the_source_or_lies_in_a_bake_output(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = tiny
    recipe = _recipe("ablate", direction)
    first = bake(str(source), recipe, tmp_path / "first")
    with pytest.raises(InvalidArgumentError, match="must be kept"):
        bake(str(first), recipe, first, overwrite=True)  # a bake output as its own source
    with pytest.raises(InvalidArgumentError, match="must be kept"):
        bake(str(first), recipe, tmp_path, overwrite=True)  # an ancestor of the source
    with pytest.raises(InvalidArgumentError, match="inside the bake output"):
        bake(str(source), recipe, first / "nested")
    assert verify(first) == []


def test_check_output_names_paths_relative_to_the_root(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    (root / "artifacts" / "refusal").mkdir(parents=True)
    (root / "kept").mkdir()
    cases = {
        root: InvalidArgumentError,
        root / "sub" / "..": InvalidArgumentError,
        root.parent: InvalidArgumentError,
        root / "artifacts": InvalidArgumentError,
        root / "artifacts" / "new": InvalidArgumentError,
        root / "kept": InvalidArgumentError,
    }
    for target, error in cases.items():
        with pytest.raises(error) as refused:
            check_output(
                target,
                output_format="model",
                overwrite=True,
                root=root,
                keep=[root / "kept"],
                reserved=[root / "artifacts"],
                field="output",
            )
        assert refused.value.field == "output"
        assert str(tmp_path) not in str(refused.value)
    check_output(root / "new", output_format="model", overwrite=False, root=root)


# ---------------------------------------------------------------------------------------------
# Defect 8: stale temporaries of killed bakes are removed before a bake and at start-up


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temporaries(directory: Path, pid: int, name: str = "old") -> tuple[Path, Path]:
    """A bake's temporary directory (with a file) and a control vector's temporary file, both
    named as written by process ``pid``."""
    folder = directory / f".{name}.steer-tmp-{pid}-0123abcd"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    file = directory / f".{name}.gguf.steer-tmp-{pid}-89abcdef"
    file.write_bytes(b"partial")
    return folder, file


def test_stale_temporaries_go_before_a_bake_live_ones_stay(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = tiny
    dead = _temporaries(tmp_path, _dead_pid())
    live = _temporaries(tmp_path, os.getppid(), "other")  # the test runner's parent lives on
    bake(str(source), _recipe("ablate", direction), tmp_path / "out")
    assert not any(path.exists() for path in dead)
    assert all(path.exists() for path in live)


def test_stale_temporaries_go_when_a_server_starts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    dead = _temporaries(root / "baked" / "deep", _dead_pid())
    # this process's PID on a temporary it is not writing: a predecessor in a container that
    # was restarted under the same PID left it
    restarted = _temporaries(root / "restarted", os.getpid())
    live = _temporaries(root / "live", os.getppid())
    SteerServer(make_settings(root)).stop(grace=0)
    assert not any(path.exists() for path in (*dead, *restarted))
    assert all(path.exists() for path in live)
    assert remove_stale_under(root) == []


# ---------------------------------------------------------------------------------------------
# GGUF sources: a cancel while the source is being opened ends the bake at once


def test_cancel_while_opening_a_gguf_source_is_prompt(tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import transformers

    _handle, _source, direction = tiny
    loading, release = threading.Event(), threading.Event()

    def slow_load(*args: object, **kwargs: object) -> None:
        loading.set()
        release.wait(30)  # a long dequantisation
        raise RuntimeError("the load was abandoned")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", slow_load)
    # the stand-in file is no GGUF model; the load it would start is the slow stand-in above
    monkeypatch.setattr("steer.bake.source.check_gguf_model", lambda path: None)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    cancelled = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            bake(str(gguf), _recipe("ablate", direction), tmp_path / "out", cancelled=cancelled)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert loading.wait(30)
        cancelled.set()
        thread.join(10)
        # the bake has returned while the load it started is still blocked (release not set)
        assert not thread.is_alive() and not release.is_set()
        assert len(outcome) == 1 and isinstance(outcome[0], BakeCancelled)
    finally:
        release.set()
        thread.join()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The server: defects 1, 9 and 10 through Bake.Bake


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("safety-root")
    handle = tiny_handle("llama", seed=21)
    handle.model.save_pretrained(root / "tiny-llama")
    handle.tokenizer.save_pretrained(root / "tiny-llama")
    save_vector(root / "artifacts" / "direction", random_vector(4), handle=handle)
    (root / "data").mkdir()
    (root / "data" / "notes.txt").write_text("an operator's notes")
    (root / "operator.txt").write_text("keep me")
    with SteerServer(make_settings(root), models={"tiny": handle}) as server:
        yield server


@pytest.fixture
def client(served: SteerServer) -> Iterator[SteerClient]:
    with SteerClient(served.target, timeout=120) as connected:
        yield connected


RECIPE = 'name = "b"\n[[edits]]\nkind = "ablate"\ndirection = "direction"\n'


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _finished(client: SteerClient, job: jobs_pb2.Job) -> jobs_pb2.Job:
    return list(client.watch_job(job.job_id))[-1]


def _refusal(client: SteerClient, output: str, **options: object) -> Exception:
    with pytest.raises(Exception) as refused:
        client.bake("tiny-llama", RECIPE, output, **options)  # type: ignore[arg-type]
    return refused.value


@pytest.mark.parametrize(
    ("output", "code"),
    [
        (".", "INVALID_ARGUMENT"),
        ("bakeout/..", "INVALID_ARGUMENT"),
        ("artifacts", "INVALID_ARGUMENT"),
        ("artifacts/direction", "INVALID_ARGUMENT"),
        ("artifacts/new", "INVALID_ARGUMENT"),
        ("tiny-llama", "INVALID_ARGUMENT"),
        ("data", "FAILED_PRECONDITION"),
        ("operator.txt/x", "INVALID_ARGUMENT"),
    ],
)
def test_bake_never_replaces_the_root_or_what_the_server_keeps(
    client, served, output, code
) -> None:  # type: ignore[no-untyped-def]
    root = served.settings.models_root
    before = _tree(root)
    refused = _refusal(client, output, overwrite=True)
    assert refused.code.name == code  # type: ignore[attr-defined]
    assert refused.field == "output"  # type: ignore[attr-defined]
    assert str(root.resolve()) not in str(refused)
    assert _tree(root) == before


def test_bake_overwrites_its_own_output_and_not_a_loaded_model(client, served) -> None:  # type: ignore[no-untyped-def]
    first = _finished(client, client.bake("tiny-llama", RECIPE, "baked/mine"))
    assert first.state == jobs_pb2.JOB_STATE_SUCCEEDED, first.error
    refused = _refusal(client, "baked/mine")  # defect 10: at request time, not in the job
    assert refused.code.name == "ALREADY_EXISTS"  # type: ignore[attr-defined]
    assert refused.field == "output"  # type: ignore[attr-defined]
    again = _finished(client, client.bake("tiny-llama", RECIPE, "baked/mine", overwrite=True))
    assert again.state == jobs_pb2.JOB_STATE_SUCCEEDED, again.error
    assert verify(served.settings.models_root / "baked" / "mine") == []
    client.load_model("baked/mine", "mine")
    try:
        refused = _refusal(client, "baked/mine", overwrite=True)
        assert refused.code.name == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
        refused = _refusal(client, "baked", overwrite=True)  # its ancestor
        assert refused.code.name == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    finally:
        client.unload_model("mine")


def test_bake_errors_and_results_name_no_absolute_path(client, served) -> None:  # type: ignore[no-untyped-def]
    root = str(served.settings.models_root.resolve())
    failed = _finished(client, client.bake("data", RECIPE, "baked/from-data"))
    assert failed.state == jobs_pb2.JOB_STATE_FAILED
    assert "data" in failed.error and root not in failed.error
    done = _finished(client, client.bake("tiny-llama", RECIPE, "baked/paths"))
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.result == "baked/paths" and root not in done.result_metadata
    refused = _refusal(client, "baked/paths")
    assert root not in str(refused) and "baked/paths" in str(refused)


def test_bake_request_checks_the_format(client) -> None:  # type: ignore[no-untyped-def]
    request = bake_pb2.BakeRequest(
        model_source="tiny-llama", recipe_toml=RECIPE, output="baked/odd", output_format="onnx"
    )
    refused = _refusal_of(client, request)
    assert refused.code.name == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    assert refused.field == "output_format"  # type: ignore[attr-defined]


def _refusal_of(client: SteerClient, request: bake_pb2.BakeRequest) -> Exception:
    with pytest.raises(Exception) as refused:
        client._call(client._bake.Bake, request)
    return refused.value


def test_the_root_is_intact_after_every_refusal(served) -> None:  # type: ignore[no-untyped-def]
    root = served.settings.models_root
    assert (root / "operator.txt").read_text() == "keep me"
    assert (root / "data" / "notes.txt").read_text() == "an operator's notes"
    assert json.loads((root / "artifacts" / "direction" / "steer.json").read_text())
    assert (root / "tiny-llama" / "config.json").exists()


def test_a_recipe_given_as_a_dict_bakes_through_the_server(client, served) -> None:  # type: ignore[no-untyped-def]
    """The client writes a dict recipe's ``[[edits]]`` as TOML the server reads (its own writer
    once sent ``edits = [{...}]``, JSON that no TOML parser reads)."""
    recipe = {
        "name": "from-a-dict",
        "edits": [{"kind": "ablate", "direction": "direction", "layers": [1, 2], "weight": 0.5}],
    }
    done = _finished(client, client.bake("tiny-llama", recipe, "baked/from-dict"))
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.result == "baked/from-dict"
    record = json.loads(
        (served.settings.models_root / "baked" / "from-dict" / "steer_provenance.json").read_text()
    )
    assert record["recipe"]["name"] == "from-a-dict"
    assert record["recipe"]["edits"][0]["weight"] == 0.5
