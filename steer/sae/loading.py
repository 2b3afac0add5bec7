"""Sparse autoencoders in the SAELens format, bound to a hook point of a loaded model.

A directory with ``cfg.json`` + ``sae_weights.safetensors`` (what SAELens' ``save_model`` and
``save_inference_model`` write) loads through SAELens' own ``SAE.load_from_disk``, so every
architecture SAELens can run is read by its own code. steer adds:

* a check that the SAE fits the model: its hook name (``metadata.hook_name``, a TransformerLens
  name) must be a hook point steer's resolver knows, and ``d_in`` must equal the model's d_model;
* an optional ``steer_sae.json`` sidecar written by ``steer sae train`` (model identity, corpus,
  metrics); loading against a model with other weights is then an error unless allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from steer.artifacts import check_model, check_model_record, check_types
from steer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from steer.hooks import HookKind, HookPoint, parse_hook_name
from steer.json_input import read_object
from steer.models import ModelHandle

if TYPE_CHECKING:  # SAELens is slow to import: only loading an SAE needs it
    from sae_lens import SAE

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SIDECAR = "steer_sae.json"
SIDECAR_FORMAT = "steer.sae"

#: SAELens architectures whose output reconstructs their input at one hook point. Transcoders
#: (input and output at different points) and temporal SAEs (state across tokens) do not.
SUPPORTED_ARCHITECTURES = frozenset(
    {"standard", "gated", "topk", "abstopk", "jumprelu", "batchtopk", "matryoshka_batchtopk"}
)
#: hook kinds whose value has d_model dimensions
_RESIDUAL_KINDS = frozenset(HookKind)


@dataclass(frozen=True, eq=False)
class SparseAutoencoder:
    """A SAELens SAE and the hook point it reads, with float32 encode/decode helpers.

    Shapes: ``x`` is (..., d_in); feature activations are (..., num_features).
    """

    sae: SAE  # type: ignore[type-arg]
    hook_name: str
    path: Path | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.sae.cfg.architecture())

    @property
    def num_features(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def affine_decoder(self) -> bool:
        """True when ``decode`` is affine in the features (no run-time input normalisation)."""
        return self.sae.cfg.normalize_activations in ("none", "expected_average_only_in")

    def hook_point(self, num_layers: int) -> HookPoint:
        return parse_hook_name(self.hook_name, num_layers, field="sae.hook_name")

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as its SAE's config and weights (vLLM's tensor-parallel workers receive SAEs
        pickled; SAELens' ``SAE`` object holds a local function pickle cannot take)."""
        state = dict(self.__dict__)
        state["sae"] = (self.sae.cfg.to_dict(), self.sae.state_dict())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from sae_lens import SAE

        config, weights = state["sae"]
        sae = SAE.from_dict(config)
        sae.load_state_dict(weights)
        self.__dict__.update({**state, "sae": sae.eval()})

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., num_features), float32, dense."""
        features = self.sae.encode(x.to(self.sae.device, self.sae.dtype))
        if features.is_sparse:
            features = features.to_dense()
        return features.float()

    @torch.no_grad()
    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """(..., num_features) -> (..., d_in), float32."""
        return self.sae.decode(features.to(self.sae.device, self.sae.dtype)).float()

    def check_feature(self, feature: int, field_name: str = "feature") -> int:
        if isinstance(feature, bool) or not isinstance(feature, int):
            raise InvalidArgumentError(
                f"a feature index is an int, got {feature!r}", field=field_name
            )
        if not 0 <= feature < self.num_features:
            raise InvalidArgumentError(
                f"feature {feature} out of range: the SAE has features 0..{self.num_features - 1}",
                field=field_name,
            )
        return feature

    @torch.no_grad()
    def direction(self, feature: int) -> torch.Tensor:
        """What one unit of ``feature`` adds to the reconstruction: decode(e_k) - decode(0).

        For the usual affine decoders this is the decoder row (times the decoder norm for TopK
        SAEs trained with ``rescale_acts_by_decoder_norm``), float32 (d_in,).
        """
        self.check_feature(feature)
        basis = torch.zeros(2, self.num_features)
        basis[0, feature] = 1.0
        decoded = self.decode(basis)
        return (decoded[0] - decoded[1]).cpu()

    @torch.no_grad()
    def decoder_matrix(self) -> torch.Tensor:
        """Every feature's direction as rows, (num_features, d_in), float32 on the CPU."""
        if not self.affine_decoder:
            raise FailedPreconditionError(
                f"the SAE normalises its input at run time "
                f"(normalize_activations={self.sae.cfg.normalize_activations!r}); its features "
                "have no fixed direction",
                field="sae",
            )
        zero = self.decode(torch.zeros(1, self.num_features))
        rows = []
        for start in range(0, self.num_features, 1024):
            stop = min(start + 1024, self.num_features)
            eye = torch.zeros(stop - start, self.num_features)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            rows.append(self.decode(eye) - zero)
        return torch.cat(rows).cpu()

    def check_model(
        self, handle: ModelHandle, *, allow_other_model: bool = False, where: str | None = None
    ) -> HookPoint:
        """Raise unless this SAE reads a hook point of ``handle`` with matching width; ``where``
        names the SAE in messages (default: its path)."""
        point = self.hook_point(handle.num_layers)
        if point.kind not in _RESIDUAL_KINDS or self.d_in != handle.d_model:
            raise InvalidArgumentError(
                f"the SAE reads {self.d_in}-dimensional activations at {self.hook_name} but "
                f"{handle.name} has d_model {handle.d_model}",
                field="sae.d_in",
            )
        if self.metadata:
            where = where or (str(self.path) if self.path else "the SAE")
            check_model(self.metadata, handle, allow_other_model=allow_other_model, where=where)
        return point


