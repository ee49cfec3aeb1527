"""Run specs: pydantic models, YAML loading, ``--set`` overrides and readable errors.

Component references are ``{type: <registered name>, ...config}``. Their types are unions over
the registry's configs, so the concrete spec model exists only once plugins have loaded:
:func:`spec_model` builds it from a :class:`~vermeer_core.registry.Registry`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_serializer, model_validator
from pydantic.fields import FieldInfo

from vermeer_core.registry import Registry

__all__ = [
    "SpecError",
    "RunSpec",
    "spec_model",
    "load_spec",
    "parse_spec",
    "apply_overrides",
    "spec_hash",
    "dump_spec",
    "RESUMABLE_CHANGES",
    "spec_changes",
]


class SpecError(ValueError):
    """A spec the user wrote is wrong. ``problems`` holds (dotted path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{path}: {msg}" if path else msg for path, msg in problems]
        super().__init__(f"invalid spec {source}:\n  " + "\n  ".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _ref(default: dict[str, Any] | None = None, description: str = "") -> Any:
    if default is None:
        return Field(..., description=description)
    return Field(default_factory=lambda: dict(default), validate_default=True, description=description)


class ModelSpec(_Strict):
    grid: int = Field(16, ge=1, description="side of the core's token grid (G)")
    cond_dim: int = Field(256, gt=0, description="width of the time + pooled-text conditioning vector")
    widths: dict[int, int] = Field(
        ...,
        description="conv channels per resolution G*2^i, from G (the core's input/output "
        "channels) up to the largest stage resolution",
    )
    core: Any = _ref(description="core component, e.g. {type: shallow-uvit, width: 512, depth: 8}")
    block: Any = _ref({"type": "resblock"}, "encoder/decoder block family")
    text_encoder: Any = _ref({"type": "tiny"}, "text encoder")
    attention: Any = _ref({"type": "auto"}, "attention kernel for the core")


class UniformT(_Strict):
    type: Literal["uniform"] = "uniform"


class LogitNormalT(_Strict):
    """t = sigmoid(mean + std z), z ~ N(0, 1) (Esser et al. 2024, SD3)."""

    type: Literal["logit-normal"]
    mean: float = Field(0.0, allow_inf_nan=False, description="location in logit(t); > 0 is noisier")
    std: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="spread in logit(t)")


class UniformWeight(_Strict):
    type: Literal["uniform"] = "uniform"


class MinSNRWeight(_Strict):
    """Min-SNR-gamma loss weighting (Hang et al. 2023)."""

    type: Literal["min-snr"]
    gamma: float = Field(5.0, gt=0.0, allow_inf_nan=False, description="SNR above which examples stop gaining weight")


class DiffusionSpec(_Strict):
    schedule: Any = _ref({"type": "shifted-cosine"}, "noise schedule")
    prediction: Literal["v", "eps"] = Field("v", description="what the network predicts")
    cond_drop: float = Field(0.1, ge=0.0, le=1.0, description="caption dropout probability (for CFG)")
    conditioning: Literal["logsnr", "normalized-logsnr"] = Field(
        "logsnr",
        description=(
            "noise level the model is conditioned on: its input's log-SNR, or that plus "
            "2 log(R / R0) (R0 = the first stage's resolution), the level of the core's "
            "R0-grid features, so a grown model tells its core the levels it was pretrained on"
        ),
    )
    t_sampling: Annotated[Union[UniformT, LogitNormalT], Field(discriminator="type")] = Field(
        default_factory=UniformT,
        description="training distribution of t: {type: uniform} or {type: logit-normal, mean: 0, std: 1}",
    )
    loss_weight: Annotated[Union[UniformWeight, MinSNRWeight], Field(discriminator="type")] = Field(
        default_factory=UniformWeight,
        description="per-example loss weight by noise level: {type: uniform} or {type: min-snr, gamma: 5}",
    )

    @model_serializer(mode="wrap")
    def _drop_defaults(self, handler: Any) -> dict[str, Any]:
        # The newer options are left out of a dump while they are the default, so specs (and
        # runs checkpointed) from before they existed keep their hash and still resume.
        out = handler(self)
        for key in ("t_sampling", "loss_weight"):
            if out.get(key) == {"type": "uniform"}:
                del out[key]
        if out.get("conditioning") == "logsnr":
            del out["conditioning"]
        return out


DEFAULT_PROMPTS = (
    "a large red circle",
    "a small blue square above a large yellow triangle",
    "two green circles",
    "a small pink triangle left of a large red square",
)


class SamplingSpec(_Strict):
    sampler: Any = _ref({"type": "dpmpp-2m"}, "reverse-process solver")
    steps: int = Field(32, gt=0, le=10_000, description="sampling steps (at most 10000)")
    grid: Literal["logsnr", "t"] = Field(
        "logsnr", description="spacing of the sampler's noise levels: uniform in log-SNR or in t"
    )
    guidance: float = Field(3.0, ge=0.0, description="classifier-free guidance weight; 1 = none")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)
    seed: int = 0


