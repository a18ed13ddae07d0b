"""``await gru.runtime_state_snapshot()``: Gru's live component graph as stable identifiers.

Every component is named by its durable identity (a stamped id, else its import path) and each
running minion by its instance id, so a test or a diagnostic tool can assert on the graph without
holding references to live objects. Reference counts follow the established meaning: a
resource is referenced once by every running minion or pipeline that declares it and once by
every running resource that depends on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from minions.runtime.identity import component_identity
from minions.runtime.resources import resource_hints


@dataclass(frozen=True)
class GruRuntimeStateSnapshot:
    """Immutable relationships between the running components, by identifier."""

    minion_instances: frozenset[str]
    orchestrations: frozenset[str]
    pipelines: frozenset[str]
    resources: frozenset[str]
    minion_instance_by_orchestration: Mapping[str, str]
    pipeline_by_orchestration: Mapping[str, str]
    resources_by_minion_instance: Mapping[str, frozenset[str]]
    resources_by_pipeline: Mapping[str, frozenset[str]]
    resource_dependencies_by_dependent_resource: Mapping[str, frozenset[str]]
    resource_dependents_by_dependency_resource: Mapping[str, frozenset[str]]
    resource_reference_counts: Mapping[str, int]

    @property
    def is_empty(self) -> bool:
        return all(not getattr(self, f.name) for f in dataclasses.fields(self))

    def minion_instance_for_orchestration(self, orchestration_id: str) -> str | None:
        return self.minion_instance_by_orchestration.get(orchestration_id)

    def pipeline_for_orchestration(self, orchestration_id: str) -> str | None:
        return self.pipeline_by_orchestration.get(orchestration_id)

    def resources_for_minion(self, minion_instance_id: str) -> frozenset[str]:
        return self.resources_by_minion_instance.get(minion_instance_id, frozenset())

    def resources_for_pipeline(self, pipeline_id: str) -> frozenset[str]:
        return self.resources_by_pipeline.get(pipeline_id, frozenset())

    def dependencies_for_resource(self, resource_id: str) -> frozenset[str]:
        return self.resource_dependencies_by_dependent_resource.get(resource_id, frozenset())

    def dependents_for_resource(self, resource_id: str) -> frozenset[str]:
        return self.resource_dependents_by_dependency_resource.get(resource_id, frozenset())

    def resource_refcount(self, resource_id: str) -> int:
        return self.resource_reference_counts.get(resource_id, 0)


def build_snapshot(
    running: Iterable[tuple[str, str, type, type]],
    pipelines: Iterable[type],
    resource_deps: Mapping[type, tuple[type, ...]],
) -> GruRuntimeStateSnapshot:
    """``running``: (orchestration id, minion instance id, minion class, pipeline class)."""
    rows = list(running)
    pipeline_ids = {component_identity(cls): cls for cls in pipelines}
    by_minion = {instance: _ids(resource_hints(minion).values()) for _, instance, minion, _ in rows}
    by_pipeline = {pid: _ids(resource_hints(cls).values()) for pid, cls in pipeline_ids.items()}
    deps = {component_identity(cls): _ids(d) for cls, d in resource_deps.items()}
    dependents: dict[str, set[str]] = {}
    for dependent, needed in deps.items():
        for dep in needed:
            dependents.setdefault(dep, set()).add(dependent)
    refs: dict[str, int] = {}
    for owned in (*by_minion.values(), *by_pipeline.values(), *deps.values()):
        for rid in owned:
            refs[rid] = refs.get(rid, 0) + 1
    return GruRuntimeStateSnapshot(
        minion_instances=frozenset(instance for _, instance, _, _ in rows),
        orchestrations=frozenset(oid for oid, _, _, _ in rows),
        pipelines=frozenset(pipeline_ids),
        resources=frozenset(deps),
        minion_instance_by_orchestration=MappingProxyType({o: i for o, i, _, _ in rows}),
        pipeline_by_orchestration=MappingProxyType(
            {o: component_identity(p) for o, _, _, p in rows}
        ),
        resources_by_minion_instance=_frozen(by_minion),
        resources_by_pipeline=_frozen(by_pipeline),
        resource_dependencies_by_dependent_resource=_frozen(deps),
        resource_dependents_by_dependency_resource=_frozen(
            {k: frozenset(v) for k, v in dependents.items()}
        ),
        resource_reference_counts=MappingProxyType(refs),
    )


def _ids(classes: Iterable[type]) -> frozenset[str]:
    return frozenset(component_identity(cls) for cls in classes)


def _frozen(mapping: Mapping[str, frozenset[str]]) -> Mapping[str, frozenset[str]]:
    return MappingProxyType({k: v for k, v in mapping.items() if v})
