"""Proto messages <-> steer domain objects, split by service: the only package that knows both.

* ``generation``    -- Generate: request -> :class:`GenerationPlan`, engine event -> response
* ``interventions`` -- proto interventions (artifacts, inline vectors, SAE and named sliders)
* ``sampling``      -- SamplingParams <-> :class:`~steer.sampling.SamplingConfig`
* ``models``        -- ModelInfo, SliderInfo
* ``features``      -- SAEs, ranked features, activations, feature descriptions
* ``directions``    -- artifacts, their files, jobs

The enum tables (phases, slider modes, finish reasons) are :mod:`steer.wire`'s, shared with the
client. Errors raised here name the request field in proto terms
(``interventions[2].add.strength``), so a client can find the part of its request that was wrong.
Every name imports from here (``convert.generation_plan``).
"""

from __future__ import annotations

from steer.service.convert.directions import (
    artifact_files,
    artifact_files_message,
    artifact_info,
    broken_artifact,
    job,
)
from steer.service.convert.features import (
    DEFAULT_FEATURES,
    activations_response,
    feature_info,
    ranked_feature,
    ranked_features,
    sae_info,
    texts,
)
from steer.service.convert.generation import (
    MAX_STOP_LENGTH,
    PROMPT_FORMATS,
    ROLES,
    GenerationPlan,
    generate_response,
    generation_plan,
    side_names,
)
from steer.service.convert.interventions import intervention
from steer.service.convert.models import model_info, slider_info
from steer.service.convert.sampling import sampling_config, sampling_params

__all__ = [
    "DEFAULT_FEATURES",
    "MAX_STOP_LENGTH",
    "PROMPT_FORMATS",
    "ROLES",
    "GenerationPlan",
    "activations_response",
    "artifact_files",
    "artifact_files_message",
    "artifact_info",
    "broken_artifact",
    "feature_info",
    "generate_response",
    "generation_plan",
    "intervention",
    "job",
    "model_info",
    "ranked_feature",
    "ranked_features",
    "sae_info",
    "sampling_config",
    "sampling_params",
    "side_names",
    "slider_info",
    "texts",
]