DEFAULT_METRICS = ({"type": "alignment"}, {"type": "swd"})


class EvalSpec(_Strict):
    """Evaluation at the end of every stage (and the defaults of ``vermeer eval``): images for
    held-out prompts of the run's dataset, scored by ``metric`` components."""

    prompts: int = Field(64, gt=0, le=100_000, description="number of held-out prompts")
    seed: int = Field(1234, ge=0, description="which held-out prompts, and the sampling noise")
    metrics: list[Any] = Field(
        default_factory=lambda: [dict(m) for m in DEFAULT_METRICS], validate_default=True,
        description="metric components, e.g. [{type: alignment}, {type: swd}, {type: fd-efficientnet}]",
    )
    steps: int | None = Field(None, gt=0, le=10_000, description="sampling steps (default: sampling.steps)")
    guidance: float | None = Field(None, ge=0.0, description="CFG weight (default: sampling.guidance)")
    batch_size: int = Field(16, gt=0, description="images generated and scored per batch")


class OptimSpec(_Strict):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear warmup at the start of every phase")
    decay: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = Field(1.0, gt=0)


class EMASpec(_Strict):
    decay: float = Field(0.999, ge=0.0, lt=1.0, description="the decay an average reaches (its maximum)")
    warmup_power: float = Field(
        2 / 3, ge=0.0,
        description="EMA warmup: a parameter updated n times averages with decay "
        "min(decay, 1 - (1 + n)^-power), so layers added at a growth are not held at their "
        "initial values; 0 = constant decay",
    )


class TrainSpec(_Strict):
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: FSDP MixedPrecisionPolicy on CUDA, autocast on CPU"
    )
    log_every: int = Field(
        10, gt=0,
        description="steps between metrics records; also how often the host reads the device (non-finite "
        "steps are skipped on the device at once, but counted against max_bad_steps/max_skipped_fraction "
        "only then, so a stop can come up to log_every-1 steps late)",
    )
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, ge=2, description="the newest committed checkpoints kept; older ones are removed")
    keep_stage_ends: bool = Field(
        False, description="also keep every stage's final checkpoint (the branch points of `vermeer run --from`)"
    )
    verify_checkpoints: bool = Field(
        True, description="on resume, check every checkpoint file against the digest its commit marker records "
        "(off: sizes and metadata only, faster for very large checkpoints)",
    )
    max_bad_steps: int = Field(
        5, gt=0, description="non-finite steps in a row that stop the run (counted across phases and stages)"
    )
    max_skipped_fraction: float = Field(
        0.1, ge=0.0, le=1.0,
        description="a phase that skips more than this share of its steps as non-finite stops the run",
    )
    activation_checkpointing: bool = False
    compile: bool = False
    replicate: int = Field(1, ge=1, description="HSDP replica groups (1 = plain FSDP)")


class StageSpec(_Strict):
    resolution: int = Field(..., gt=0)
    batch_size: int = Field(..., gt=0, description="global batch size")
    growth: Any = _ref(description="growth policy, e.g. {type: greedy}")


