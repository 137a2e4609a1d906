"""The methods of the cost table (paper Table 2) and the options of a cost run.

The method list is derived from the estimator registry (``pdq.grad.ESTIMATORS`` and
``pdq.grad.options``): an estimator with a ``solver`` option gets one method per solver class,
one with ``k`` one per ``--ks`` value (and a checkpointed one when it has ``checkpoint``), any
other one method. :class:`CostConfig` holds the options of :func:`.cost.run` (the CLI flags).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, PositiveInt

import phantomdeq as pdq

__all__ = [
    "BACKWARD_SOLVERS",
    "COMPLEXITY",
    "EXEC_MODES",
    "SOLVERS",
    "CostConfig",
    "MethodSpec",
    "method_specs",
]

#: Paper Table 2: (time, memory, peak memory) complexity per family; T >> t ≈ 1.
COMPLEXITY: dict[str, tuple[str, str, str]] = {
    "ift": ("O(T)", "O(1)", "O(t)"),
    "upg": ("O(t)", "O(t)", "O(1)"),
    "upg_ckpt": ("O(t)", "O(1)", "O(1)"),
    "npg": ("O(t)", "O(1)", "O(t)"),
    "onestep": ("O(1)", "O(1)", "O(1)"),
    "bptt": ("O(N)", "O(N)", "O(N)"),
    # SHINE: no backward solve; the forward Broyden factors (about one state per forward
    # iteration) are held until the backward pass
    "shine": ("O(1)", "O(T)", "O(T)"),
}
SOLVERS = tuple(pdq.solvers.SOLVERS)
#: the IFT methods: one per solver of the backward system (fixed-point and Krylov)
BACKWARD_SOLVERS = tuple(pdq.solvers.BACKWARD_SOLVERS)
EXEC_MODES = ("eager", "compile", "graph")


@dataclass(frozen=True)
class MethodSpec:
    """One gradient estimator of the cost table: ``estimator`` (its registry name) with the
    options ``k``, ``checkpoint`` and ``backward_solver`` where it declares them."""

    name: str
    family: str  # key of COMPLEXITY
    label: str
    estimator: str
    k: int | None = None
    backward_solver: str | None = None
    checkpoint: bool = False

    def make(self, cfg: CostConfig) -> pdq.GradientEstimator:
        declared = pdq.grad.options(self.estimator)
        opts: dict[str, Any] = {}
        if self.backward_solver is not None:
            opts["solver"] = pdq.solvers.from_name(
                self.backward_solver, max_iter=cfg.bwd_iters, tol=0.0
            )
        if "warn_unconverged" in declared:  # a fixed budget (tol 0) never converges by design
            opts["warn_unconverged"] = False
        if self.k is not None:
            opts["k"] = self.k
        if "lam" in declared:
            opts["lam"] = cfg.lam
        if self.checkpoint:
            opts["checkpoint"] = True
        return pdq.grad.from_name(self.estimator, **opts)

    @property
    def tracks_forward(self) -> bool:
        """Back-propagates through the forward solver (BPTT): needs a FixedPoint forward."""
        return bool(pdq.grad.ESTIMATORS[self.estimator].tracks_forward)

    @property
    def needs_forward_inverse(self) -> bool:
        """Reuses the forward Broyden inverse estimate (SHINE): needs a Broyden forward."""
        return bool(pdq.grad.ESTIMATORS[self.estimator].needs_forward_inverse)

    def forward_solver(self, cfg: CostConfig) -> str:
        """The forward solver this method runs with."""
        if self.tracks_forward:
            return "fixed_point"
        if self.needs_forward_inverse and cfg.solver != "broyden":
            return "broyden"
        return cfg.solver


def method_specs(ks: Sequence[int] = (1, 3, 5, 9)) -> list[MethodSpec]:
    """Every method of the table, in registry order (see the module docstring)."""
    specs: list[MethodSpec] = []
    for name, cls in pdq.grad.ESTIMATORS.items():
        declared, label = pdq.grad.options(name), cls.__name__
        if "solver" in declared:
            for s in BACKWARD_SOLVERS:
                specs.append(MethodSpec(f"{name}_{s}", name, f"{label} ({s})", name, None, s))
        elif "k" in declared:
            specs += [MethodSpec(f"{name}_k{k}", name, f"{label} k={k}", name, k) for k in ks]
            if "checkpoint" in declared:
                specs += [
                    MethodSpec(
                        f"{name}_ckpt_k{k}",
                        f"{name}_ckpt",
                        f"{label}-ckpt k={k}",
                        name,
                        k,
                        checkpoint=True,
                    )
                    for k in ks
                ]
        else:
            specs.append(MethodSpec(name, name, label, name))
    return specs


def _model_name(value: str) -> str:
    from phantomdeq.models import MDEQ_CONFIG_NAMES

    if value not in MDEQ_CONFIG_NAMES:
        raise ValueError(f"must be one of {', '.join(MDEQ_CONFIG_NAMES)}")
    return value


_LIST = Field(min_length=1, strict=False)


@pydantic.dataclasses.dataclass(
    frozen=True, config=pydantic.ConfigDict(strict=True, allow_inf_nan=False)
)
class CostConfig:
    """Options of :func:`run` (the CLI flags); a refused value raises ``ValueError`` naming
    the field."""

    model: Annotated[str, pydantic.AfterValidator(_model_name)] = "mdeq_tiny"
    batch: PositiveInt = 64
    device: Literal["cpu", "cuda"] = "cpu"
    solver: Literal[SOLVERS] = "anderson"  # type: ignore[valid-type]
    fwd_iters: Annotated[int, Field(ge=2)] = 22
    bwd_iters: Annotated[int, Field(ge=2)] = 20
    ks: Annotated[tuple[PositiveInt, ...], _LIST] = (1, 3, 5, 9)
    lam: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    repeats: PositiveInt = 5
    warmup: Annotated[int, Field(ge=0)] = 1
    amp: Literal["none", "bf16"] = "none"
    seed: int = 0
    image_size: Annotated[int, Field(ge=4)] = 32
    num_classes: Annotated[int, Field(ge=2)] = 10
    methods: Annotated[tuple[str, ...], _LIST] | None = None  # None: all
    reference: str = "ift_broyden"
    memory: bool = True
    modes: Annotated[tuple[str, ...], _LIST] = ("eager",)

    @pydantic.model_validator(mode="after")
    def _known_methods(self) -> CostConfig:
        names = [m.name for m in method_specs(self.ks)]
        unknown = [m for m in self.methods or () if m not in names]
        if unknown:
            raise ValueError(f"methods: unknown method(s) {unknown}; allowed: {', '.join(names)}")
        if self.reference not in names:
            raise ValueError(f"reference must be one of {names}, got {self.reference!r}")
        bad = [m for m in self.modes if m not in EXEC_MODES]
        if bad or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct entries of {EXEC_MODES}, got {self.modes!r}")
        if "graph" in self.modes and self.device != "cuda":
            raise ValueError("modes: 'graph' (CUDA graphs) needs device='cuda'")
        return self
