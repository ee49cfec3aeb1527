"""``vermeer run SPEC --smoke``: the same stages and topology, scaled down to run on a CPU in
minutes — the proof that a spec's whole growth schedule (e.g. 64 -> 1024) executes.

Vermeer-level fields are shrunk here (widths, batch sizes, sampling, checkpoint cadence);
each component shrinks itself through its config's ``smoke()`` (see ComponentConfig), so no
code here knows a component by name.
"""

from __future__ import annotations

from typing import Any

from vermeer_core.registry import Registry
from vermeer_core.spec import RunSpec, parse_spec

__all__ = ["smoke_spec"]


def _component(cfg: Any) -> dict[str, Any]:
    return cfg.smoke().model_dump(mode="json")


def smoke_spec(spec: RunSpec, registry: Registry, world_size: int = 1) -> RunSpec:
    d = spec.model_dump(mode="json")
    m = d["model"]
    m["cond_dim"] = 32
    m["widths"] = {k: 8 for k in m["widths"]}
    for key in ("core", "block", "text_encoder", "attention"):
        m[key] = _component(getattr(spec.model, key))
    d["data"] = _component(spec.data)
    for st, ref in zip(d["stages"], spec.stages):
        st["batch_size"] = 2 * world_size
        st["growth"] = _component(ref.growth)
    d["sampling"].update(steps=2, prompts=d["sampling"]["prompts"][:1])
    if d.get("eval"):  # the metrics still run end to end, on two prompts with two steps
        d["eval"].update(prompts=2, steps=2, metrics=[_component(m) for m in spec.eval.metrics])
    d["optim"]["warmup_steps"] = 0
    d["train"].update(precision="fp32", log_every=1, compile=False)
    d["name"] = spec.name + "-smoke"
    return parse_spec(d, registry, source=f"{spec.name} (--smoke)")
