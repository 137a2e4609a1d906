"""The base of the config sections and the sections generated from the declared options of
the solver and estimator classes (their keyword-only constructor parameters, exposed by
``pdq.solvers.options`` and ``pdq.grad.options``): ``SolverConfig`` and ``GradConfig``."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, field_validator
from pydantic_core import PydanticCustomError

from phantomdeq import grad as grad_estimators
from phantomdeq import solvers as solver_classes

__all__ = [
    "MDEQ_FACTORY",
    "SECTION_ARGS",
    "check_target",
    "import_target",
    "keyword_names",
    "preset_target",
    "takes_any_keyword",
    "target_signature",
    "NESTED_SOLVERS",
    "BackwardSolverConfig",
    "BackwardSolverSection",
    "ConfigError",
    "CorrectionConfig",
    "Float",
    "GradConfig",
    "GradSection",
    "Section",
    "SolverConfig",
    "SolverSection",
    "NonNegFloat",
    "NonNegInt",
    "PosFloat",
    "PosInt",
    "import_plugins",
    "solver_default",
]


class ConfigError(ValueError):
    """Invalid configuration: the message names the dotted key and what is allowed."""


# YAML 1.1 (PyYAML) reads "1e-4" (no dot) as a string; accept such strings for float fields.
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.IGNORECASE)


def _yaml_float(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()) else value


Float = Annotated[float, BeforeValidator(_yaml_float)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[Float, Field(gt=0)]
NonNegFloat = Annotated[Float, Field(ge=0)]


class Section(BaseModel):
    """A config section: strict types, finite floats, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    def check(self, prefix: str) -> None:
        """Cross-field checks beyond the types (raise :class:`ConfigError`)."""


def _construct(build: Any, options: dict[str, Any], prefix: str) -> None:
    """Build an object from ``options`` (the library class validates them); a refusal becomes a
    :class:`ConfigError` naming the dotted key of the offending option -- found by building
    with that option alone -- and keeping the class's message (what is allowed)."""
    try:
        build(**options)
    except (TypeError, ValueError) as exc:
        culprits = []
        for key, value in options.items():
            try:
                build(**{key: value})
            except (TypeError, ValueError):
                culprits.append(key)
        keys = ", ".join(f"{prefix}.{k}" for k in (culprits or options))
        message = " ".join(str(exc).split())
        raise ConfigError(f"{keys}: {message}") from exc


# --------------------------------------------------------------------------- solvers, estimators

#: estimator options holding a solver, and the config key of their nested solver section
NESTED_SOLVERS = {"solver": "backward_solver"}


def _option_fields(
    registry: dict[str, type], options: Any, defaults: dict[str, Any]
) -> dict[str, Any]:
    """pydantic fields for the union of the registry's classes' keyword-only options (a float
    option also takes YAML's "1e-4" strings). An option several classes declare (``k`` of UPG
    and NPG, ``max_iter`` of every solver) is one key, typed and defaulted by the first class in
    registry order that declares it; ``defaults`` replaces class defaults."""
    fields: dict[str, Any] = {"name": (str, defaults.get("name"))}
    for cls_name in registry:
        for name, p in options(cls_name).items():
            if name in NESTED_SOLVERS:
                continue
            if name not in fields:
                fields[name] = (_field_type(p), defaults.get(name, p.default))
    return fields


def _field_type(p: inspect.Parameter) -> Any:
    """The config type of an option: its annotation, ``Float`` for ``float`` (YAML's "1e-4")."""
    ann = p.annotation
    if ann is inspect.Parameter.empty:
        return Any
    if ann is float:
        return Float
    if ann == float | None:
        return Float | None
    try:
        TypeAdapter(ann)
    except pydantic.PydanticSchemaGenerationError:  # a user class's own type: it checks it
        return Any
    return ann


def _check_name(value: str, registry: dict[str, type]) -> str:
    """``value`` if ``registry`` (live: user classes registered since import included) has it;
    the error lists the allowed names as a ``Literal`` would."""
    if value not in registry:
        names = [repr(n) for n in registry]
        expected = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise PydanticCustomError(
            "literal_error", "Input should be {expected}", {"expected": expected}
        )
    return value


