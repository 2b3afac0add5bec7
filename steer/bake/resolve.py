"""Recipe resolution: a recipe lowered to interventions and a weight plan.

Also the check that the recipe's directions were made for the source model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.artifacts import VectorArtifact, load_vector
from steer.bake.edits import WeightPlan, build_plan
from steer.bake.options import BakeOptions
from steer.bake.source import Source
from steer.errors import FailedPreconditionError, InvalidArgumentError
from steer.interventions import Intervention
from steer.models import stale_weight_hash_hint
from steer.recipes import AblateEdit, AblationVariant, EditRecipe, FeatureEdit


@dataclass
class ResolvedRecipe:
    plan: WeightPlan
    interventions: list[Intervention]
    artifacts: dict[str, dict[str, Any]]
    approximate: bool


def resolve(recipe: EditRecipe, *, num_layers: int, d_model: int) -> ResolvedRecipe:
    """Lower the recipe to interventions and those to a weight plan."""
    artifacts: dict[str, dict[str, Any]] = {}

    def load(path: Path) -> VectorArtifact:
        artifact = load_vector(path)
        recorded = artifact.metadata.get("d_model") or artifact.vector.d_model
        if int(recorded) != d_model:
            raise InvalidArgumentError(
                f"{path} has d_model {recorded} but the model has {d_model}: it was made for "
                "another model",
                field="direction",
            )
        artifacts[str(path)] = dict(artifact.metadata)
        return artifact

    pairs: list[tuple[Intervention, bool]] = []
    approximate = False
    for index, edit in enumerate(recipe.edits):
        if edit.gate is not None:  # bake_with_options drops gates only when asked to
            raise InvalidArgumentError(
                "weights cannot hold a gate: bake the ungated edit explicitly (ungated=True)",
                field=f"edits[{index}].gate",
            )
    for edit, interventions in recipe.interventions(num_layers, load=load):
        norm_preserving = (
            isinstance(edit, AblateEdit) and edit.variant is AblationVariant.NORM_PRESERVING
        )
        approximate = approximate or isinstance(edit, FeatureEdit)
        pairs.extend((intervention, norm_preserving) for intervention in interventions)
    plan = build_plan(pairs, num_layers, d_model)
    return ResolvedRecipe(plan, [pair[0] for pair in pairs], artifacts, approximate)


def expected_weight_hashes(
    artifacts: dict[str, dict[str, Any]], source: Source, options: BakeOptions
) -> dict[str, str]:
    """{artifact path: the weight hash its sidecar names}, empty when the check is off.

    The cheap part of the identity check fails here, before anything is written: a sidecar that
    names another architecture or layer count (d_model was checked by :func:`resolve`).
    """
    if options.allow_other_model:
        return {}
    num_layers = int(source.config["num_hidden_layers"])
    for path, meta in artifacts.items():
        model = meta.get("model") or {}
        recorded = {
            "architecture": model.get("architecture"),
            "num_layers": model.get("num_layers"),
        }
        actual = {"architecture": source.model_type, "num_layers": num_layers}
        for key, value in recorded.items():
            if value is not None and str(value) != str(actual[key]):
                raise FailedPreconditionError(
                    f"{path} was made for model {model.get('name')!r} ({key} {value}), not "
                    f"{source.name!r} ({key} {actual[key]}); pass allow_other_model "
                    "(--allow-other-model) to use it anyway",
                    field="direction",
                )
    return {
        path: str(meta["model"]["weight_hash"])
        for path, meta in artifacts.items()
        if (meta.get("model") or {}).get("weight_hash")
    }


def check_directions_model(
    expected: dict[str, str],
    artifacts: dict[str, dict[str, Any]],
    source: Source,
    options: BakeOptions,
) -> str | None:
    """Refuse directions whose sidecar names another model's weights. Returns the hash.

    Called when the bake's pass over the source ends: the tensors it read in order were hashed
    on the way (``Source.start_weight_hashes``); only the rest are read again here.
    """
    if not expected:
        return None
    options.report("hashing source weights", 0.0)
    actual = source.weight_hash(lambda f: options.report("hashing source weights", f))
    for path, weight_hash in expected.items():
        if weight_hash != actual:
            model = artifacts[path].get("model") or {}
            raise FailedPreconditionError(
                f"{path} was made for model {model.get('name')!r} (weight hash "
                f"{weight_hash[:12]}…), not {source.name!r} ({actual[:12]}…)"
                f"{stale_weight_hash_hint(model)}; pass allow_other_model "
                "(--allow-other-model) to use it anyway",
                field="direction",
            )
    return actual
