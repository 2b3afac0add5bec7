"""Edit recipes: one typed schema for edits that run at inference time or are baked into weights.

A recipe is a TOML file (or the same structure as a dict) listing edits applied in order::

    name = "qwen-no-refusal"
    description = "Arditi-style abliteration with the refusal direction of layer 14"
    dtype = "bfloat16"                 # optional: output dtype of a baked model

    [[edits]]
    kind = "ablate"                    # ablate | add | feature
    direction = "refusal-direction"    # a steer vector artifact, relative to the recipe file
    variant = "standard"               # standard | projected | norm_preserving
    direction_layer = 14               # use this layer's vector everywhere (a float interpolates)
    weight = 1.0                       # constant per-layer weight ...
    # [edits.kernel]                   # ... or a heretic-style kernel over layers
    # max_weight = 1.0; min_weight = 0.3; peak_layer = 14.0; width = 6.0

    [[edits]]
    kind = "add"
    vector = "cheerful"                # added at blocks.L.hook_resid_post for each listed layer
    strength = 0.3
    layers = [10]

    [edits.gate]                       # optional: only where a condition holds (steer.gates)
    hook = "blocks.8.hook_resid_post"  # read the residual here ...
    direction = "moralizing-trigger"   # ... projected onto this vector artifact's unit ...
    threshold = 2.5                    # ... fires above it (below with below = true)
    scope = "prompt"                   # token | prompt (decided once from the prompt's end)
    # or, instead of hook, several hooks: fires where the weighted sum of their projections
    # (the direction at each hook's layer) is above the threshold, decided at the last of them
    # hooks = ["blocks.8.hook_resid_pre", "blocks.16.hook_resid_pre"]
    # weights = [2.1, 0.9]             # one per hook; 1 each if left out

Every edit converts to steer :class:`~steer.interventions.Intervention` objects
(:meth:`EditRecipe.interventions`); the run-time engine applies those, and :mod:`steer.bake`
turns the very same objects into weight deltas, so the two forms cannot drift apart.
Validation errors name the field, e.g. ``edits[1].strength: must be finite``.

The other two recipe files have names of their own: a ``steer directions`` recipe is a
:class:`~steer.directions.recipe.DirectionRecipe` (``load_direction_recipe``), an SAE training
recipe a :class:`~steer.sae.recipe.SaeRecipe` (``load_sae_recipe``).
"""

from __future__ import annotations

from steer.recipes.files import (
    DTYPES,
    load_edit_recipe,
    parse_edit_recipe,
    recipe_to_dict,
    recipe_to_toml,
    toml_text,
)
from steer.recipes.schema import (
    WEIGHT_ABLATION_KINDS,
    AblateEdit,
    AblationVariant,
    AddEdit,
    Edit,
    EditGate,
    EditKind,
    EditRecipe,
    FeatureEdit,
    Kernel,
)

__all__ = [
    "DTYPES",
    "WEIGHT_ABLATION_KINDS",
    "AblateEdit",
    "AblationVariant",
    "AddEdit",
    "Edit",
    "EditGate",
    "EditKind",
    "EditRecipe",
    "FeatureEdit",
    "Kernel",
    "load_edit_recipe",
    "parse_edit_recipe",
    "recipe_to_dict",
    "recipe_to_toml",
    "toml_text",
]
