"""Weight deltas: the residual-stream interventions of a recipe as rank-1 updates per matrix.

Every matrix that writes the residual stream is viewed as ``M`` of shape ``(d_model, n)``: each
column is a d_model vector the matrix writes (``o_proj``/``down_proj`` weights as stored, the
embedding transposed, one column per token). With ``r`` a unit direction and ``w`` its weight::

    M  <- M - w r (r^T M)                     # (D, n) - (D, 1) @ (1, n): rank 1
    M[:, j] *= |M_old[:, j]| / |M_new[:, j]|  # norm-preserving variant, per written vector

Columns are independent, so a large matrix (the embedding) is edited in chunks of columns.
An additive vector at ``blocks.L.hook_resid_post`` is a bias on layer L's ``down_proj``.

Which interventions have an exact weight form (else :class:`UnsupportedArchitectureError` /
:class:`InvalidArgumentError` naming why):

* ``Ablate`` at ``attn_out``/``mlp_out`` of layer L -> ``o_proj``/``down_proj`` of L, and at
  ``resid_pre`` of layer 0 -> the embedding. ``resid_pre`` of a later layer only when it is
  provably a no-op (one direction, weight 1 on every layer, so nothing upstream writes ``r``).
* ``Add`` at ``resid_post`` L, ``mlp_out`` L or ``resid_pre`` L+1 -> ``down_proj`` bias of L;
  at ``resid_pre`` 0 -> added to every embedding row. All tokens, no speaker scope.
* Only where the hook point's module *is* the writing matrix's parent: in Gemma 2/3 the
  attention/MLP outputs pass through an RMSNorm before the residual add, so neither a projected
  ``o_proj`` nor a bias reproduces a projection/addition after that norm.
* Mixture-of-experts blocks: the block output is a per-token weighted sum of expert
  down-projection outputs (plus a gated shared expert), so projecting every expert's
  ``down_proj`` (and the shared one's) is exactly projecting the block output. A bias is not:
  the experts have none in transformers (see :func:`check_bias`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from steer.errors import InvalidArgumentError, UnsupportedArchitectureError
from steer.hooks import (
    ArchitectureLayout,
    HookKind,
    HookPoint,
    parse_hook_name,
    resid_post_hooks,
)
from steer.interventions import Ablate, Add, Intervention, Phase


@dataclass(frozen=True, eq=False)
class RankOneEdit:
    """``M <- M - weight * unit (unit^T M)``, then optionally restore column norms."""

    unit: torch.Tensor  # (d_model,) float32, unit norm
    weight: float
    norm_preserving: bool = False


@dataclass
class WeightPlan:
    """Per-matrix edits. Keys of ``attention``/``mlp``/``down_bias`` are layer indices."""

    embedding: list[RankOneEdit] = field(default_factory=list)
    attention: dict[int, list[RankOneEdit]] = field(default_factory=dict)
    mlp: dict[int, list[RankOneEdit]] = field(default_factory=dict)
    #: additive vectors: a bias on down_proj of layer L
    down_bias: dict[int, torch.Tensor] = field(default_factory=dict)
    #: added to every row of the embedding (Add at resid_pre of layer 0)
    embedding_shift: torch.Tensor | None = None

    @property
    def has_bias(self) -> bool:
        return bool(self.down_bias)

    @property
    def edits_embedding(self) -> bool:
        return bool(self.embedding) or self.embedding_shift is not None

    @property
    def norm_preserving(self) -> bool:
        edits = [*self.embedding, *_flatten(self.attention), *_flatten(self.mlp)]
        return any(edit.norm_preserving for edit in edits)

    def finalize(self) -> None:
        """Orthonormalise several full-weight directions on one matrix, as run-time plans do:
        removing each of several unit vectors in turn removes their span only if orthonormal."""
        self.embedding = _orthonormal_if_full(self.embedding)
        self.attention = {k: _orthonormal_if_full(v) for k, v in self.attention.items()}
        self.mlp = {k: _orthonormal_if_full(v) for k, v in self.mlp.items()}


def _flatten(table: dict[int, list[RankOneEdit]]) -> list[RankOneEdit]:
    return [edit for edits in table.values() for edit in edits]


def _orthonormal_if_full(edits: list[RankOneEdit]) -> list[RankOneEdit]:
    if len(edits) < 2 or any(edit.weight != 1.0 or edit.norm_preserving for edit in edits):
        return edits
    q, r = torch.linalg.qr(torch.stack([edit.unit for edit in edits], dim=1).double())
    keep = r.diagonal().abs() > 1e-6
    return [
        RankOneEdit(q[:, k].float(), 1.0 if keep[k] else 0.0) for k in range(len(edits)) if keep[k]
    ]


# ---------------------------------------------------------------------------------------------
# Interventions -> plan


def check_layout(layout: ArchitectureLayout, model_type: str) -> None:
    """The weight form is exact only where the hook module contains the writing matrix."""
    pairs = [(layout.attn_out, layout.attn_write)]
    pairs += [
        (layout.mlp_out, parameter.removesuffix(".weight"))
        for parameter in layout.mlp_write_parameters
    ]
    for hook_module, write in pairs:
        if not write.startswith(hook_module + "."):
            raise UnsupportedArchitectureError(
                f"{model_type}: what reaches the residual stream is the output of {hook_module!r}, "
                f"which normalises the output of {write!r}; a projected or biased {write!r} is not "
                "equivalent to the run-time intervention after that norm, so steer does not bake "
                "it. Use the run-time intervention for this architecture.",
                field="model",
            )


def check_bias(layout: ArchitectureLayout, model_type: str) -> None:
    """An additive vector at a layer's output is a ``down_proj`` bias; a routed MoE block has
    no such single matrix."""
    if layout.experts is not None:
        raise UnsupportedArchitectureError(
            f"{model_type}: no exact form for an additive vector after a mixture-of-experts MLP: "
            "the routed experts' down-projections have no bias in transformers"
            + (
                " and the shared expert's output is gated per token"
                if layout.experts.shared_down
                else ""
            )
            + ". Add at blocks.0.hook_resid_pre (the embedding), export a control vector, or "
            "use the run-time Add.",
            field="model",
        )


def _is_full_shared_ablation(ablate: Ablate, num_layers: int) -> bool:
    if ablate.layers is not None and tuple(ablate.layers) != tuple(range(num_layers)):
        return False
    if any(ablate.weight_at(layer) != 1.0 for layer in range(num_layers)):
        return False
    if not set(ablate.kinds) >= {HookKind.RESID_PRE, HookKind.ATTN_OUT, HookKind.MLP_OUT}:
        return False
    unit = ablate.direction.normalized()
    first = unit.at(0)
    return all(torch.equal(unit.at(layer), first) for layer in range(num_layers))


def add_ablation(
    plan: WeightPlan, ablate: Ablate, num_layers: int, *, norm_preserving: bool, field_name: str
) -> None:
    if ablate.speaker is not None:
        raise InvalidArgumentError("a speaker-scoped ablation has no weight form", field=field_name)
    full = _is_full_shared_ablation(ablate, num_layers)
    layers = ablate.layers if ablate.layers is not None else tuple(range(num_layers))
    unit = ablate.direction.normalized()
    for layer in layers:
        weight = ablate.weight_at(layer)
        if weight == 0.0:
            continue
        edit = RankOneEdit(unit.at(layer), weight, norm_preserving)
        for kind in ablate.kinds:
            if kind is HookKind.ATTN_OUT:
                plan.attention.setdefault(layer, []).append(edit)
            elif kind is HookKind.MLP_OUT:
                plan.mlp.setdefault(layer, []).append(edit)
            elif kind is HookKind.RESID_PRE and layer == 0:
                plan.embedding.append(edit)
            elif kind is HookKind.RESID_PRE and full:
                continue  # nothing upstream writes the direction any more: a no-op
            else:
                raise InvalidArgumentError(
                    f"ablation at blocks.{layer}.{kind.value} has no exact weight form; weight "
                    "edits cover resid_pre of layer 0 (embedding), attn_out and mlp_out",
                    field=field_name,
                )


def add_addition(plan: WeightPlan, add: Add, num_layers: int, *, field_name: str) -> None:
    if add.phase is not Phase.ALL or add.speaker is not None:
        raise InvalidArgumentError(
            "only an addition on all tokens (phase all, no speaker) has a weight form",
            field=field_name,
        )
    if add.is_noop():
        return
    for point in _points(add, num_layers, field_name):
        layer = 0 if point.layer is None else point.layer
        vector = add.vector.at(layer) * add.strength
        if point.kind is HookKind.RESID_PRE and layer == 0:
            shift = plan.embedding_shift
            plan.embedding_shift = vector if shift is None else shift + vector
            continue
        if point.kind in (HookKind.RESID_POST, HookKind.MLP_OUT):
            target = layer
        elif point.kind is HookKind.RESID_PRE:
            target = layer - 1
        else:
            raise InvalidArgumentError(
                f"an addition at {point.name} has no exact weight form; use resid_post, "
                "mlp_out or resid_pre",
                field=field_name,
            )
        bias = plan.down_bias.get(target)
        plan.down_bias[target] = vector if bias is None else bias + vector


def _points(add: Add, num_layers: int, field_name: str) -> Iterator[HookPoint]:
    if add.hooks:
        for name in add.hooks:
            yield parse_hook_name(name, num_layers, field=field_name)
        return
    if not add.vector.per_layer:
        raise InvalidArgumentError("a shared vector needs explicit hooks", field=field_name)
    for name in resid_post_hooks(add.vector.layers):
        yield parse_hook_name(name, num_layers, field=field_name)


def build_plan(
    interventions: Sequence[tuple[Intervention, bool]], num_layers: int, d_model: int
) -> WeightPlan:
    """``(intervention, norm_preserving)`` pairs -> a weight plan. Ablations act before
    additions at one point, as in the run-time plan."""
    plan = WeightPlan()
    for index, (intervention, norm_preserving) in enumerate(interventions):
        field_name = f"edits[{index}]"
        if isinstance(intervention, Ablate):
            _check_size(intervention.direction.d_model, d_model, field_name)
            add_ablation(
                plan,
                intervention,
                num_layers,
                norm_preserving=norm_preserving,
                field_name=field_name,
            )
        elif isinstance(intervention, Add):
            _check_size(intervention.vector.d_model, d_model, field_name)
            add_addition(plan, intervention, num_layers, field_name=field_name)
        else:
            raise InvalidArgumentError(
                f"{type(intervention).__name__} has no weight form", field=field_name
            )
    plan.finalize()
    return plan


def _check_size(size: int, d_model: int, field_name: str) -> None:
    if size != d_model:
        raise InvalidArgumentError(
            f"vector has {size} dimensions but the model's d_model is {d_model}", field=field_name
        )


# ---------------------------------------------------------------------------------------------
# Applying edits to one matrix


#: columns per block are chosen so a block has at most this many elements (1 MiB of float32).
#: Each block costs a few torch calls, so small blocks are dominated by their
#: overhead: measured on Qwen2.5-0.5B (2 cores, scripts/bench_bake.py), 32768-element blocks
#: (about 8,000 per bake) gave a bake of 1.29 s and 1.88 CPU s, 262144-element blocks 1.04 s and
#: 1.64 CPU s. Blocks above torch's grain size (32768) would start intra-op threads; the bake's
#: shard threads run torch on themselves only (steer.bake.threads.serial_torch_in_this_thread).
BLOCK_ELEMENTS = 262144


def edit_columns(matrix: torch.Tensor, edits: Sequence[RankOneEdit]) -> torch.Tensor:
    """``matrix``: (d_model, n) -> edited float32 copy."""
    return edit_columns_into(matrix, edits, torch.empty(matrix.shape, dtype=torch.float32))


def edit_columns_into(
    matrix: torch.Tensor,
    edits: Sequence[RankOneEdit],
    out: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out`` (d_model, n), any dtype and strides <- ``matrix`` (d_model, n) edited, then
    ``shift`` (d_model,) added to every column; the math is float32 and ``matrix`` is only read.

    Columns are independent, so the work goes block by block of columns in one small float32
    buffer (see :data:`BLOCK_ELEMENTS`), laid out like ``matrix`` so copies read it in order.
    """
    d_model, columns = matrix.shape
    step = max(1, min(columns, BLOCK_ELEMENTS // max(d_model, 1)))
    rows_first = matrix.stride(0) != 1  # (d_model, n) row-major, not a transposed (n, d_model)
    work = torch.empty(d_model, step) if rows_first else torch.empty(step, d_model).T
    for start in range(0, columns, step):
        stop = min(columns, start + step)
        block = work[:, : stop - start]
        block.copy_(matrix[:, start:stop])
        for edit in edits:
            before = block.norm(dim=0) if edit.norm_preserving else None
            coefficient = edit.unit @ block  # (columns,)
            block.addr_(edit.unit, coefficient, alpha=-edit.weight)  # -= w * unit coefficient^T
            if before is not None:
                after = block.norm(dim=0)
                block.mul_(torch.where(after > 0, before / after.clamp_min(1e-30), 1.0))
        if shift is not None:
            block.add_(shift[:, None])
        out[:, start:stop].copy_(block)
    return out


def lora_factors(
    matrix: torch.Tensor, edits: Sequence[RankOneEdit]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the delta: ``edited - matrix == B @ A`` with B (d_model, k), A (k, n)."""
    columns_b, rows_a = [], []
    current = matrix.clone()
    for edit in edits:
        if edit.norm_preserving:
            raise InvalidArgumentError(
                "norm-preserving ablation rescales every column: it is not low-rank; export it "
                "as a full model",
                field="output_format",
            )
        coefficient = edit.unit @ current  # (n,)
        columns_b.append(-edit.weight * edit.unit)
        rows_a.append(coefficient)
        current -= edit.weight * torch.outer(edit.unit, coefficient)
    return torch.stack(columns_b, dim=1), torch.stack(rows_a, dim=0)
