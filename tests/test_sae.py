"""SAE loading, features and sliders on tiny random models (fast, exact)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from tiny import tiny_handle

from steer.activations import forward
from steer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from steer.generation import Engine, GenerationRequest
from steer.interventions import Add, Intervention, Phase, RowFunction
from steer.models import ModelHandle
from steer.sae import AddDecoder, Clamp, Scale, SparseAutoencoder, decoder_direction, load_sae
from steer.sae.features import contrast, encode_texts, feature_info, search, top_features
from steer.sae.sliders import _edit_function
from steer.sae.training import Splice, TrainingConfig, evaluate, save, tokenize, train_on_texts
from steer.sampling import SamplingConfig

HOOK = "blocks.1.hook_resid_post"
TEXTS = [
    "The knight drew her sword; the dragon laughed and breathed fire.",
    "How do I bake bread at home? Use flour, water, salt and yeast.",
    "Write a short poem about the sea and the moon.",
    "I'm sorry, but I can't help with that request.",
]


def _random_sae(kind: str, d_in: int, d_sae: int = 96, hook: str = HOOK, seed: int = 0) -> SAE:
    """A SAELens SAE with random weights (an untrained SAE is still an exact test subject)."""
    torch.manual_seed(seed)
    config: StandardSAEConfig | TopKSAEConfig | JumpReLUSAEConfig
    if kind == "standard":
        config = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
        sae: SAE = StandardSAE(config)
    elif kind == "topk":
        config = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=8)
        sae = TopKSAE(config)
    else:
        config = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae)
        sae = JumpReLUSAE(config)
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            if name == "threshold":
                parameter.fill_(0.05)
            elif parameter.ndim == 1:
                parameter.normal_(0, 0.05)
            else:
                parameter.normal_(0, 0.3)
    return sae


@pytest.fixture(scope="module")
def llama() -> ModelHandle:
    return tiny_handle("llama")


@pytest.fixture(scope="module", params=["standard", "topk", "jumprelu"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    sae = _random_sae(request.param, 64)
    directory = tmp_path_factory.mktemp(f"sae-{request.param}")
    sae.save_model(directory)
    return sae, directory


def _ids(handle: ModelHandle, texts: list[str]) -> list[list[int]]:
    return [list(handle.tokenizer(text)["input_ids"]) for text in texts]


def _hidden(handle: ModelHandle, ids: list[int], layer: int) -> torch.Tensor:
    """Residual stream after block ``layer`` straight from transformers (no steer hooks)."""
    output = handle.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return output.hidden_states[layer + 1][0].detach()


# --- loading and encode/decode -------------------------------------------------------------


def test_encode_decode_match_saelens(llama: ModelHandle, saved) -> None:  # type: ignore[no-untyped-def]
    reference, directory = saved
    sae = load_sae(directory, llama)
    assert sae.hook_name == HOOK and sae.num_features == 96 and sae.d_in == 64
    ids = _ids(llama, TEXTS[:1])
    read = forward(llama, ids, hooks=[HOOK], positions="all").activations[HOOK][0]
    assert isinstance(read, torch.Tensor)
    # the activations steer reads are the model's own hidden states (block 1 output) ...
    torch.testing.assert_close(read, _hidden(llama, ids[0], 1), rtol=0, atol=1e-5)
    # ... and encoding/decoding them gives exactly what SAELens' own SAE gives
    with torch.no_grad():
        expected_features = reference.encode(read)
        expected_reconstruction = reference.decode(expected_features)
    assert torch.equal(sae.encode(read), expected_features)
    assert torch.equal(sae.decode(sae.encode(read)), expected_reconstruction)
    assert (expected_features > 0).any()


def test_pickled_sae_encodes_and_decodes_alike(llama: ModelHandle, saved) -> None:  # type: ignore[no-untyped-def]
    """vLLM's tensor-parallel workers get SAEs pickled; SAELens' SAE alone cannot be."""
    sae = load_sae(saved[1], llama)
    back = pickle.loads(pickle.dumps(sae))
    assert type(back.sae) is type(sae.sae) and back.path == sae.path
    assert back.metadata == sae.metadata and back.hook_name == sae.hook_name
    read = torch.randn(5, 64)
    assert torch.equal(back.encode(read), sae.encode(read))
    assert torch.equal(back.decode(back.encode(read)), sae.decode(sae.encode(read)))


def test_clamp_matches_saelens_error_term_splice(llama: ModelHandle, saved) -> None:  # type: ignore[no-untyped-def]
    """Clamp == SAELens' own forward with use_error_term and the feature set by a hook."""
    reference, directory = saved
    sae = load_sae(directory, llama)
    ids = _ids(llama, TEXTS[:2])
    clean = forward(llama, ids, hooks=[HOOK], positions="all")
    steered = forward(llama, ids, hooks=[HOOK], positions="all", interventions=[Clamp(sae, 7, 2.5)])
    reference.use_error_term = True

    def set_feature(acts: torch.Tensor, hook: object) -> torch.Tensor:
        acts = acts.clone()
        acts[..., 7] = 2.5
        return acts

    for x, x_steered in zip(clean.activations[HOOK], steered.activations[HOOK], strict=True):
        with torch.no_grad(), reference.hooks(fwd_hooks=[("hook_sae_acts_post", set_feature)]):
            expected = reference(x)
        torch.testing.assert_close(x_steered, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(x_steered, x)


def test_clamp_sets_feature_at_covered_positions(llama: ModelHandle) -> None:
    sae = SparseAutoencoder(_random_sae("standard", 64), HOOK)
    ids = _ids(llama, TEXTS)
    clean = forward(llama, ids, hooks=[HOOK], positions="all").activations[HOOK]
    clamped = forward(
        llama, ids, hooks=[HOOK], positions="all", interventions=[Clamp(sae, 3, 4.0)]
    ).activations[HOOK]
    direction = sae.direction(3)
    for x, x_new in zip(clean, clamped, strict=True):
        features = sae.encode(x)
        # x' = decode(f with f_3 = 4) + error, i.e. x + (4 - f_3) * direction, token by token
        expected = x + (4.0 - features[:, 3:4]) * direction
        torch.testing.assert_close(x_new, expected, rtol=1e-5, atol=1e-5)
        # every other feature's pre-edit value is what the reconstruction still carries
        edited = features.clone()
        edited[:, 3] = 4.0
        torch.testing.assert_close(x_new - (x - sae.decode(features)), sae.decode(edited))
    # prompt-phase forward: a generated-only clamp changes nothing
    untouched = forward(
        llama,
        ids,
        hooks=[HOOK],
        positions="all",
        interventions=[Clamp(sae, 3, 4.0, phase=Phase.GENERATED)],
    ).activations[HOOK]
    for x, x_new in zip(clean, untouched, strict=True):
        assert torch.equal(x, x_new)


class _Forced(Intervention):
    """Runs a slider's lowered function even at its neutral value (bypasses is_noop)."""

    def __init__(self, inner: Intervention) -> None:
        self.inner = inner

    def lower(self, resolver, d_model):  # type: ignore[no-untyped-def]
        return self.inner.lower(resolver, d_model)


def _assert_neutral(handle: ModelHandle, sae: SparseAutoencoder) -> None:
    ids = _ids(handle, TEXTS)
    baseline = forward(handle, ids, logits="all").logits
    assert isinstance(baseline, list)
    # Forced: the encode/edit/decode arithmetic itself must be exact, not only is_noop()
    for slider in (_Forced(Scale(sae, 5, 1.0)), _Forced(AddDecoder(sae, 5, 0.0))):
        logits = forward(handle, ids, logits="all", interventions=[slider]).logits
        assert isinstance(logits, list)
        for expected, got in zip(baseline, logits, strict=True):
            assert torch.equal(expected, got), slider
    assert Scale(sae, 5, 1.0).is_noop() and AddDecoder(sae, 5, 0.0).is_noop()
    moved = forward(handle, ids, logits="all", interventions=[Clamp(sae, 5, 6.0)]).logits
    assert isinstance(moved, list)
    assert not torch.equal(moved[0], baseline[0])


def test_neutral_slider_is_bit_identical(tiny: ModelHandle) -> None:
    hook = "blocks.2.hook_resid_post"
    _assert_neutral(tiny, SparseAutoencoder(_random_sae("standard", tiny.d_model, hook=hook), hook))


def test_neutral_topk_slider_is_bit_identical(llama: ModelHandle) -> None:
    hook = "blocks.2.hook_mlp_out"
    _assert_neutral(llama, SparseAutoencoder(_random_sae("topk", 64, hook=hook), hook))


def test_add_decoder_equals_decoder_direction_vector(llama: ModelHandle) -> None:
    sae = SparseAutoencoder(_random_sae("topk", 64), HOOK)
    ids = _ids(llama, TEXTS)
    vector = decoder_direction(sae, 11)
    assert vector.layers == (1,)
    via_slider = forward(llama, ids, logits="last", interventions=[AddDecoder(sae, 11, 3.0)])
    via_vector = forward(llama, ids, logits="last", interventions=[Add(vector, 3.0, hooks=(HOOK,))])
    assert isinstance(via_slider.logits, torch.Tensor)
    assert isinstance(via_vector.logits, torch.Tensor)
    assert torch.equal(via_slider.logits, via_vector.logits)
    # and both equal "feature 11 += 3" through the encode/edit/decode (RowFunction) path

    class PlusThree(Intervention):
        def lower(self, resolver, d_model):  # type: ignore[no-untyped-def]
            point = resolver.parse(HOOK)
            return [(point, RowFunction(_edit_function(sae, 11, lambda acts: acts + 3.0)))]

    via_edit = forward(llama, ids, logits="last", interventions=[PlusThree()])
    assert via_edit.logits is not None
    torch.testing.assert_close(via_edit.logits, via_slider.logits, rtol=1e-4, atol=1e-4)


def test_sliders_in_batched_generation_match_sequential(llama: ModelHandle) -> None:
    sae = SparseAutoencoder(_random_sae("standard", 64), HOOK)
    sliders = [
        (),
        (Clamp(sae, 2, 3.0),),
        (Scale(sae, 4, 0.0), AddDecoder(sae, 9, 2.0, phase=Phase.GENERATED)),
        (Clamp(sae, 2, 3.0, phase=Phase.PROMPT),),
    ]
    requests = [
        GenerationRequest(
            prompt=TEXTS[index % len(TEXTS)],
            interventions=row,
            sampling=SamplingConfig(temperature=0.0),
            max_new_tokens=6,
            request_id=f"r{index}",
        )
        for index, row in enumerate(sliders)
    ]
    batched = Engine(llama, max_batch=4).run(requests)
    sequential = [Engine(llama, max_batch=1).run([request])[0] for request in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in sequential]
    assert (
        batched[1].token_ids != batched[0].token_ids or batched[2].token_ids != batched[0].token_ids
    )


def test_speaker_scoped_slider(llama: ModelHandle) -> None:
    sae = SparseAutoencoder(_random_sae("standard", 64), HOOK)
    ids = tuple(_ids(llama, TEXTS[:1])[0])
    speakers = tuple("Alice" if i % 2 else "Bob" for i in range(len(ids)))

    def first_logprobs(slider: tuple[Intervention, ...]) -> tuple[tuple[int, float], ...]:
        request = GenerationRequest(
            prompt_ids=ids,
            interventions=slider,
            speakers=speakers,
            speaker="Alice",
            sampling=SamplingConfig(temperature=0.0),
            max_new_tokens=1,
            top_logprobs=5,
        )
        events = list(Engine(llama).generate([request]))
        return events[0].top_logprobs

    baseline = first_logprobs(())
    assert first_logprobs((Clamp(sae, 2, 5.0, speaker="Carol"),)) == baseline
    assert first_logprobs((Clamp(sae, 2, 5.0, speaker="Alice"),)) != baseline


# --- features ---------------------------------------------------------------------------------


def _planted_sae(handle: ModelHandle, token: str, feature: int) -> SparseAutoencoder:
    """A standard SAE on the token embeddings whose feature ``feature`` detects ``token``."""
    sae = _random_sae("standard", handle.d_model, hook="hook_embed")
    token_id = handle.tokenizer.convert_tokens_to_ids(token)
    embeddings = handle.model.get_input_embeddings().weight
    assert isinstance(embeddings, torch.Tensor)
    embedding = embeddings[token_id].detach().float()
    with torch.no_grad():
        sae.b_dec.zero_()
        # fires (strongly) only where x . e_hat > |e| / 2, i.e. on the token itself
        sae.W_enc[:, feature] = 20 * embedding / embedding.norm()
        sae.b_enc[feature] = -10 * float(embedding.norm())
    return SparseAutoencoder(sae, "hook_embed")


def test_contrast_finds_planted_feature(llama: ModelHandle) -> None:
    marker = "Ġdra"  # " dragon" is " dra" + "gon" in the tiny tokenizer
    assert marker in llama.tokenizer.get_vocab()
    sae = _planted_sae(llama, marker, 42)
    with_marker = [
        f"{s} the dragon" for s in ("Write a poem", "The knight saw", "I bake bread near")
    ]
    with_marker += ["A dragon sleeps.", "The dragon laughed.", "Sure! a dragon story."]
    without = ["Write a poem", "The knight saw the sea", "I bake bread", "The fox jumps."]
    without += ["Sure! Here is a story.", "How do I bake bread?"]
    ranked = contrast(llama, sae, with_marker, without, k=5)
    assert ranked[0].feature == 42
    assert ranked[0].score > 0 and ranked[0].auroc == 1.0
    assert ranked[0].mean_activation_b == 0.0
    # reversed sets: same feature, negative score
    assert contrast(llama, sae, without, with_marker, k=1)[0].feature == 42
    assert contrast(llama, sae, without, with_marker, k=1)[0].score < 0
    # search and top find it too, and info shows where it fires
    assert 42 in [r.feature for r in search(llama, sae, with_marker, k=3)]
    assert 42 in [r.feature for r in top_features(llama, sae, "The dragon laughed.", k=5)]
    info = feature_info(llama, sae, 42, corpus=with_marker + without, num_snippets=3)
    assert len(info.top_snippets) == 3
    assert all("[[ dra]]" in snippet.marked for snippet in info.top_snippets)
    assert info.density is not None and 0 < info.density < 0.5
    assert info.decoder_norm == pytest.approx(float(sae.sae.W_dec[42].norm()), rel=1e-5)
    assert len(info.promoted) == 10 and info.promoted[0][1] >= info.promoted[-1][1]


def test_per_token_top_features(llama: ModelHandle) -> None:
    sae = _planted_sae(llama, "Ġdra", 42)
    (encoded,) = encode_texts(llama, sae, ["The dragon laughed."])
    per_token = encoded.top_per_token(3)
    assert len(per_token) == len(encoded.tokens)
    dragon = encoded.tokens.index("Ġdra")
    assert 42 in [feature for feature, _ in per_token[dragon]]
    assert all(42 not in [f for f, _ in row] for i, row in enumerate(per_token) if i != dragon)


# --- training, saving, metrics -------------------------------------------------------------


def test_train_save_load_round_trip(llama: ModelHandle, tmp_path: Path) -> None:
    texts = TEXTS * 12 + [f"{a} {b}" for a in TEXTS for b in TEXTS]
    config = TrainingConfig(
        hook=HOOK,
        tokens=16_000,
        buffer_tokens=2_000,
        d_sae=128,
        k=8,
        batch_size=128,
        learning_rate=2e-3,
    )
    run = train_on_texts(llama, texts, config)
    metrics = run.metrics
    assert metrics.l0 == pytest.approx(8.0, abs=0.01)
    assert metrics.explained_variance > 0.5  # an untrained SAE scores below 0
    assert metrics.ce_clean > 0 and metrics.ce_zero > 0
    save(run.sae, tmp_path / "sae", handle=llama, metrics=metrics.to_dict())
    sidecar = json.loads((tmp_path / "sae" / "steer_sae.json").read_text())
    assert sidecar["model"]["weight_hash"] == llama.weight_hash
    loaded = load_sae(tmp_path / "sae", llama)
    x = torch.randn(5, 64)
    assert torch.equal(loaded.encode(x), run.sae.encode(x))
    # the sidecar ties the SAE to these weights
    other = tiny_handle("llama", seed=1)
    with pytest.raises(FailedPreconditionError):
        load_sae(tmp_path / "sae", other)
    assert load_sae(tmp_path / "sae", other, allow_other_model=True).num_features == 128


def test_splice_of_exact_sae_keeps_cross_entropy(llama: ModelHandle) -> None:
    """An SAE that reconstructs exactly (identity dictionary) must leave CE unchanged."""
    config = StandardSAEConfig(d_in=64, d_sae=128, apply_b_dec_to_input=False)
    identity = StandardSAE(config)
    with torch.no_grad():
        eye = torch.eye(64)
        identity.W_enc.copy_(torch.cat([eye, -eye], 1))
        identity.W_dec.copy_(torch.cat([eye, -eye], 0))
        identity.b_enc.zero_()
        identity.b_dec.zero_()
    sae = SparseAutoencoder(identity, HOOK)
    prompts = tokenize(llama, TEXTS, 64)
    metrics = evaluate(llama, sae, prompts)
    assert metrics.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert metrics.ce_spliced == pytest.approx(metrics.ce_clean, abs=1e-4)
    assert abs(metrics.ce_zero - metrics.ce_clean) > 1e-3
    assert metrics.ce_change == pytest.approx(0.0, abs=1e-4)
    assert Splice(sae).lower(llama.resolver, 64)[0][0].name == HOOK


# --- errors -------------------------------------------------------------------------------


def test_bad_input_is_a_typed_error_naming_the_field(
    llama: ModelHandle, saved, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    reference, directory = saved
    with pytest.raises(NotFoundError) as missing:
        load_sae(tmp_path)
    assert missing.value.field == "sae"
    wide = _random_sae("standard", 32)
    wide.save_model(tmp_path / "wide")
    with pytest.raises(InvalidArgumentError) as width:
        load_sae(tmp_path / "wide", llama)
    assert width.value.field == "sae.d_in"
    deep = _random_sae("standard", 64, hook="blocks.9.hook_resid_post")
    deep.save_model(tmp_path / "deep")
    with pytest.raises(InvalidArgumentError) as layer:
        load_sae(tmp_path / "deep", llama)
    assert layer.value.field == "sae.hook_name"
    config = json.loads((directory / "cfg.json").read_text())
    (tmp_path / "tc").mkdir()
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps({**config, "architecture": "transcoder"}))
    (tmp_path / "tc" / "sae_weights.safetensors").write_bytes(
        (directory / "sae_weights.safetensors").read_bytes()
    )
    with pytest.raises(InvalidArgumentError) as architecture:
        load_sae(tmp_path / "tc")
    assert architecture.value.field == "sae.architecture"
    sae = load_sae(directory, llama)
    for make, field in [
        (lambda: Clamp(sae, 96, 1.0), "feature"),
        (lambda: Clamp(sae, -1, 1.0), "feature"),
        (lambda: Clamp(sae, 1, float("nan")), "value"),
        (lambda: Scale(sae, 1, float("inf")), "value"),
        (lambda: AddDecoder(sae, 1, "strong"), "value"),  # type: ignore[arg-type]
        (lambda: Clamp(sae, 1, 1.0, phase="later"), "phase"),  # type: ignore[arg-type]
        (lambda: TrainingConfig(hook=HOOK, architecture="magic"), "architecture"),
        (lambda: TrainingConfig(hook=HOOK, d_sae=0), "d_sae"),
        (lambda: TrainingConfig(hook=HOOK, k=500, d_sae=100), "k"),
    ]:
        with pytest.raises(InvalidArgumentError) as error:
            make()
        assert error.value.field == field
    gemma_width = tiny_handle("gemma2")
    assert gemma_width.d_model == 64  # same width, so the hook is what is checked
    with pytest.raises(InvalidArgumentError) as wrong_hook:
        forward(
            llama,
            _ids(llama, TEXTS[:1]),
            interventions=[Clamp(SparseAutoencoder(reference, "blocks.7.hook_mlp_out"), 1, 1.0)],
        )
    assert wrong_hook.value.field == "sae.hook_name"


# --- CLI and recipes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    llama.model.save_pretrained(directory)
    llama.tokenizer.save_pretrained(directory)
    return directory


def test_cli_train_then_features(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from steer.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS * 10))
    out = tmp_path / "sae"
    argv = ["sae", "train", "--model", str(model_dir), "--hook", HOOK, "--corpus", str(corpus)]
    argv += ["--tokens", "4000", "--d-sae", "64", "--k", "4", "--batch-size", "128"]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["metrics"]["l0"] == pytest.approx(4.0, abs=0.01)
    assert (out / "cfg.json").is_file() and (out / "steer_sae.json").is_file()

    common = ["--model", str(model_dir), "--sae", str(out), "--json", "-k", "3"]
    assert main(["features", "top", *common, "--text", TEXTS[0], "--per-token"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert top["hook"] == HOOK and 1 <= len(top["features"]) <= 3
    assert len(top["tokens"]) == len(tiny_handle("llama").tokenizer(TEXTS[0])["input_ids"])
    feature = top["features"][0]["feature"]
    assert (
        main(["features", "info", *common, "--feature", str(feature), "--corpus", str(corpus)]) == 0
    )
    info = json.loads(capsys.readouterr().out)["feature"]
    assert info["feature"] == feature and info["top_snippets"] and len(info["promoted"]) == 3
    set_a, set_b = tmp_path / "a.txt", tmp_path / "b.txt"
    set_a.write_text("\n\n".join(TEXTS[:2]))
    set_b.write_text("\n\n".join(TEXTS[2:]))
    assert main(["features", "contrast", *common, "--a", str(set_a), "--b", str(set_b)]) == 0
    assert json.loads(capsys.readouterr().out)["features"][0]["auroc"] in (0.0, 1.0)
    assert main(["features", "search", *common, "--example", TEXTS[0], "--example", TEXTS[1]]) == 0
    assert json.loads(capsys.readouterr().out)["features"]
    # bad input: a typed error naming the field, exit status 1, nothing written
    assert main(["features", "info", *common, "--feature", "64"]) == 1
    assert "feature" in capsys.readouterr().err
    assert main([*argv[:-2], "--tokens", "0", "--out", str(tmp_path / "never")]) == 1
    assert "tokens" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_recipe_is_validated_with_field_names(tmp_path: Path) -> None:
    from steer.sae.recipe import load_sae_recipe

    shipped = load_sae_recipe(
        Path(__file__).resolve().parent.parent / "recipes" / "sae-smollm2.toml"
    )
    assert shipped.training.hook.startswith("blocks.") and shipped.corpus.generated
    assert shipped.corpus.prompts is not None and shipped.corpus.prompts.is_file()
    assert all(file.is_file() for file in shipped.corpus.files)
    cases = {
        '[sae]\nhook = "blocks.1.hook_resid_post"\nwidth = 3\n[corpus]\nfiles = ["x"]\n': "width",
        '[sae]\nhook = "blocks.1.hook_resid_post"\nk = -1\n[corpus]\nfiles = ["x"]\n': "k",
        '[corpus]\ngenerated = true\n[sae]\nhook = "blocks.1.hook_resid_post"\n': "prompts",
        '[modle]\nname = "x"\n': "modle",
    }
    for text, field in cases.items():
        path = tmp_path / "recipe.toml"
        path.write_text(text)
        with pytest.raises(InvalidArgumentError) as error:
            load_sae_recipe(path)
        assert error.value.field == field, text


def test_generated_corpus_is_seeded_chat_transcripts(llama: ModelHandle, tmp_path: Path) -> None:
    from steer.sae.corpus import generate_corpus, read_corpus, read_prompts

    prompts = ["Write a poem", "Bake bread"]
    first = generate_corpus(llama, prompts, max_new_tokens=4, seed=3)
    assert first == generate_corpus(llama, prompts, max_new_tokens=4, seed=3)
    assert all(
        text.startswith("<|im_start|>user\n" + p) for text, p in zip(first, prompts, strict=True)
    )
    (tmp_path / "p.txt").write_text("# comment\nWrite a poem\n\nBake bread\n")
    assert read_prompts(tmp_path / "p.txt") == prompts
    (tmp_path / "c.jsonl").write_text('"plain"\n{"text": "t"}\n{"prompt": "q", "response": "a"}\n')
    assert read_corpus(tmp_path / "c.jsonl") == ["plain", "t", "q\na"]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(InvalidArgumentError) as error:
        read_corpus(tmp_path / "bad.jsonl")
    assert error.value.field == "corpus"
