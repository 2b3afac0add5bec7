"""Models service messages: a loaded model's :class:`ModelInfo` (with its scheduler's counters)
and a named slider's :class:`SliderInfo`."""

from __future__ import annotations

from steer.proto.v1 import models_pb2
from steer.service.registry import LoadedModel
from steer.service.sliders import Slider


def model_info(loaded: LoadedModel, *, detailed: bool) -> models_pb2.ModelInfo:
    handle, worker = loaded.handle, loaded.worker
    info = handle.info()
    message = models_pb2.ModelInfo(
        model_id=loaded.model_id,
        source=loaded.source,
        architecture=info["architecture"],
        num_layers=info["num_layers"],
        d_model=info["d_model"],
        dtype=info["dtype"],
        device=info["device"],
        vocab_size=int(handle.model.config.vocab_size),
        stats=models_pb2.SchedulerStats(
            running=worker.running,
            waiting=worker.waiting,
            requests_total=worker.stats.requests_total,
            cancelled_total=worker.stats.cancelled_total,
            failed_total=worker.stats.failed_total,
            tokens_total=worker.stats.tokens_total,
        ),
    )
    if detailed:
        message.hook_names.extend(handle.hook_names())
        message.chat_template = handle.chat_template or ""
        message.weight_hash = handle.weight_hash
    return message


def slider_info(slider: Slider) -> models_pb2.SliderInfo:
    info = models_pb2.SliderInfo(
        name=slider.name,
        kind=slider.kind,
        description=slider.description,
        min=slider.minimum,
        max=slider.maximum,
        default=slider.default,
    )
    if slider.neutral is not None:
        info.neutral = slider.neutral
    return info