class RunSpec(_Strict):
    name: str = Field(
        ..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
        description="run name: one path segment (the default run directory is runs/<name>)",
    )
    seed: int = 0
    model: ModelSpec
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    data: Any = _ref({"type": "synthetic"}, "dataset")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    ema: EMASpec | None = Field(default_factory=EMASpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec | None = Field(None, description="metrics at the end of every stage (optional)")
    stages: list[StageSpec] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _cross_field(self) -> RunSpec:
        grid = self.model.grid
        problems: list[str] = []
        if set(self.name) <= {"."}:
            problems.append(f"name: {self.name!r} is not a usable directory name (it would put the run in "
                            "runs/ itself or above it); use letters, digits, '.', '_' or '-'")
        prev = 0
        for i, stage in enumerate(self.stages):
            r = stage.resolution
            k = math.log2(r / grid) if r >= grid else -1.0
            if k < 0 or k != int(k):
                options = ", ".join(str(grid * 2**j) for j in range(0, 7))
                problems.append(
                    f"stages.{i}.resolution: {r} is not grid*2^k (grid={grid}); use one of {options}, ..."
                )
            if r <= prev:
                problems.append(f"stages.{i}.resolution: {r} must be larger than the previous stage's {prev}")
            prev = max(prev, r)
        needed = []
        r = grid
        while r <= prev:
            needed.append(r)
            r *= 2
        missing = [r for r in needed if r not in self.model.widths]
        if missing:
            problems.append(f"model.widths: missing channels for resolution(s) {missing} (needed: {needed})")
        extra = sorted(set(self.model.widths) - set(needed))
        if extra:
            problems.append(f"model.widths: resolution(s) {extra} are not used by any stage (used: {needed})")
        bad = [f"{r}: {c}" for r, c in self.model.widths.items() if c <= 0]
        if bad:
            problems.append(f"model.widths: channels must be positive ({', '.join(bad)})")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def spec_model(registry: Registry) -> type[RunSpec]:
    """The RunSpec model whose component fields are unions over ``registry``'s configs (built
    once per registry state, so specs parsed against the same registry compare equal)."""
    if "spec_model" not in registry.cache:
        registry.cache["spec_model"] = _build_spec_model(registry)
    return registry.cache["spec_model"]


def _build_spec_model(registry: Registry) -> type[RunSpec]:
    def component(kind: str, base: type[BaseModel], field: str) -> tuple[Any, FieldInfo]:
        models = registry.spec_models(kind)
        info = base.model_fields[field]
        if len(models) == 1:
            return models[0], info
        # the base field's default/description plus a discriminator on ``type``
        return Union[tuple(models)], FieldInfo.merge_field_infos(info, discriminator="type")

    model = create_model(
        "ModelSpec",
        __base__=ModelSpec,
        core=component("core", ModelSpec, "core"),
        block=component("block", ModelSpec, "block"),
        text_encoder=component("text_encoder", ModelSpec, "text_encoder"),
        attention=component("attention", ModelSpec, "attention"),
    )
    diffusion = create_model(
        "DiffusionSpec", __base__=DiffusionSpec, schedule=component("noise_schedule", DiffusionSpec, "schedule")
    )
    sampling = create_model("SamplingSpec", __base__=SamplingSpec, sampler=component("sampler", SamplingSpec, "sampler"))
    stage = create_model("StageSpec", __base__=StageSpec, growth=component("growth_policy", StageSpec, "growth"))
    extra: dict[str, Any] = {}
    if any(c.kind == "metric" for c in registry):  # else ``eval`` keeps unvalidated mappings
        models = registry.spec_models("metric")
        one = models[0] if len(models) == 1 else Annotated[Union[tuple(models)], Field(discriminator="type")]
        metrics = (list[one], EvalSpec.model_fields["metrics"])  # type: ignore[valid-type]
        evaluation = create_model("EvalSpec", __base__=EvalSpec, metrics=metrics)
        extra["eval"] = (evaluation | None, RunSpec.model_fields["eval"])
    return create_model(
        "RunSpec",
        __base__=RunSpec,
        model=(model, ...),
        diffusion=(diffusion, Field(default_factory=lambda: diffusion())),
        data=component("dataset", RunSpec, "data"),
        sampling=(sampling, Field(default_factory=lambda: sampling())),
        stages=(list[stage], Field(..., min_length=1)),
        **extra,
    )


# --- errors ---------------------------------------------------------------------------------
def _readable_loc(loc: tuple[Any, ...], data: Any) -> str:
    """Dotted path of a pydantic error location without union tags (``growth.greedy.x`` ->
    ``growth.x``), following the input data to tell tags from keys."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(node, dict) and item not in node and str(item) not in node:
            if node.get("type") == item:
                continue  # the discriminator tag pydantic inserts
            if isinstance(item, str) and item.endswith("]"):  # dict-key errors: '[key]'
                parts.append(item)
                node = None
                continue
        parts.append(str(item))
        if isinstance(node, dict):
            node = node.get(item, node.get(str(item)))
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            node = node[item]
        else:
            node = None
    return ".".join(parts)


def _message(err: dict[str, Any], registry: Registry | None = None) -> str:
    ctx = err.get("ctx") or {}
    note = registry.failures_note() if registry is not None else ""
    if err["type"] == "union_tag_invalid":
        return f"unknown type {ctx.get('tag')!r}; registered: {ctx.get('expected_tags')}{note}"
    if err["type"] == "union_tag_not_found":
        return "missing 'type': say which registered component to use"
    if err["type"] == "literal_error" and err["loc"] and err["loc"][-1] == "type":
        return f"unknown type {err.get('input')!r}; registered: {ctx.get('expected')}{note}"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


_UNIONS = (Union, types.UnionType)


def _field_names_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the pydantic model found by following ``loc`` (a pydantic error
    location, union tags included) from ``model``; empty when the path leads elsewhere."""
    node: Any = model
    for item in loc:
        node = _strip(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            if item not in node.model_fields:
                return []
            node = node.model_fields[item].annotation
        elif get_origin(node) in (list, tuple) and isinstance(item, int):
            node = (get_args(node) or (Any,))[0]
        elif get_origin(node) is dict:
            node = (get_args(node) or (Any, Any))[-1]
        elif get_origin(node) in _UNIONS:  # a discriminated union: ``item`` is the tag
            node = next((m for m in get_args(node) if _type_tag(m) == item), None)
        else:
            return []
    node = _strip(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _strip(node: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> ``X``."""
    while True:
        if get_origin(node) is Annotated:
            node = get_args(node)[0]
        elif get_origin(node) in _UNIONS and type(None) in get_args(node):
            rest = [a for a in get_args(node) if a is not type(None)]
            node = rest[0] if len(rest) == 1 else Union[tuple(rest)]
        else:
            return node


def _type_tag(member: Any) -> Any:
    if isinstance(member, type) and issubclass(member, BaseModel) and "type" in member.model_fields:
        args = get_args(member.model_fields["type"].annotation)
        return args[0] if args else None
    return None


def _suggestion(model: Any, loc: tuple[Any, ...]) -> str:
    """For an unknown key: ``"; did you mean 'depth'?"`` when a field's name is close."""
    key = loc[-1] if loc else None
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, _field_names_at(model, tuple(loc[:-1])), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _problems(
    exc: ValidationError, data: Any, registry: Registry | None = None, model: Any = None
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        path = _readable_loc(tuple(err["loc"]), data)
        msg = _message(err, registry)
        if err["type"] == "extra_forbidden" and model is not None:
            msg += _suggestion(model, tuple(err["loc"]))
        if not path:
            # cross-field rules name their own paths, one problem per line
            for line in msg.split("\n"):
                p, sep, m = line.partition(": ")
                out.append((p, m) if sep and " " not in p else ("", line))
        else:
            out.append((path, msg))
    return out


# --- loading --------------------------------------------------------------------------------
def _set_path(data: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise SpecError(source, [(where, f"--set: no list item {key!r} (the list has {len(node)} items)")])
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise SpecError(source, [(where, f"--set: cannot descend into a {type(node).__name__}")])


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "<spec>") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML: numbers, bools, lists...)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(source, [("", f"--set {item!r}: expected KEY=VALUE, e.g. stages.0.batch_size=8")])
        try:
            value = safe_load_bounded(raw, "--set") if raw != "" else ""
        except yaml.YAMLError as exc:
            raise SpecError(source, [(key, f"--set value {raw!r} is not valid YAML: {exc}")]) from None
        _set_path(data, key.strip(), value, source)
    return data


#: Largest spec file read (bytes): specs are a few KB; anything near this is not a spec.
MAX_SPEC_BYTES = 1 << 20
#: Largest number of YAML nodes a document may expand to, aliases counted as often as they are
#: used: a "billion laughs" document of a few hundred bytes expands to billions.
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents whose aliases expand beyond
    :data:`MAX_YAML_NODES` nodes or refer to themselves (PyYAML shares aliased objects, so the
    bomb goes off later, when the spec is copied, validated or dumped)."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expansion(node, self.name)
        return node


def _check_expansion(root: yaml.Node, source: str) -> None:
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:  # expanded node count, each shared node computed once
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise yaml.YAMLError(f"a YAML alias refers to the node that contains it ({node.start_mark})")
        active.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                break
        active.discard(key)
        sizes[key] = total
        return total

    if size(root) > MAX_YAML_NODES:
        raise yaml.YAMLError(
            f"the document expands to more than {MAX_YAML_NODES} values through YAML aliases (&anchor/*alias); "
            "a spec needs far fewer: write the values out or use fewer aliases"
        )


def safe_load_bounded(text: str, name: str = "<string>") -> Any:
    """``yaml.safe_load`` with aliases bounded (see :class:`_BoundedLoader`)."""
    loader = _BoundedLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise SpecError(str(path), [("", f"spec file not found: {path} (working directory: {Path.cwd()})")])
    if path.is_dir():
        raise SpecError(str(path), [("", f"{path} is a directory; give a .yaml spec file")])
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError(str(path), [("", f"{path} is {size} bytes; a spec is at most {MAX_SPEC_BYTES} bytes "
                                         "(is this the right file?)")])
    raw = path.read_bytes()[: MAX_SPEC_BYTES + 1]  # the file may have grown since stat
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(str(path), [("", f"{path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} "
                                         f"(offset {exc.start}); save the spec as UTF-8")]) from None
    try:
        data = safe_load_bounded(text, str(path))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise SpecError(str(path), [("", f"YAML syntax error at {where}: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [("", f"YAML error: {exc}")]) from None
    if not isinstance(data, dict):
        raise SpecError(str(path), [("", f"the spec must be a YAML mapping, got {type(data).__name__}")])
    return data


def parse_spec(data: dict[str, Any], registry: Registry, source: str = "<spec>") -> RunSpec:
    try:
        model = spec_model(registry)
    except ValueError as exc:  # a kind with no registered component (plugins disabled/broken)
        raise SpecError(source, [("", str(exc))]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, _problems(exc, data, registry, model)) from None


def load_spec(path: str | Path, registry: Registry, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read, override and validate a YAML spec; raises :class:`SpecError` with readable paths."""
    data = apply_overrides(read_yaml(path), list(overrides), str(path))
    return parse_spec(data, registry, str(path))


def dump_spec(spec: BaseModel) -> str:
    """The fully resolved spec as YAML (written as ``spec.lock.yaml``)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def spec_hash(spec: BaseModel | dict[str, Any]) -> str:
    """A short digest of a resolved spec (or of its ``model_dump(mode="json")``: the same digest)."""
    data = spec if isinstance(spec, dict) else spec.model_dump(mode="json")
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


# --- what a resume may change -----------------------------------------------------------------
#: Spec fields that may differ between a checkpoint and the spec it resumes under
#: (``*`` matches one path element).
RESUMABLE_CHANGES = (
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.keep_stage_ends",
    "train.verify_checkpoints",
    "train.max_bad_steps",
    "train.max_skipped_fraction",
    "sampling.*",
    "sampling.sampler.*",
    "eval",
    "eval.*",
    "stages.*.growth.phases.*.steps",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


def _allowed(path: str) -> bool:
    parts = path.split(".")
    for pattern in RESUMABLE_CHANGES:
        pat = pattern.split(".")
        if len(pat) <= len(parts) and all(p == "*" or p == q for p, q in zip(pat, parts)) and (
            len(pat) == len(parts) or pat[-1] == "*"
        ):
            return True
    return False


def spec_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed) changed field paths between two resolved specs."""
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    refused = [f"{k} ({a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r})" for k in changed if not _allowed(k)]
    return refused, [k for k in changed if _allowed(k)]
