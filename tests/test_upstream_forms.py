"""Each start form and name of the established Minions docs, as an upstream user writes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from apps.harness import Ev, running_gru, use_harness
from apps.upstream.events import Order, OrderCtx, OrderPipeline, RegionConfig, StructConfig
from apps.upstream.one_minion import OrderMinion
from conftest import run
from minions import Gru, Minion, Pipeline, minion_step


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


async def _one_workflow(gru: Gru, pipeline: object, minion: object, **kwargs: object) -> tuple:
    harness = use_harness()
    result = await gru.start_orchestration(pipeline, minion, **kwargs)  # type: ignore[arg-type]
    assert result.success, result.reason
    harness.events.put_nowait(Ev(7))
    (done,) = await harness.take(harness.finished, 1)
    return result, done


# --- start forms ------------------------------------------------------------------------------

START_FORMS = [
    ("classes", OrderPipeline, OrderMinion),
    ("module:Class", "apps.upstream.events:OrderPipeline", "apps.upstream.one_minion:OrderMinion"),
    ("module paths", "apps.upstream.one_pipeline", "apps.upstream.one_minion"),
    ("module variables", "apps.upstream.named", "apps.upstream.named"),
]


@pytest.mark.parametrize(
    ("form", "pipeline", "minion"), START_FORMS, ids=[f[0] for f in START_FORMS]
)
def test_every_start_form_runs_a_workflow(form: str, pipeline: object, minion: object) -> None:
    async def main() -> None:
        async with running_gru() as gru:
            result, done = await _one_workflow(gru, pipeline, minion)
            assert result.reason is None and result.orchestration_id
            if form == "module variables":
                assert done == ("chosen", 7)
            else:
                assert done[0] == result.orchestration_id and done[3] == 7

    run(main())


def test_a_class_and_its_module_path_address_the_same_orchestration() -> None:
    async def main() -> None:
        async with running_gru() as gru:
            by_class = await gru.start_orchestration(OrderPipeline, OrderMinion)
            assert by_class.success, by_class.reason
            by_path = await gru.start_orchestration(
                "apps.upstream.events:OrderPipeline", "apps.upstream.one_minion"
            )
            assert not by_path.success and "already running" in (by_path.reason or "")
            assert by_path.reason and by_class.orchestration_id in by_path.reason

    run(main())


@pytest.mark.parametrize(
    ("pipeline", "minion", "reason"),
    [
        ("apps.upstream.one_minion", "apps.upstream.one_minion",
         "module 'apps.upstream.one_minion' defines no Pipeline subclass"),
        (OrderPipeline, "apps.upstream.two_minions", "several Minion subclasses (First, Second)"),
        (OrderPipeline, "apps.upstream.no_such", "cannot import minion module"),
        (OrderPipeline, "apps.upstream.one_minion:Nope", "cannot import minion"),
        (OrderPipeline, "not a module", "'package.module:ClassName' or 'package.module'"),
    ],
)  # fmt: skip
def test_unusable_module_targets_are_refused_with_what_to_write(
    pipeline: object, minion: object, reason: str
) -> None:
    async def main() -> None:
        async with running_gru() as gru:
            result = await gru.start_orchestration(pipeline, minion)  # type: ignore[arg-type]
            assert gru.status().orchestrations == ()
        return result

    result = run(main())
    assert not result.success and reason in (result.reason or ""), result.reason


def test_the_ambiguous_module_error_names_the_variable_to_set() -> None:
    async def main() -> None:
        async with running_gru() as gru:
            return await gru.start_orchestration(OrderPipeline, "apps.upstream.two_minions")

    result = run(main())
    assert "`minion = <the one to run>`" in (result.reason or "")


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [RegionConfig("eu"), {"region": "eu"}], ids=["typed", "mapping"])
def test_inline_config_is_bound_as_the_declared_type(config: object) -> None:
    async def main() -> None:
        async with running_gru() as gru:
            _, done = await _one_workflow(gru, OrderPipeline, OrderMinion, minion_config=config)
            assert done[2] == "eu"

    run(main())


def test_typed_and_mapping_configs_address_the_same_orchestration() -> None:
    async def main() -> None:
        async with running_gru() as gru:
            typed = await gru.start_orchestration(
                OrderPipeline, OrderMinion, minion_config=RegionConfig("eu", 1)
            )
            mapping = await gru.start_orchestration(
                OrderPipeline, OrderMinion, minion_config={"region": "eu", "retries": 1}
            )
            assert typed.success and not mapping.success
            assert typed.orchestration_id and typed.orchestration_id in (mapping.reason or "")

    run(main())


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (StructConfig("eu"), "OrderMinion.config is declared as RegionConfig, got StructConfig"),
        ({"region": 5}, "Expected `str`, got `int` - at `$.region`"),
        ({"retries": 2}, "missing required field `region`"),
        (42, "minion_config must be a mapping, a dataclass or msgspec.Struct instance"),
    ],
)
def test_bad_inline_config_is_refused_naming_the_field(config: object, reason: str) -> None:
    async def main() -> None:
        harness = use_harness()
        async with running_gru() as gru:
            result = await gru.start_orchestration(OrderPipeline, OrderMinion, minion_config=config)
        assert harness.lifecycle == []
        return result

    result = run(main())
    assert not result.success and reason in (result.reason or ""), result.reason


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("a.toml", 'region = "eu"\nretries = 3\n'),
        ("a.json", json.dumps({"region": "eu", "retries": 3})),
    ],
)
def test_a_config_file_is_read_and_converted(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / name).write_text(text)

    async def main() -> None:
        async with running_gru() as gru:
            _, done = await _one_workflow(
                gru, "apps.upstream.events:OrderPipeline", "apps.upstream.one_minion",
                minion_config_path=f"configs/{name}",
            )  # fmt: skip
            assert done[2] == "eu"

    run(main())


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("bad.toml", 'region = "eu"\nretries = "three"\n',
         "configs/bad.toml: Expected `int`, got `str` - at `$.retries`"),
        ("bad.toml", "region = \n", "configs/bad.toml is not valid TOML"),
        ("bad.json", '{"retries": 1}', "configs/bad.json: Object missing required field `region`"),
        ("a.yaml", "region: eu\n", "configs/a.yaml: Minions reads TOML and JSON config files only"),
        ("missing.toml", None, "cannot read minion config file configs/missing.toml"),
    ],
)  # fmt: skip
def test_a_bad_config_file_is_refused_naming_file_and_field(
    tmp_path: Path, name: str, text: str | None, reason: str
) -> None:
    (tmp_path / "configs").mkdir()
    if text is not None:
        (tmp_path / "configs" / name).write_text(text)

    async def main() -> None:
        harness = use_harness()
        async with running_gru() as gru:
            result = await gru.start_orchestration(
                OrderPipeline, OrderMinion, minion_config_path=f"configs/{name}"
            )
            assert gru.status().orchestrations == ()
        assert harness.lifecycle == []
        return result

    result = run(main())
    assert not result.success and reason in (result.reason or ""), result.reason


class YamlMinion(Minion[Order, OrderCtx]):
    """Parses its own format, as the established docs show for anything but TOML/JSON."""

    config: RegionConfig

    async def load_config(self, config_path: str) -> RegionConfig:
        pairs = dict(line.split(": ", 1) for line in Path(config_path).read_text().splitlines())
        return RegionConfig(pairs["region"], int(pairs.get("retries", "1")))

    @minion_step
    async def record(self) -> None:
        from apps.harness import h

        h().finished.put_nowait((self.config.region, self.config.retries))


class WrongLoader(YamlMinion):
    async def load_config(self, config_path: str) -> StructConfig:  # type: ignore[override]
        return StructConfig("eu")


def test_load_config_reads_its_own_format_and_is_checked(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("region: ap\nretries: 4\n")

    async def main() -> None:
        async with running_gru() as gru:
            _, done = await _one_workflow(
                gru, OrderPipeline, YamlMinion, minion_config_path="a.yaml"
            )
            assert done == ("ap", 4)
            wrong = await gru.start_orchestration(
                OrderPipeline, WrongLoader, minion_config_path="a.yaml"
            )
            assert not wrong.success
            assert "WrongLoader.load_config(): WrongLoader.config is declared as RegionConfig, " \
                "got StructConfig" in (wrong.reason or ""), wrong.reason  # fmt: skip
            assert [o.minion for o in gru.status().orchestrations] == [
                "test_upstream_forms:YamlMinion"
            ]

    run(main())


def test_a_stamped_config_id_keeps_the_orchestration_when_the_file_moves(tmp_path: Path) -> None:
    stamped = '_minions_config_id = "44444444-4444-4444-8444-444444444444"\nregion = "eu"\n'
    (tmp_path / "old.toml").write_text(stamped)
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "new.toml").write_text(stamped)
    (tmp_path / "plain.toml").write_text('region = "eu"\n')

    async def start(gru: Gru, path: str) -> str:
        result = await gru.start_orchestration(OrderPipeline, OrderMinion, minion_config_path=path)
        assert result.success and result.orchestration_id, result.reason
        assert (await gru.stop_orchestration(result.orchestration_id)).success
        return result.orchestration_id

    async def main() -> None:
        use_harness()
        async with running_gru() as gru:
            assert await start(gru, "old.toml") == await start(gru, "moved/new.toml")
            assert await start(gru, "plain.toml") != await start(gru, "old.toml")

    run(main())


def test_inline_config_and_a_config_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('region = "eu"\n')

    async def main() -> None:
        async with running_gru() as gru:
            return await gru.start_orchestration(
                OrderPipeline, OrderMinion, minion_config=RegionConfig("eu"),
                minion_config_path="a.toml",
            )  # fmt: skip

    result = run(main())
    assert not result.success and "not both" in (result.reason or "")


# --- names ------------------------------------------------------------------------------------


def test_the_established_module_paths_export_their_names() -> None:
    import minions
    import minions.errors
    import minions.exceptions
    import minions.implementations
    import minions.interfaces
    import minions.types

    assert minions.exceptions.AbortWorkflow is minions.AbortWorkflow is minions.errors.AbortWorkflow
    assert issubclass(minions.exceptions.TaskCancellationTimeoutError, TimeoutError)
    assert {"StartResult", "StopResult", "MinionWorkflowContext", "MinionWorkflowHandle"} <= set(
        minions.types.__all__
    )
    assert {"Logger", "Metrics", "StateStore"} <= set(minions.interfaces.__all__)
    for name in ("minion_id", "pipeline_id", "resource_id", "GruRuntimeStateSnapshot"):
        assert getattr(minions, name) is not None
    pairs = [("FileLogger", "Logger"), ("NoOpLogger", "Logger"), ("SQLiteStateStore", "StateStore"),
             ("NoOpStateStore", "StateStore"), ("PrometheusMetrics", "Metrics"),
             ("NoOpMetrics", "Metrics")]  # fmt: skip
    for impl, interface in pairs:
        assert issubclass(
            getattr(minions.implementations, impl), getattr(minions.interfaces, interface)
        )


@dataclass
class Ticket:
    n: int = 0


class TicketPipeline(Pipeline[Ticket]):
    async def produce_event(self) -> Ticket:
        from apps.harness import h

        return Ticket((await h().events.get()).n)


class HandleMinion(Minion[Ticket, OrderCtx]):
    @minion_step
    async def first(self) -> None:
        from apps.harness import h

        if self.event.n == 0:
            from minions.exceptions import AbortWorkflow

            raise AbortWorkflow("zero")
        h().finished.put_nowait(self.workflow_handle)


def test_workflow_handle_and_abort_from_minions_exceptions() -> None:
    async def main() -> None:
        harness = use_harness()
        async with running_gru() as gru:
            result = await gru.start_orchestration(TicketPipeline, HandleMinion)
            harness.events.put_nowait(Ev(0))
            harness.events.put_nowait(Ev(1))
            (handle,) = await harness.take(harness.finished, 1)
            assert handle.orchestration_id == result.orchestration_id and handle.workflow_id
            (status,) = gru.status().orchestrations
            assert (status.aborted, status.succeeded) == (1, 1)
            with pytest.raises(RuntimeError, match="only available inside a @minion_step"):
                HandleMinion().workflow_handle  # noqa: B018

    run(main())


def test_results_say_none_on_success() -> None:
    async def main() -> None:
        async with running_gru() as gru:
            started = await gru.start_orchestration(TicketPipeline, HandleMinion)
            assert started.success and started.reason is None and started.suggestion is None
            assert started.orchestration_id
            stopped = await gru.stop_orchestration(started.orchestration_id)
            assert stopped.success and stopped.reason is None
            missing = await gru.stop_orchestration(started.orchestration_id)
            assert not missing.success and missing.reason
        assert (await gru.shutdown()).reason is None

    run(main())


def test_gru_create_takes_the_established_positional_arguments(tmp_path: Path) -> None:
    from minions.implementations import NoOpLogger, NoOpMetrics, NoOpStateStore

    async def main() -> None:
        gru = await Gru.create(NoOpStateStore(), NoOpLogger(), NoOpMetrics())
        try:
            assert gru.status().durable and gru.metrics_port is None
            _, done = await _one_workflow(gru, OrderPipeline, OrderMinion)
            assert done[3] == 7
        finally:
            await gru.shutdown()
        assert not (tmp_path / "minions.log").exists() and not (tmp_path / "minions.db").exists()
        none = await Gru.create(None, None, None)  # None: off, as upstream
        await none.shutdown()
        assert not (tmp_path / "minions.log").exists()

    run(main())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"workflow_failure_policy": "quarantine"}, "workflow_failure_policy must be 'delete'"),
        ({"workflow_persistence_failure_policy": "retry"}, "'continue-on-failure' or"),
        ({"workflow_persistence_retry_delay_seconds": 0}, "retry_delay_s must be > 0"),
        ({"workflow_persistence_retry_jitter_ratio": 2.0}, "jitter_ratio must be between 0 and 1"),
        ({"workflow_persistence_retry_max_delay_seconds": 0.5}, "max_delay_seconds must be >="),
    ],
)
def test_bad_policy_arguments_are_refused_by_name(kwargs: dict, match: str) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match=match):
            await Gru.create(state_store=None, metrics=False, **kwargs)
        assert Gru.current() is None

    run(main())


def test_a_state_store_class_instead_of_an_instance_says_so() -> None:
    from minions.implementations import SQLiteStateStore

    async def main() -> None:
        with pytest.raises(TypeError, match=r"an instance, SQLiteStateStore\(\),"):
            await Gru.create(SQLiteStateStore, metrics=False)

    run(main())


def test_start_and_stop_are_the_established_short_names(tmp_path: Path) -> None:
    from minions.implementations import SQLiteStateStore

    async def main() -> None:
        store = SQLiteStateStore(db_path=tmp_path / "state.db", logger=None)
        gru = await Gru.create(store, None, None)
        try:
            harness = use_harness()
            result = await gru.start("apps.upstream.named", "apps.upstream.named")
            assert result.success and result.orchestration_id, result.reason
            harness.events.put_nowait(Ev(7))
            assert await harness.take(harness.finished, 1) == [("chosen", 7)]
            stopped = await gru.stop(result.orchestration_id)
            assert stopped.success and stopped.orchestration_id == result.orchestration_id
        finally:
            await gru.shutdown()
        assert (tmp_path / "state.db").exists()

    run(main())
