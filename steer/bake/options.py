"""Bake options: output format, dtype, safety switches, progress, cancellation.

:class:`BakeCancelled` is what a cancelled bake raises.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from steer.bake.tensor_io import Opener, default_opener
from steer.errors import CancelledError

Progress = Callable[[str, float], None]


#: the caller cancelled the bake; nothing was written at the target (steer.errors' one
#: cancellation error, by the name steer.bake has always raised it under)
BakeCancelled = CancelledError


@dataclass
class BakeOptions:
    output_format: str = "model"
    overwrite: bool = False
    dtype: str | None = None
    allow_pickle: bool = False
    allow_other_model: bool = False
    #: bake a recipe's gated edits without their gates (weights cannot hold a gate); without
    #: it such a recipe is refused. The provenance notes each dropped gate.
    ungated: bool = False
    progress: Progress | None = None
    cancelled: threading.Event | None = None
    #: opens output files; tests pass a failing one to simulate a full disk
    opener: Opener = default_opener
    notes: list[str] = field(default_factory=list)
    #: where outputs may go, see :func:`steer.bake.api.check_output` (a server sets them)
    root: Path | None = None
    keep: tuple[Path, ...] = ()
    reserved: tuple[Path, ...] = ()

    def check_cancelled(self) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise BakeCancelled("bake cancelled", field="cancelled")

    def report(self, stage: str, fraction: float) -> None:
        self.check_cancelled()
        if self.progress is not None:
            self.progress(stage, fraction)