def load_sae(
    path: str | Path,
    handle: ModelHandle | None = None,
    *,
    hook: str | None = None,
    allow_other_model: bool = False,
    where: str | None = None,
) -> SparseAutoencoder:
    """Load an SAE directory; with ``handle``, check it fits that model.

    ``hook`` overrides the hook name stored in the SAE's config (for SAEs saved without one).
    ``where`` is how messages name the directory (default: its path); files inside it are named
    relative to it. Files that are not what SAELens writes raise InvalidArgumentError.
    """
    directory = Path(path)
    where = where or str(directory)
    config = _open_directory(directory, where)
    sae = _saelens_load(directory, where)
    hook_name = hook or _hook_name(config, where)
    metadata: dict[str, Any] = {}
    if (directory / SIDECAR).is_file():
        metadata = _read_json(directory, SIDECAR, where)
        if metadata.get("format") != SIDECAR_FORMAT:
            raise InvalidArgumentError(
                f"{where}: {SIDECAR} has format {metadata.get('format')!r}", field="sae"
            )
        check_model_record(metadata, what=f"{where}: {SIDECAR}", field="sae")
    loaded = SparseAutoencoder(sae, str(hook_name), directory, metadata)
    if handle is not None:
        loaded.check_model(handle, allow_other_model=allow_other_model, where=where)
    return loaded


#: cfg.json keys steer checks before SAELens reads them, with their types
_CONFIG_TYPES: dict[str, type] = {
    "architecture": str,
    "d_in": int,
    "d_sae": int,
    "metadata": dict,
    "reshape_activations": str,
}


def decoder_row(
    path: str | Path, feature: int, *, where: str | None = None
) -> tuple[str, torch.Tensor]:
    """The hook name and feature ``feature``'s decoder row ``W_dec[feature]`` (d_in,), float32,
    of the SAE directory ``path``: what a bake of a feature edit adds.

    Read from the files without SAELens (a bake needs no SAE at run time), with the checks
    :func:`load_sae` makes of them: the directory, ``cfg.json``'s keys and architecture, the
    hook name; and ``W_dec`` must be a (d_sae, d_in) float matrix.
    """
    directory = Path(path)
    where = where or str(directory)
    config = _open_directory(directory, where)
    hook_name = _hook_name(config, where)
    try:
        decoder = load_file(str(directory / WEIGHTS)).get("W_dec")
    except (SafetensorError, OSError) as error:
        raise InvalidArgumentError(
            f"{where}: {WEIGHTS} is not a safetensors file ({error})", field="sae"
        ) from None
    shape = (config["d_sae"], config["d_in"])
    if decoder is None or tuple(decoder.shape) != shape or not decoder.is_floating_point():
        found = "none" if decoder is None else f"{tuple(decoder.shape)} {decoder.dtype}"
        raise InvalidArgumentError(
            f"{where}: {WEIGHTS} needs W_dec, a float matrix of shape {shape} (d_sae, d_in) "
            f"as {CONFIG} says; found {found}",
            field="sae",
        )
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < shape[0]:
        raise InvalidArgumentError(
            f"feature {feature} out of range: the SAE has features 0..{shape[0] - 1}",
            field="feature",
        )
    return hook_name, decoder[feature].float()


