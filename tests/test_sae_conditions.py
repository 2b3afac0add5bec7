"""Gates on SAE features (steer.sae.conditions) on tiny random models: the gate fires exactly
where the SAE's own encoder says the feature passes the threshold (every architecture), in every
scope; never-firing is bit-identical to nothing; calibration and ranking read what the gate
reads; recipes and the gRPC service build the same gate, and bad input names its field."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_sae import HOOK, _planted_sae, _random_sae
from test_server import make_settings

from steer import Add, Gated, GateScope, InvalidArgumentError, SteeringVector
from steer.activations import forward
from steer.calibration import ContrastPrompts, read_prompts
from steer.client import NotFound, SteerClient, add, feature_gated
from steer.generation import Engine, GenerationEvent, GenerationRequest
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.recipes import EditRecipe, load_edit_recipe, recipe_to_toml
from steer.sae import SparseAutoencoder, load_sae
from steer.sae.conditions import (
    FeatureCondition,
    choose_feature_gate,
    feature_scores,
    rank_features,
)
from steer.sampling import SamplingConfig
from steer.server import SteerServer

GREEDY = SamplingConfig.greedy_config()
BASE = GenerationRequest(sampling=GREEDY, max_new_tokens=8, top_logprobs=5)
PROMPTS = ("The knight saw the dragon and the sea", "How do I bake bread at home?")
#: the planted feature of :func:`test_sae._planted_sae` fires on " dra" and nowhere else
PLANTED, MARKER = 42, "Ġdra"


def _vector(handle: ModelHandle, seed: int, scale: float = 4.0) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator) * scale)


def _sae(handle: ModelHandle, kind: str) -> SparseAutoencoder:
    return SparseAutoencoder(_random_sae(kind, handle.d_model), HOOK)


def _ids(handle: ModelHandle, text: str) -> list[int]:
    return list(handle.tokenizer(text)["input_ids"])


def _residual(handle: ModelHandle, text: str) -> torch.Tensor:
    read = forward(handle, [_ids(handle, text)], hooks=[HOOK], positions="all")
    residual = read.activations[HOOK][0]
    assert isinstance(residual, torch.Tensor)
    return residual


def _varied_feature(sae: SparseAutoencoder, residual: torch.Tensor) -> tuple[int, float]:
    """The feature that varies most over the tokens, and the threshold halfway between its
    lowest and highest activation (some tokens above it, the others below)."""
    features = sae.encode(residual)
    feature = int(features.std(0).argmax())
    column = features[:, feature]
    assert float(column.max()) > float(column.min())
    return feature, float(column.min() + column.max()) / 2


def _events(
    handle: ModelHandle, interventions: tuple[Intervention, ...]
) -> list[list[GenerationEvent]]:
    return [
        list(Engine(handle).generate([replace(BASE, prompt=p, interventions=interventions)]))
        for p in PROMPTS
    ]


def _tokens_and_logprobs(events: list[GenerationEvent]) -> tuple[list[int], list[object]]:
    return [t for e in events for t in e.token_ids], [e.top_logprobs for e in events]


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_token_gate_edits_exactly_where_the_saes_encoder_says(
    tiny_llama: ModelHandle, kind: str
) -> None:
    sae = _sae(tiny_llama, kind)
    residual = _residual(tiny_llama, PROMPTS[0])
    feature, threshold = _varied_feature(sae, residual)
    fires = sae.encode(residual)[:, feature] > threshold
    vector = _vector(tiny_llama, 3)
    gated = Gated(FeatureCondition(sae, feature, threshold), Add(vector, 1.0, (HOOK,)))
    ids = [_ids(tiny_llama, PROMPTS[0])]
    steered = forward(tiny_llama, ids, interventions=(gated,), hooks=[HOOK], positions="all")
    edited = steered.activations[HOOK][0]
    assert isinstance(edited, torch.Tensor)
    expected = residual + fires[:, None].float() * vector.at(1)
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(edited[~fires], residual[~fires])
    # below flips it: the other tokens
    flipped = Gated(
        FeatureCondition(sae, feature, threshold, below=True), Add(vector, 1.0, (HOOK,))
    )
    other = forward(tiny_llama, ids, interventions=(flipped,), hooks=[HOOK], positions="all")
    other_edited = other.activations[HOOK][0]
    assert isinstance(other_edited, torch.Tensor)
    below = sae.encode(residual)[:, feature] < threshold
    assert bool(below.any()) and not bool((below & fires).any())
    expected_below = residual + below[:, None].float() * vector.at(1)
    torch.testing.assert_close(other_edited, expected_below, rtol=1e-5, atol=1e-5)
    assert torch.equal(other_edited[~below], residual[~below])


def test_planted_feature_gate_acts_on_its_token_only(tiny_llama: ModelHandle) -> None:
    sae = _planted_sae(tiny_llama, MARKER, PLANTED)
    vector = _vector(tiny_llama, 5)
    hook = "blocks.0.hook_resid_post"  # after the condition's hook_embed
    gated = Gated(FeatureCondition(sae, PLANTED), Add(vector, 1.0, (hook,)))
    ids = _ids(tiny_llama, PROMPTS[0])
    marker = tiny_llama.tokenizer.convert_tokens_to_ids(MARKER)
    assert ids.count(marker) == 1
    plain = forward(tiny_llama, [ids], hooks=[hook], positions="all").activations[hook][0]
    steered = forward(tiny_llama, [ids], interventions=(gated,), hooks=[hook], positions="all")
    edited = steered.activations[hook][0]
    assert isinstance(plain, torch.Tensor) and isinstance(edited, torch.Tensor)
    at = ids.index(marker)
    changed = (edited != plain).any(-1).nonzero().flatten().tolist()
    assert changed == [at]


@pytest.mark.parametrize("scope", list(GateScope))
def test_never_firing_feature_gate_is_bit_identical_and_always_firing_equals_the_edit(
    tiny_llama: ModelHandle, scope: GateScope
) -> None:
    sae = _sae(tiny_llama, "topk")
    inner = Add(_vector(tiny_llama, 3), 1.0, (HOOK, "blocks.3.hook_resid_post"))
    never = Gated(FeatureCondition(sae, 0, 1e6), inner, scope)
    always = Gated(FeatureCondition(sae, 0, 1e6, below=True), inner, scope)
    plain, edited = _events(tiny_llama, ()), _events(tiny_llama, (inner,))
    for a, b in zip(plain, _events(tiny_llama, (never,)), strict=True):
        assert _tokens_and_logprobs(a) == _tokens_and_logprobs(b)
    for a, b in zip(edited, _events(tiny_llama, (always,)), strict=True):
        assert _tokens_and_logprobs(a)[0] == _tokens_and_logprobs(b)[0]
    assert _tokens_and_logprobs(plain[0]) != _tokens_and_logprobs(edited[0])


def test_prompt_feature_gate_is_decided_per_row_batched_as_alone(tiny_llama: ModelHandle) -> None:
    sae = _sae(tiny_llama, "standard")
    last = torch.stack([_residual(tiny_llama, p)[-1] for p in PROMPTS])
    activations = sae.encode(last)
    feature = int((activations[0] - activations[1]).abs().argmax())
    first, second = activations[:, feature].tolist()
    assert first != second
    inner = Add(_vector(tiny_llama, 3), 1.0, ("blocks.0.hook_resid_post",))
    gated = Gated(FeatureCondition(sae, feature, (first + second) / 2), inner, GateScope.PROMPT)
    requests = [replace(BASE, prompt=p, interventions=(gated,)) for p in PROMPTS]
    together = Engine(tiny_llama, max_batch=4).run(requests)
    for index, request in enumerate(requests):
        alone = Engine(tiny_llama).run([request])[0]
        assert together[index].token_ids == alone.token_ids
        fired = activations[index, feature] > (first + second) / 2
        expected = replace(request, interventions=(inner,) if fired else ())
        assert alone.token_ids == Engine(tiny_llama).run([expected])[0].token_ids


def test_feature_scores_and_ranking_read_what_the_gate_reads(tiny_llama: ModelHandle) -> None:
    sae = _planted_sae(tiny_llama, MARKER, PLANTED)
    tokenizer = tiny_llama.tokenizer
    marker = tokenizer.convert_tokens_to_ids(MARKER)
    words = ["The knight", "I bake", "A small fox", "Write a poem", "The sea is", "Hello"]
    fire = [[*_ids(tiny_llama, w), marker] for w in words]  # prompts ending in " dra"
    quiet = [_ids(tiny_llama, w) for w in words]
    split = ContrastPrompts(fire=fire, quiet=quiet)
    reads = read_prompts(tiny_llama, ["hook_embed"], train=split, validation=split)
    scores = feature_scores(reads, sae, PLANTED)
    calibration = scores.calibrate(0.0)
    assert calibration.train.true_positive_rate == 1.0
    assert calibration.validation.false_positive_rate == 0.0
    assert scores.hook == "hook_embed"
    ranked = rank_features(reads, sae, target_fpr=0.0, k=sae.num_features)
    assert sorted(r.feature for r in ranked) == list(range(sae.num_features))
    separation = [r.true_positive_rate - r.false_positive_rate for r in ranked]
    assert separation == sorted(separation, reverse=True) and separation[-1] < 1.0
    planted = next(r for r in ranked if r.feature == PLANTED)
    assert (planted.true_positive_rate, planted.false_positive_rate) == (1.0, 0.0)
    assert planted.threshold == calibration.threshold  # set as the gate's calibration sets it
    assert rank_features(reads, sae, target_fpr=0.0, k=2) == ranked[:2]
    # the calibrated gate fires in the engine exactly on the prompts the scores say
    condition = FeatureCondition(sae, PLANTED, calibration.threshold)
    inner = Add(_vector(tiny_llama, 3), 1.0, ("blocks.0.hook_resid_post",))
    gated = Gated(condition, inner, GateScope.PROMPT)
    for ids, should in [(fire[0], True), (quiet[0], False)]:
        request = replace(BASE, prompt_ids=tuple(ids), interventions=(gated,))
        expected = replace(request, interventions=(inner,) if should else ())
        got = Engine(tiny_llama).run([request])[0].token_ids
        assert got == Engine(tiny_llama).run([expected])[0].token_ids


def test_ranking_and_choice_go_by_the_worst_prompt_form(tiny_llama: ModelHandle) -> None:
    """A feature that marks the fire prompts of one form only ranks and is chosen by that
    form's rate (0), not the pooled one (0.5); the rates by form are the gate's on each."""
    sae = _planted_sae(tiny_llama, MARKER, PLANTED)
    marker = tiny_llama.tokenizer.convert_tokens_to_ids(MARKER)
    words = ["The knight", "I bake", "A small fox", "Write a poem", "The sea is", "Hello"]
    fire = [[*_ids(tiny_llama, w), marker] for w in words] + [_ids(tiny_llama, w) for w in words]
    quiet = [_ids(tiny_llama, w + " now") for w in words]
    split = ContrastPrompts(fire=fire, quiet=quiet)
    pooled = read_prompts(tiny_llama, ["hook_embed"], train=split, validation=split)
    forms = {
        f"{part}.{side}": labels
        for part in ("train", "validation")
        for side, labels in (("fire", ("message",) * 6 + ("scene",) * 6), ("quiet", ()))
    }
    reads = replace(pooled, forms=forms)
    flat = {r.feature: r for r in rank_features(pooled, sae, target_fpr=0.0, k=sae.num_features)}
    ranked = rank_features(reads, sae, target_fpr=0.0, k=sae.num_features)
    planted = next(r for r in ranked if r.feature == PLANTED)
    assert planted.true_positive_rate == 0.5 == flat[PLANTED].worst_form_rate
    assert planted.worst_form_rate == 0.0
    keys = [r.worst_form_rate - r.false_positive_rate for r in ranked]
    assert keys == sorted(keys, reverse=True)
    choice = choose_feature_gate(reads, sae, target_fpr=0.0, features=[PLANTED])
    message, scene = choice.forms[PLANTED]["message"], choice.forms[PLANTED]["scene"]
    assert message[0] == 1.0 and scene[0] == 0.0
    assert math.isnan(message[1])  # no quiet prompt is labelled: no rate on that side
    kept = choice.as_dict()["kept"]
    assert kept["validation_by_form"]["message"][0] == 1.0
    assert choose_feature_gate(pooled, sae, target_fpr=0.0, features=[PLANTED]).forms == {
        PLANTED: {}
    }
    # ranked candidates are only features that separate at all: where fire and quiet prompts
    # are the same, none does, and the choice says so instead of keeping a useless one
    same = ContrastPrompts(fire=quiet, quiet=quiet)
    alike = read_prompts(tiny_llama, ["hook_embed"], train=same, validation=same)
    with pytest.raises(InvalidArgumentError) as raised:
        choose_feature_gate(alike, sae, target_fpr=0.0)
    assert raised.value.field == "sae"
    top = choose_feature_gate(reads, sae, target_fpr=0.0, k=sae.num_features)
    assert all(c.train.true_positive_rate > c.train.false_positive_rate for _, c in top.candidates)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda sae: FeatureCondition(sae, 96), "condition.feature"),
        (lambda sae: FeatureCondition(sae, -1), "condition.feature"),
        (lambda sae: FeatureCondition(sae, 0, float("nan")), "condition.threshold"),
        (lambda sae: FeatureCondition("sae", 0), "condition.sae"),  # type: ignore[arg-type]
    ],
)
def test_bad_feature_conditions_name_the_field(
    tiny_llama: ModelHandle, make: object, field: str
) -> None:
    sae = _sae(tiny_llama, "standard")
    with pytest.raises(InvalidArgumentError) as raised:
        make(sae)  # type: ignore[operator]
    assert raised.value.field == field


def test_an_sae_of_another_width_is_refused_where_the_gate_lowers(tiny_llama: ModelHandle) -> None:
    wide = SparseAutoencoder(_random_sae("standard", 32), HOOK)
    gated = Gated(FeatureCondition(wide, 0), Add(_vector(tiny_llama, 3), 1.0, (HOOK,)))
    with pytest.raises(InvalidArgumentError) as raised:
        Engine(tiny_llama).run([replace(BASE, prompt="Hi", interventions=(gated,))])
    assert raised.value.field is not None and raised.value.field.endswith("condition.sae.d_in")


# -- recipes ---------------------------------------------------------------------------------


def _recipe(tmp_path: Path, handle: ModelHandle, gate_toml: str) -> EditRecipe:
    from steer.artifacts import save_vector

    vector = save_vector(tmp_path / "v", _vector(handle, 3), handle=handle, kind="vector")
    text = f'[[edits]]\nkind = "add"\nvector = "{vector}"\nhooks = ["{HOOK}"]\n{gate_toml}'
    return load_edit_recipe(text)


def test_recipe_feature_gate_equals_the_gate_in_process(
    tiny_llama: ModelHandle, tmp_path: Path
) -> None:
    _random_sae("jumprelu", tiny_llama.d_model).save_model(tmp_path / "sae")
    sae_dir = tmp_path / "sae"
    gate = f'[edits.gate]\nsae = "{sae_dir}"\nfeature = 5\nthreshold = 0.1\nscope = "prompt"\n'
    recipe = _recipe(tmp_path, tiny_llama, gate)
    built = recipe.for_model(tiny_llama)
    assert len(built) == 1 and isinstance(built[0], Gated)
    condition = built[0].condition
    assert isinstance(condition, FeatureCondition) and condition.feature == 5
    assert condition.threshold == 0.1 and built[0].scope is GateScope.PROMPT
    # written back and read again: the same gate
    again = load_edit_recipe(recipe_to_toml(recipe))
    assert again.edits[0].gate == recipe.edits[0].gate
    sae = load_sae(tmp_path / "sae")
    vector = recipe.for_model(tiny_llama)[0]
    assert isinstance(vector, Gated)
    by_hand = Gated(FeatureCondition(sae, 5, 0.1), vector.inner, GateScope.PROMPT)
    for prompt in PROMPTS:
        ours = Engine(tiny_llama).run([replace(BASE, prompt=prompt, interventions=(vector,))])
        theirs = Engine(tiny_llama).run([replace(BASE, prompt=prompt, interventions=(by_hand,))])
        assert ours[0].token_ids == theirs[0].token_ids


@pytest.mark.parametrize(
    ("gate", "field"),
    [
        ('direction = "d"\nsae = "SAE"\nfeature = 1\nthreshold = 0', "edits[0].gate.direction"),
        ('sae = "SAE"\nthreshold = 0', "edits[0].gate.feature"),
        ('feature = 1\ndirection = "d"\nthreshold = 0', "edits[0].gate.feature"),
        ('sae = "SAE"\nfeature = -2\nthreshold = 0', "edits[0].gate.feature"),
        ('sae = "SAE"\nfeature = 1\nhooks = ["a", "b"]\nthreshold = 0', "edits[0].gate.hooks"),
        ('sae = "SAE"\nfeature = 999\nthreshold = 0', "edits[0].gate.feature"),
        (
            'sae = "SAE"\nfeature = 1\nhook = "blocks.0.hook_resid_post"\nthreshold = 0',
            "edits[0].gate.hook",
        ),
        ('sae = "missing"\nfeature = 1\nthreshold = 0', "edits[0].gate.sae"),
    ],
)
def test_bad_recipe_feature_gates_name_the_field(
    tiny_llama: ModelHandle, tmp_path: Path, gate: str, field: str
) -> None:
    _random_sae("standard", tiny_llama.d_model).save_model(tmp_path / "sae")
    text = "[edits.gate]\n" + gate.replace("SAE", str(tmp_path / "sae")) + "\n"
    with pytest.raises(Exception) as raised:
        _recipe(tmp_path, tiny_llama, text).for_model(tiny_llama)
    assert getattr(raised.value, "field", None) == field, raised.value


# -- over gRPC -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("feature-gates")
    _random_sae("topk", tiny_llama.d_model).save_model(root / "saes" / "resid")
    with SteerServer(make_settings(root), models={"tiny": tiny_llama}) as server:
        with SteerClient(server.target, timeout=60) as client:
            client.load_sae("saes/resid")
        yield server


def test_feature_gate_over_grpc_equals_the_engine(
    served: SteerServer, tiny_llama: ModelHandle
) -> None:
    sae = load_sae(served.settings.models_root / "saes" / "resid")
    residual = _residual(tiny_llama, PROMPTS[0])
    feature, threshold = _varied_feature(sae, residual)
    vector = _vector(tiny_llama, 3)
    local = Gated(FeatureCondition(sae, feature, threshold), Add(vector, 1.0, (HOOK,)))
    inner = add(vector, 1.0, hooks=[HOOK])
    remote = feature_gated(inner, "resid", feature, threshold)
    with SteerClient(served.target, timeout=60) as client:
        for prompt in PROMPTS:
            events = list(
                client.generate(prompt, temperature=0, max_new_tokens=8, interventions=[remote])
            )
            tokens = [t for e in events for t in e.token_ids]
            request = replace(BASE, prompt=prompt, interventions=(local,))
            assert tuple(tokens) == Engine(tiny_llama).run([request])[0].token_ids


@pytest.mark.parametrize(
    ("sae_id", "feature", "hooks", "error", "field"),
    [
        ("nope", 0, (), NotFound, "interventions[0].gated.condition.feature.sae_id"),
        ("resid", 96, (), InvalidArgumentError, "interventions[0].gated.condition.feature.feature"),
        ("resid", 0, ("a", "b"), InvalidArgumentError, "interventions[0].gated.condition.hooks"),
        ("", 0, (), InvalidArgumentError, "interventions[0].gated.condition.feature.sae_id"),
    ],
)
def test_bad_feature_gates_over_grpc_name_the_field(
    served: SteerServer,
    tiny_llama: ModelHandle,
    sae_id: str,
    feature: int,
    hooks: tuple[str, ...],
    error: type[Exception],
    field: str,
) -> None:
    message = feature_gated(add(_vector(tiny_llama, 3), 1.0, hooks=[HOOK]), sae_id, feature)
    message.gated.condition.hooks.extend(hooks)
    with SteerClient(served.target, timeout=60) as client:
        with pytest.raises(error) as raised:
            list(client.generate("Hi", max_new_tokens=2, interventions=[message]))
        assert getattr(raised.value, "field", None) == field
        still = client.generate("Hi", temperature=0, max_new_tokens=2)  # greedy: no early EOS
        assert len(list(still)) == 2  # still serving


# -- steer directions gate --sae ------------------------------------------------------------


def test_gate_cli_with_an_sae_writes_the_feature_gate_validation_kept(
    tiny_llama: ModelHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gate_setup import contrast_setup, run_gate

    from steer.activations import encode_chat
    from steer.directions.gating import gate_splits
    from steer.directions.recipe import load_direction_recipe

    setup = contrast_setup(tiny_llama, tmp_path)
    sae_dir = tmp_path / "sae"
    _random_sae("topk", tiny_llama.d_model, hook="blocks.2.hook_resid_pre").save_model(sae_dir)
    assert run_gate(setup, "--sae", str(sae_dir), "--top-features", "5", "--target-fpr", "0.2") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kept, candidates = report["kept"], report["candidates"]
    assert report["condition"] == "feature" and len(candidates) == 5

    def separation(c: dict) -> tuple[float, float]:
        v = c["validation"]
        return (v["true_positive_rate"] - v["false_positive_rate"], -v["false_positive_rate"])

    assert separation(kept) == max(separation(c) for c in candidates)
    recipe = load_edit_recipe(report["recipe"])
    gate = recipe.edits[0].gate
    assert gate is not None and gate.feature == report["feature"] and gate.sae == str(sae_dir)
    assert gate.threshold == kept["threshold"] and gate.scope is GateScope.PROMPT
    # the validation figures are the feature's activations at the prompts' last tokens
    sae = load_sae(sae_dir)
    splits = gate_splits(load_direction_recipe(setup["recipe"]))
    hook = sae.hook_name
    for side, key in (("positive", "true_positive_rate"), ("negative", "false_positive_rate")):
        ids = [encode_chat(tiny_llama, p) for p in splits[side].validation]
        last = forward(tiny_llama, ids, hooks=[hook]).activations[hook]
        assert isinstance(last, torch.Tensor)
        active = sae.encode(last)[:, gate.feature] > gate.threshold
        assert kept["validation"][key] == float(active.float().mean())
    # the written recipe runs: its gate is a FeatureCondition on that feature
    built = recipe.for_model(tiny_llama)
    assert built and all(isinstance(i, Gated) for i in built)
    assert {type(i.condition) for i in built if isinstance(i, Gated)} == {FeatureCondition}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (("--features", "3"), "features"),  # without --sae
        (("--sae", "SAE", "--summed"), "summed"),
        (("--sae", "SAE", "--hooks", "blocks.1.hook_resid_pre"), "hooks"),
        (("--sae", "SAE", "--condition", "discriminant"), "condition"),
        (("--sae", "SAE", "--features", "500"), "features[0]"),
        (("--sae", "missing"), "sae"),
    ],
)
def test_gate_cli_feature_options_are_checked(
    tiny_llama: ModelHandle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    field: str,
) -> None:
    from gate_setup import contrast_setup, run_gate

    setup = contrast_setup(tiny_llama, tmp_path)
    _random_sae("topk", tiny_llama.d_model).save_model(tmp_path / "sae")
    args = [str(tmp_path / "sae") if a == "SAE" else a for a in extra]
    assert run_gate(setup, *args) == 1
    assert field in capsys.readouterr().err
    assert not setup["out"].exists()