class _Registered(Section):
    """A section naming a registered class (``name``) whose keys are the options of the
    library's classes (generated fields) plus, for a user class registered after import
    (``pdq.solvers.register``, ``pdq.grad.register``), its own options: extra keys, accepted
    only when the named class declares them, typed by their annotations in :meth:`check`."""

    model_config = ConfigDict(extra="allow")
    #: the classes this section may name
    registry: ClassVar[dict[str, type]]
    #: the registry's ``options(name)``
    option_table: ClassVar[Any]
    if TYPE_CHECKING:
        name: str  # the field of the subclasses

    @field_validator("name", check_fields=False)
    @classmethod
    def _known_name(cls, value: str) -> str:
        return _check_name(value, cls.registry)

    def _extra_options(self, prefix: str) -> None:
        """Refuse extra keys the named class does not declare (as pydantic refuses unknown
        keys) and validate the others against their annotations (strict, as the fields)."""
        extra = self.__pydantic_extra__ or {}
        declared = type(self).option_table(self.name)
        for key, value in list(extra.items()):
            p = declared.get(key)
            if p is None or key in NESTED_SOLVERS:
                allowed = [
                    *type(self).model_fields,
                    *(
                        k
                        for k in declared
                        if k not in type(self).model_fields and k not in NESTED_SOLVERS
                    ),
                ]
                raise ConfigError(
                    f"{prefix}.{key}: unknown key; allowed keys in {prefix}: {', '.join(allowed)}"
                )
            try:
                extra[key] = TypeAdapter(
                    _field_type(p), config=ConfigDict(strict=True)
                ).validate_python(value)
            except pydantic.ValidationError as exc:
                err = exc.errors()[0]
                text = err["msg"][0].lower() + err["msg"][1:]
                raise ConfigError(
                    f"{prefix}.{key}: {text}; got {type(value).__name__} {value!r}"
                ) from None

    def _values(self, name: str) -> dict[str, Any]:
        """The config's values of the options of class ``name`` (fields and extra keys; an
        option the config does not set keeps the class default)."""
        extra = self.__pydantic_extra__ or {}
        out = {}
        for k in type(self).option_table(name):
            key = NESTED_SOLVERS.get(k, k) if isinstance(self, GradSection) else k
            if key in type(self).model_fields:
                out[k] = getattr(self, key)
            elif key in extra:
                out[k] = extra[key]
        return out

    def _checked_names(self) -> list[str]:
        """The classes :meth:`check` builds: the named one first, then every class whose
        options are all fields (those known when the section was generated: a value invalid
        for any of them is refused, used or not)."""
        fields = type(self).model_fields
        names = [
            n
            for n in self.registry
            if n == self.name
            or all(k in fields or k in NESTED_SOLVERS for k in type(self).option_table(n))
        ]
        return sorted(names, key=lambda n: n != self.name)