def _open_directory(directory: Path, where: str) -> dict[str, Any]:
    """The checked ``cfg.json`` of an SAE directory that has both of SAELens' files."""
    if directory.exists() and not directory.is_dir():
        raise InvalidArgumentError(f"{where} is a file, not an SAE directory", field="sae")
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise NotFoundError(f"{where} is not an SAE directory: {name} is missing", field="sae")
    return _read_config(directory, where)


def _hook_name(config: Mapping[str, Any], where: str) -> str:
    """The hook an SAE reads: ``metadata.hook_name`` (SAELens 6), else a top-level
    ``hook_name`` (older SAELens configs, which SAELens 6 no longer reads)."""
    hook_name = (config.get("metadata") or {}).get("hook_name") or config.get("hook_name")
    if not hook_name:
        raise InvalidArgumentError(
            f"{where}: {CONFIG} has no metadata.hook_name; pass the hook it was trained on",
            field="sae.hook_name",
        )
    return str(hook_name)


def _read_json(directory: Path, name: str, where: str) -> dict[str, Any]:
    return read_object(directory / name, what=f"{where}: {name}", field="sae")


def _read_config(directory: Path, where: str) -> dict[str, Any]:
    """cfg.json, with the keys steer relies on checked (SAELens trusts them)."""
    config = _read_json(directory, CONFIG, where)
    check_types(config, _CONFIG_TYPES, what=f"{where}: {CONFIG}", field="sae")
    for key in ("d_in", "d_sae"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise InvalidArgumentError(
                f"{where}: {CONFIG} needs {key}, a positive integer", field=f"sae.{key}"
            )
    architecture = config.get("architecture", "standard")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise InvalidArgumentError(
            f"SAE architecture {architecture!r} is not supported for steering; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}",
            field="sae.architecture",
        )
    if config.get("reshape_activations", "none") != "none":
        raise InvalidArgumentError(
            "SAEs on attention heads (hook_z) are not supported; use a residual-stream SAE",
            field="sae.hook_name",
        )
    return config


def _saelens_load(directory: Path, where: str) -> SAE:  # type: ignore[type-arg]
    """SAELens' own loader; what it trips on (it reads the files unchecked) is the files' fault."""
    from sae_lens import SAE

    try:
        sae = SAE.load_from_disk(str(directory), device="cpu")
    except torch.OutOfMemoryError:
        raise
    except (
        SafetensorError,
        OSError,
        LookupError,
        TypeError,
        ValueError,
        AttributeError,
        RuntimeError,
    ) as error:
        detail = str(error).replace(str(directory), where)[:300]
        raise InvalidArgumentError(
            f"{where}: SAELens cannot load it ({type(error).__name__}: {detail})", field="sae"
        ) from None
    sae.eval()
    sae.requires_grad_(False)
    return sae


def load_pretrained_sae(
    release: str, sae_id: str, handle: ModelHandle | None = None
) -> SparseAutoencoder:
    """Load an SAE by SAELens release name (needs the Hugging Face hub or its local cache)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise NotFoundError(f"unknown SAELens release {release!r}", field="sae.release")
    if sae_id not in directory[release].saes_map:
        raise NotFoundError(f"release {release!r} has no SAE {sae_id!r}", field="sae.id")
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except (OSError, ConnectionError) as error:
        raise FailedPreconditionError(
            f"could not fetch {release}/{sae_id} from the Hugging Face hub ({error}); on an "
            "offline machine, download it elsewhere and load the directory with load_sae",
            field="sae.release",
        ) from None
    sae.eval()
    sae.requires_grad_(False)
    loaded = SparseAutoencoder(sae, str(sae.cfg.metadata.hook_name), None, {})
    if handle is not None:
        loaded.check_model(handle)
    return loaded
