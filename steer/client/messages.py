"""Request messages both clients build from keyword arguments: Generate, Features, job recipes.

:func:`generate_request` takes a prompt in any of its kinds and the sampler settings by name; a
direction or bake job's recipe is TOML text, a path on the server, or a dict.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from steer.proto.v1 import features_pb2, generation_pb2


def generate_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | None = None,
    token_ids: Sequence[int] | None = None,
    model: str = "",
    interventions: Sequence[generation_pb2.Intervention] = (),
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    max_new_tokens: int = 0,
    stop: Sequence[str] = (),
    top_logprobs: int = 0,
    compare: bool = False,
    prompt_format: str = "",
    sampling: Mapping[str, Any] | None = None,
    roleplay: Mapping[str, Any] | None = None,
) -> generation_pb2.GenerateRequest:
    """Build a GenerateRequest (exactly one of prompt, messages, token_ids).

    ``sampling`` sets any other SamplingParams field by its name (``repetition_penalty``,
    ``dry_multiplier``, ``logit_bias={id: bias}``, ``banned_strings=[...]``, ...).
    ``roleplay`` is ``{"scene": {...}, "prompt_format": ..., "speaker": ..., "length": ...}``
    (the scene in the shape of recipes/data/rp_scenarios.jsonl), instead of a prompt; with
    ``"card": {...}`` (a SillyTavern card's JSON, :func:`steer.rp.cards.card_to_json`) the
    card is the scene's first character and the scene may leave characters out.
    """
    request = generation_pb2.GenerateRequest(
        model=model,
        interventions=list(interventions),
        max_new_tokens=max_new_tokens,
        stop=list(stop),
        top_logprobs=top_logprobs,
        compare=compare,
    )
    _set_prompt(request, prompt, messages, token_ids, roleplay, prompt_format)
    named = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    _set_sampling(request.sampling, {k: v for k, v in named.items() if v is not None})
    _set_sampling(request.sampling, sampling or {})
    if seed is not None:
        request.seed = seed
    return request


def _set_prompt(
    request: generation_pb2.GenerateRequest,
    prompt: str | None,
    messages: Sequence[Mapping[str, str]] | None,
    token_ids: Sequence[int] | None,
    roleplay: Mapping[str, Any] | None,
    prompt_format: str,
) -> None:
    """The first of the prompt kinds given (none: the server says which to set)."""
    if prompt is not None:
        request.text = prompt
    elif messages is not None:
        request.chat.prompt_format = prompt_format
        for item in messages:
            request.chat.messages.add(role=item["role"], content=item["content"])
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    elif roleplay is not None:
        request.roleplay.scene_json = json.dumps(roleplay.get("scene", {}))
        if roleplay.get("card") is not None:
            request.roleplay.card_json = json.dumps(roleplay["card"])
        request.roleplay.prompt_format = roleplay.get("prompt_format", "")
        request.roleplay.speaker = roleplay.get("speaker", "")
        request.roleplay.length = roleplay.get("length", "")


def _set_sampling(params: generation_pb2.SamplingParams, values: Mapping[str, Any]) -> None:
    """Set SamplingParams fields by their names (a list extends a repeated field)."""
    for name, value in values.items():
        if name == "logit_bias":
            params.logit_bias.update({int(k): float(v) for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            getattr(params, name).extend(value)
        else:
            setattr(params, name, value)


def load_sae_request(
    path: str,
    sae_id: str = "",
    *,
    model: str = "",
    hook: str = "",
    allow_other_model: bool = False,
) -> features_pb2.LoadSaeRequest:
    """``path``: the SAE directory relative to the server's models root."""
    return features_pb2.LoadSaeRequest(
        path=path, sae_id=sae_id, model=model, hook=hook, allow_other_model=allow_other_model
    )


def activations_request(
    sae_id: str, text: str, *, k: int = 0, per_token: bool = False
) -> features_pb2.ActivationsRequest:
    return features_pb2.ActivationsRequest(sae_id=sae_id, text=text, k=k, per_token=per_token)


def search_request(
    sae_id: str, examples: Sequence[str], *, k: int = 0
) -> features_pb2.SearchRequest:
    return features_pb2.SearchRequest(sae_id=sae_id, examples=list(examples), k=k)


def contrast_request(
    sae_id: str, set_a: Sequence[str], set_b: Sequence[str], *, k: int = 0
) -> features_pb2.ContrastRequest:
    return features_pb2.ContrastRequest(sae_id=sae_id, set_a=list(set_a), set_b=list(set_b), k=k)


def feature_info_request(
    sae_id: str,
    feature: int,
    *,
    corpus: Sequence[str] = (),
    num_tokens: int = 0,
    num_snippets: int = 0,
    context_tokens: int = 0,
) -> features_pb2.FeatureInfoRequest:
    """Counts of 0 take the server's defaults (10 tokens, 5 snippets, 12 tokens of context)."""
    return features_pb2.FeatureInfoRequest(
        sae_id=sae_id,
        feature=feature,
        corpus=list(corpus),
        num_tokens=num_tokens,
        num_snippets=num_snippets,
        context_tokens=context_tokens,
    )


def set_recipe(request: Any, recipe: str | Mapping[str, Any]) -> None:
    if isinstance(recipe, Mapping):
        from steer.recipes import toml_text

        request.recipe_toml = toml_text(recipe)
    elif recipe.endswith(".toml") and "\n" not in recipe:
        request.recipe_path = recipe
    else:
        request.recipe_toml = recipe