class SolverSection(_Registered):
    """A forward (or IFT backward) fixed-point solver, built with ``pdq.solvers.from_name``.
    Its keys are ``name`` and the options of every solver class (``pdq.solvers.options``);
    each option is passed only to the solvers that declare it, and every solver is built with
    its options when the config is checked, so no value in the config is invalid, used or not.
    """

    model_config = ConfigDict(allow_inf_nan=True)  # the solver classes check the values
    #: the solvers this section may name
    registry: ClassVar[dict[str, type]] = solver_classes.SOLVERS
    option_table: ClassVar[Any] = staticmethod(solver_classes.options)
    name: str = "anderson"

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``pdq.solvers.from_name(self.name, **kwargs)``."""
        return self._values(self.name)

    def check(self, prefix: str) -> None:
        self._extra_options(prefix)
        # the named solver first, so that an error about a shared option names it
        for name in self._checked_names():
            opts = self._values(name)
            _construct(lambda n=name, **kw: solver_classes.from_name(n, **kw), opts, prefix)


class CorrectionConfig(Section):
    """Fixed-point correction (Bai et al., CVPR 2022; :class:`phantomdeq.grad.Correction`):
    ``states`` supervised states along the forward solver's trajectory (1 = off, the plain
    estimator), the earlier ones with ``UPG(grad.k, grad.lam)`` from that state, loss weight
    ``gamma^m`` for the state ``m`` places before the solution (weight 1). The trainer
    minimises the sum of the head's weighted cross-entropies over the states; ``train_loss``
    stays the solution's. Needs ``grad.name`` upg or npg when ``states > 1``. ``mode:
    sliced`` solves in ``states`` segments instead, each starting detached from the previous
    one's supervised state (TorchDEQ's ``core: sliced``)."""

    states: PosInt = 1
    gamma: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.8
    mode: Literal["sampled", "sliced"] = "sampled"

    def check(self, prefix: str) -> None:
        _construct(
            grad_estimators.Correction,
            {"states": self.states, "gamma": self.gamma, "mode": self.mode},
            prefix,
        )


class BackwardSolverSection(SolverSection):
    """The IFT backward solver (``grad.backward_solver``): a fixed-point solver or one of the
    linear solvers of the backward system (``gmres``, ``bicgstab``; ``pdq.solvers.
    BACKWARD_SOLVERS``), with the options of all of them."""

    registry: ClassVar[dict[str, type]] = solver_classes.BACKWARD_SOLVERS


class GradSection(_Registered):
    """The gradient estimator (paper Sec. 2): ``ift`` (eq. 4), ``upg`` (unrolled phantom
    gradient A^unr_{k,λ}, eq. 17), ``npg`` (Neumann phantom gradient A^neu_{k,λ}, eq. 18),
    ``onestep`` (= UPG(1, 1)) or ``bptt``. Its keys are ``name``, the options of every
    estimator class (``pdq.grad.options``: ``k`` -- an integer or ``auto`` --, ``lam``, and
    with ``k: auto`` ``tol`` and ``k_max`` of upg/npg, ``checkpoint`` of upg,
    ``warn_unconverged`` and ``init`` of ift), ``backward_solver``, the solver section of ift's
    ``solver`` (a fixed-point solver, or ``gmres``/``bicgstab``), and ``correction``
    (:class:`CorrectionConfig`, fixed-point correction)."""

    model_config = ConfigDict(allow_inf_nan=True)  # the estimator classes check the values
    registry: ClassVar[dict[str, type]] = grad_estimators.ESTIMATORS
    option_table: ClassVar[Any] = staticmethod(grad_estimators.options)
    name: str = "upg"
    correction: CorrectionConfig = Field(default_factory=CorrectionConfig)

    def kwargs(self) -> dict[str, Any]:
        """Options of ``self.name`` as config values (nested solvers as their sections)."""
        return self._values(self.name)

    def check(self, prefix: str) -> None:
        self._extra_options(prefix)
        correction = self.correction
        correction.check(f"{prefix}.correction")
        if correction.states > 1 and self.name not in ("upg", "npg"):
            raise ConfigError(
                f"{prefix}.correction.states: fixed-point correction gives the earlier states "
                f"UPG(grad.k, grad.lam) and needs grad.name upg or npg, got {self.name!r} "
                f"(or set {prefix}.correction.states: 1)"
            )
        for key in NESTED_SOLVERS.values():
            getattr(self, key).check(f"{prefix}.{key}")
        for name in self._checked_names():
            opts = {k: v for k, v in self._values(name).items() if k not in NESTED_SOLVERS}
            _construct(lambda n=name, **kw: grad_estimators.from_name(n, **kw), opts, prefix)


def import_plugins(raw: Any) -> None:
    """Import the modules of a raw config's ``plugins`` list (``plugins: [mypkg.solvers]``)
    before the config is parsed, so that the solvers and estimators they register
    (``pdq.solvers.register``, ``pdq.grad.register``) are known to ``solver``, ``grad`` and
    ``eval_solver``. Modules are found as ``python -m`` finds them: the working directory
    first, then the installed packages and ``PYTHONPATH``. A list that is not one of strings
    is left to the parser's type check; a module that cannot be imported is a
    :class:`ConfigError` naming ``plugins[i]``."""
    plugins = raw.get("plugins") if isinstance(raw, dict) else None
    if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
        return
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for i, module in enumerate(plugins):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - whatever the import raises, in one line
            raise ConfigError(
                f"plugins[{i}]: cannot import module {module!r} "
                f"({type(exc).__name__}: {' '.join(str(exc).split())})"
            ) from exc


def solver_default(**values: Any) -> Any:
    return lambda: SolverConfig(**values)


def backward_solver_default(**values: Any) -> Any:
    return lambda: BackwardSolverConfig(**values)


if TYPE_CHECKING:  # the generated classes, as the type checker sees them
    SolverConfig = SolverSection
    BackwardSolverConfig = BackwardSolverSection
    GradConfig = GradSection
else:
    SolverConfig = pydantic.create_model(
        "SolverConfig",
        __base__=SolverSection,
        __module__=__name__,
        **_option_fields(
            solver_classes.SOLVERS, solver_classes.options, {"name": "anderson", "max_iter": 22}
        ),
    )
    SolverConfig.__doc__ = SolverSection.__doc__
    BackwardSolverConfig = pydantic.create_model(
        "BackwardSolverConfig",
        __base__=BackwardSolverSection,
        __module__=__name__,
        **_option_fields(
            solver_classes.BACKWARD_SOLVERS,
            solver_classes.options,
            {"name": "fixed_point", "max_iter": 30, "tol": 1e-6},
        ),
    )
    BackwardSolverConfig.__doc__ = BackwardSolverSection.__doc__
    GradConfig = pydantic.create_model(
        "GradConfig",
        __base__=GradSection,
        __module__=__name__,
        backward_solver=(
            BackwardSolverConfig,
            Field(
                default_factory=backward_solver_default(name="fixed_point", max_iter=30, tol=1e-6)
            ),
        ),
        **_option_fields(grad_estimators.ESTIMATORS, grad_estimators.options, {"name": "upg"}),
    )
    GradConfig.__doc__ = GradSection.__doc__


# --- model.target: the factory a config names ----------------------------------------------

#: factory arguments built from the config's sections (``model.kwargs`` may not name them)
SECTION_ARGS = ("solver", "grad", "eval_solver", "correction")
#: the factory of the MDEQ presets (``model.name``)
MDEQ_FACTORY = "phantomdeq.models:build_mdeq"


def preset_target(name: str, dropout: float | None, overrides: dict[str, Any]) -> tuple[str, dict]:
    """``(target, kwargs)`` of the preset ``model.name: name`` with ``model.dropout`` and
    ``model.overrides``."""
    kwargs: dict[str, Any] = {"size": name, **overrides}
    if dropout is not None:
        kwargs["dropout"] = dropout
    return MDEQ_FACTORY, kwargs


def import_target(spec: str, key: str = "model.target") -> Callable[..., Any]:
    """The callable named by ``"package.module:attribute"`` (a dotted attribute path is
    allowed after the colon); a one-line :class:`ConfigError` naming ``key`` otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{key}: expected 'package.module:factory' (e.g. 'mypkg.cells:build'), got {spec!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m`: the working directory's modules first
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the import raises is reported in one line
        raise ConfigError(
            f"{key}: cannot import module {module_name!r} of {spec!r} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())})"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: {module_name!r} has no attribute {attr!r} ({spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {spec!r} is not callable (it is a {type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


def target_signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """The signature of a factory, None when it has none."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: accept any keywords
        return None


def keyword_names(sig: inspect.Signature | None) -> set[str] | None:
    """The keyword-passable parameter names, or None when any keyword is accepted."""
    if sig is None:
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n for n, p in sig.parameters.items() if p.kind in kinds}


def takes_any_keyword(sig: inspect.Signature | None) -> bool:
    """Whether a factory with this signature accepts any keyword (``**kwargs``)."""
    return sig is None or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    )


def check_target(spec: str, kwargs: dict[str, Any], prefix: str = "model") -> None:
    """Config-time checks of ``model.target`` / ``model.kwargs``: the factory imports and is
    callable, and every ``kwargs`` key is one of its parameters and not a section argument."""
    fn = import_target(spec, f"{prefix}.target")
    sig = target_signature(fn)
    named = keyword_names(sig) or set()
    for key in kwargs:
        if key in SECTION_ARGS:
            section = "grad.correction" if key == "correction" else key
            raise ConfigError(
                f"{prefix}.kwargs.{key}: is built by the trainer from the {section} section; "
                f"set it there"
            )
        if key not in named and not takes_any_keyword(sig):
            params = ", ".join(sorted(named)) or "none"
            raise ConfigError(
                f"{prefix}.kwargs.{key}: not a parameter of {prefix}.target {spec!r}; "
                f"its parameters: {params}"
            )
