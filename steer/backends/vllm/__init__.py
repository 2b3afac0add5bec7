"""The vllm backend: steer's interventions inside vLLM's V1 engine (``pip install -e ".[vllm]"``).

:mod:`~steer.backends.vllm.launch` starts vLLM on a loaded model, :mod:`.engine` drives it with
steer's engine interface, :mod:`.program` and :mod:`.worker` apply the interventions inside
vLLM's forward pass, :mod:`.params` maps the sampler settings and :mod:`.samplers` runs steer's
sampler pipeline inside vLLM for the samplers vLLM lacks. Importing this package does not import
vLLM; starting an engine does.
"""

from steer.backends.vllm.engine import CAPABILITIES, VllmEngine
from steer.backends.vllm.launch import VllmOptions, export_for_vllm, start_vllm

__all__ = ["CAPABILITIES", "VllmEngine", "VllmOptions", "export_for_vllm", "start_vllm"]
