"""The component registry: (kind, name) -> config model + factory (tox's registration pattern)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

__all__ = ["KINDS", "Component", "ComponentConfig", "Registry"]

#: Every kind of component a plugin may register, with what it is.
KINDS: dict[str, str] = {
    "core": "transformer stack on the GxG grid (text cross-attention, time conditioning)",
    "block": "encoder/decoder stage blocks and the pixel periphery (stem, head)",
    "noise_schedule": "log-SNR(t, resolution) for the forward process",
    "growth_policy": "how a model becomes the next stage's model, and its training phases",
    "sampler": "reverse-process solver",
    "text_encoder": "captions -> token embeddings + pooled embedding",
    "dataset": "stream of (image, caption) batches at a given resolution",
    "attention": "attention kernel",
    "metric": "scores generated images of held-out prompts (alignment, distribution distances)",
}


class ComponentConfig(BaseModel):
    """Base for every component's config: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def smoke(self) -> ComponentConfig:
        """A scaled-down copy for ``vermeer run --smoke`` (every stage for a few steps on a CPU,
        same topology). The default keeps the config; override to shrink widths/depths/steps."""
        return self


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    config: type[BaseModel]
    plugin: str
    spec_model: type[BaseModel]  # ``config`` plus ``type: Literal[name]``, used inside specs


class Registry:
    """Holds every registered component. Plugins add; the rest of vermeer only looks up."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], Component] = {}
        self._current_plugin = "<direct>"
        self.cache: dict[str, Any] = {}  # derived objects (e.g. the spec model); cleared on add
        #: plugins that failed to load (set by :func:`vermeer_core.plugins.load`), so that an
        #: unknown component name can say which plugins might have provided it
        self.load_failures: list[str] = []

    def add(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any],
        config: type[BaseModel] = ComponentConfig,
    ) -> None:
        """Register ``factory`` under (kind, name); ``config`` is its pydantic config model."""
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; kinds are: {', '.join(KINDS)}")
        if not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise TypeError(f"{kind} {name!r}: config must be a pydantic model class, got {config!r}")
        if "type" in config.model_fields:
            raise ValueError(f"{kind} {name!r}: config may not define a field named 'type'")
        key = (kind, name)
        if key in self._items:
            other = self._items[key].plugin
            raise ValueError(
                f"{kind} {name!r} is registered twice: by plugin {other!r} and by "
                f"{self._current_plugin!r}; rename one or disable a plugin with "
                "VERMEER_DISABLED_PLUGINS"
            )
        spec_model = create_model(
            f"{config.__name__}[{name}]",
            __base__=config,
            type=(Literal[name], Field(description=f"selects {kind} {name!r}")),
        )
        self._items[key] = Component(kind, name, factory, config, self._current_plugin, spec_model)
        self.cache.clear()

    def get(self, kind: str, name: str) -> Component:
        try:
            return self._items[(kind, name)]
        except KeyError:
            names = ", ".join(self.names(kind)) or "(none)"
            raise KeyError(f"no {kind} named {name!r}; registered: {names}{self.failures_note()}") from None

    def names(self, kind: str) -> list[str]:
        return sorted(name for (k, name) in self._items if k == kind)

    def __iter__(self):
        return iter(sorted(self._items.values(), key=lambda c: (c.kind, c.name)))

    def build(self, ref: BaseModel, kind: str, **runtime: Any) -> Any:
        """Call the factory of the component ``ref`` selects (``ref.type``) with ``ref``.

        ``runtime`` holds objects that are not configuration (device, resolution, ...).
        """
        return self.get(kind, ref.type).factory(ref, **runtime)

    def parse(self, kind: str, data: dict[str, Any]) -> BaseModel:
        """Validate a ``{type: name, ...}`` mapping into that component's config."""
        return self.union_adapter(kind).validate_python(data)

    def spec_models(self, kind: str) -> list[type[BaseModel]]:
        """The spec-side config models (with their ``type`` literal) of every ``kind`` component."""
        models = [c.spec_model for c in self if c.kind == kind]
        if not models:
            raise ValueError(
                f"no {kind} component is registered (were plugins disabled or broken? see "
                f"`vermeer plugins`){self.failures_note()}"
            )
        return models

    def union(self, kind: str) -> Any:
        """A discriminated-union type over every registered config of ``kind``."""
        models = self.spec_models(kind)
        if len(models) == 1:
            return models[0]
        return Annotated[Union[tuple(models)], Field(discriminator="type")]

    def union_adapter(self, kind: str):
        from pydantic import TypeAdapter

        return TypeAdapter(self.union(kind))

    def failures_note(self) -> str:
        """``"; plugins that failed to load: ..."`` when some did, else empty."""
        if not self.load_failures:
            return ""
        return "; plugins that failed to load (one may provide it): " + " | ".join(self.load_failures)

    def set_current_plugin(self, name: str) -> None:
        self._current_plugin = name
