"""breastscan.registry.audit (the audit trail), promotion.rollback and the `breastscan history` /
`rollback` commands, on a SQLite store.

Versions are registered from a tiny artifact directory (promotion never opens the model, so
no Keras model is built); every test registers versions of its own registered model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from breastscan.cli import main as cli
from breastscan.config import ModelConfig
from breastscan.registry import audit, promotion, versions
from breastscan.registry.resolver import RegistryError
from tests.integration import test_promotion_safety as promotion_safety
from tests.unit.test_registry import GOOD, alias_version, make_cfg, reg

registry = promotion_safety.registry


def invoke(args: list[str]) -> Any:
    """Run the ``breastscan`` command on the store this process's MLflow client uses (named in
    the command's environment: the CLI reads ``MLFLOW_TRACKING_URI``, as a shell would give it)."""
    import mlflow

    return CliRunner().invoke(cli, args, env={"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()})
"""A SQLite store and a tiny model artifact every version is registered from (``reg``'s store)."""


@pytest.fixture(autouse=True)
def actor(monkeypatch: pytest.MonkeyPatch) -> str:
    """Who acts in these tests: a fixed OS user, no release-job identity."""
    monkeypatch.delenv(audit.ACTOR_ENV, raising=False)
    monkeypatch.setattr(audit.getpass, "getuser", lambda: "alice")
    return "alice"


def auc(value: float) -> dict[str, Any]:
    """A report whose headline is ``value`` (accuracy 0.7)."""
    return {**GOOD, "macro_auc": value, "headline_value": value}


def kinds(name: str) -> list[tuple[str, int | None, int | None]]:
    return [(e.kind, e.from_version, e.to_version) for e in audit.read_events(name)]


def test_promote_promote_rollback_history_in_order_with_who_why_and_numbers(registry: dict[str, Any]) -> None:
    cfg = make_cfg("trail")
    v1, v2 = reg(registry, cfg, auc(0.85)), reg(registry, cfg, auc(0.86))
    assert promotion.promote(cfg, version=v1, reason="first release").passed
    assert promotion.promote(cfg, version=v2).passed
    result = promotion.rollback(cfg, reason="site B complaints")
    assert result.passed and not result.forced and (result.version, result.previous) == (v1, v2)
    assert alias_version(cfg.registered_name, "production") == v1
    assert {c["gate"] for c in result.checks} == {"floor:macro_auc", "floor:accuracy"}  # no regression gate

    events = audit.read_events("trail")
    assert [(e.kind, e.from_version, e.to_version) for e in events] == [
        ("promote", None, v1), ("promote", v1, v2), ("rollback", v2, v1)]
    assert [e.reason for e in events] == ["first release", None, "site B complaints"]
    assert {e.who for e in events} == {"alice"} and all(e.stage == "production" for e in events)
    assert events[0].when < events[1].when < events[2].when
    floor = next(g for g in events[1].gates if g.name == "floor:macro_auc")
    assert (floor.value, floor.threshold, floor.passed) == (0.86, 0.7, True)
    regression = next(g for g in events[1].gates if g.name == "regression:macro_auc")
    assert regression.threshold == pytest.approx(0.82) and regression.passed

    table = invoke(["history", "trail"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()  # the table; MLflow may log to stderr
    assert lines[0].split()[:4] == ["when", "(UTC)", "who", "kind"]
    assert [line.split()[3] for line in lines[1:]] == ["promote", "promote", "rollback"]
    assert "site B complaints" in lines[3] and f"v{v2} -> v{v1}" in lines[3]
    assert "floor:macro_auc 0.860 >= 0.700 ok" in lines[2]
    as_json = invoke(["history", "breastscan-trail", "--json"])
    assert json.loads(as_json.stdout) == [e.to_dict() for e in events]


def test_the_default_rollback_goes_to_the_previous_holder_of_the_stage(registry: dict[str, Any]) -> None:
    cfg = make_cfg("previous", floors={})
    v1, v2, v3 = (reg(registry, cfg) for _ in range(3))
    for version in (v1, v2, v3):
        assert promotion.promote(cfg, version=version).passed
    assert promotion.rollback(cfg, reason="v3 bad").version == v2
    assert promotion.rollback(cfg, reason="v2 too", to_version=v1).version == v1
    assert alias_version(cfg.registered_name, "production") == v1
    mv = MlflowClient().get_model_version(cfg.registered_name, str(v1))
    assert mv.tags["promoted_from"] == str(v2) and mv.current_stage == "Production"
    assert mv.tags[versions.TAG_AUDIT_LAST].startswith("rollback by alice at ")


def test_a_rollback_to_a_version_that_never_held_the_stage_is_refused(registry: dict[str, Any]) -> None:
    cfg = make_cfg("never", floors={})
    v1, v2, v3 = (reg(registry, cfg) for _ in range(3))
    with pytest.raises(RegistryError, match="holds @production: nothing to roll back"):
        promotion.rollback(cfg, reason="x")
    assert promotion.promote(cfg, version=v1).passed
    with pytest.raises(RegistryError, match=f"holding @production before v{v1}"):
        promotion.rollback(cfg, reason="nothing before v1")
    assert promotion.promote(cfg, version=v2).passed
    with pytest.raises(RegistryError, match=rf"v{v3} of breastscan-never never held @production "
                                            rf"\(versions on record: v{v1}, v{v2}\)"):
        promotion.rollback(cfg, reason="x", to_version=v3)
    with pytest.raises(RegistryError, match="holds @production already"):
        promotion.rollback(cfg, reason="x", to_version=v2)
    with pytest.raises(ValueError, match="needs a reason"):
        promotion.rollback(cfg, reason="  ")
    assert alias_version(cfg.registered_name, "production") == v2
    assert [k for k, _, _ in kinds("never")] == ["promote", "promote"]  # refusals of the target: no event


def test_a_floor_refuses_a_rollback_unless_forced_and_the_event_says_forced(registry: dict[str, Any]) -> None:
    lax = make_cfg("floored", floors={})
    v1, v2 = reg(registry, lax, auc(0.72)), reg(registry, lax, auc(0.9))
    assert promotion.promote(lax, version=v1).passed and promotion.promote(lax, version=v2).passed
    strict = make_cfg("floored", floors={"macro_auc": 0.8})  # the floor was raised since v1 held the stage
    refused = promotion.rollback(strict, reason="v2 drifts")
    assert not refused.passed and refused.failures == ["macro_auc 0.720 < floor 0.800"]
    assert alias_version(strict.registered_name, "production") == v2
    forced = promotion.rollback(strict, reason="v2 drifts; v1 is the lesser evil", force=True)
    assert forced.passed and forced.forced and forced.failures == ["macro_auc 0.720 < floor 0.800"]
    assert alias_version(strict.registered_name, "production") == v1
    last = audit.read_events("floored")[-2:]
    assert [(e.kind, e.forced) for e in last] == [("rollback_refused", False), ("rollback", True)]
    assert [(g.name, g.value, g.threshold, g.passed) for g in last[1].gates] == [
        ("floor:macro_auc", 0.72, 0.8, False)]
    description = MlflowClient().get_model_version(strict.registered_name, str(v1)).description
    assert "rolled back to @production" in description and "forced past 1 failed gate(s)" in description


def test_the_rollback_command_refuses_then_forces(registry: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    lax = make_cfg("clirb", floors={})
    v1, v2 = reg(registry, lax, auc(0.72)), reg(registry, lax, auc(0.9))
    assert promotion.promote(lax, version=v1).passed and promotion.promote(lax, version=v2).passed
    strict = make_cfg("clirb", floors={"macro_auc": 0.8})

    class Params:
        def model(self, name: str) -> ModelConfig:
            return strict

    monkeypatch.setattr("breastscan.config.load_params", lambda path: Params())
    no_reason = invoke(["rollback", "clirb"])
    assert no_reason.exit_code == 2 and "--reason" in no_reason.output
    refused = invoke(["rollback", "clirb", "--reason", "bad"])
    assert refused.exit_code == 1
    assert "[FAIL] floor:macro_auc: macro_auc 0.720 < floor 0.800" in refused.output
    assert f"refused: breastscan-clirb stays on v{v2}" in refused.output
    forced = invoke(["rollback", "clirb", "--reason", "bad", "--force"])
    assert forced.exit_code == 0, forced.output
    assert f"breastscan-clirb v{v1} is back at stage production (was v{v2}, forced past 1" in forced.output
    never = invoke(["rollback", "clirb", "--reason", "x", "--to-version", "9"])
    assert never.exit_code == 1 and "v9 of breastscan-clirb never held @production" in never.output


def test_versions_promoted_before_the_trail_roll_back_by_their_tags(registry: dict[str, Any]) -> None:
    """Only the promoted_to / promoted_from tags an older promotion wrote: the rollback reads those."""
    cfg = make_cfg("pretrail", floors={})
    v1, v2 = reg(registry, cfg), reg(registry, cfg)
    client = MlflowClient()
    client.set_registered_model_alias(cfg.registered_name, "production", str(v2))
    for key, value in {"promoted_to": "production", "promoted_from": str(v1)}.items():
        client.set_model_version_tag(cfg.registered_name, str(v2), key, value)
    assert audit.read_events("pretrail") == []
    assert promotion.rollback(cfg, reason="back").version == v1
    assert kinds("pretrail") == [("rollback", v2, v1)]


def test_breastscan_actor_names_who(registry: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(audit.ACTOR_ENV, "release-job 42 (ci@example.org)")
    cfg = make_cfg("actor")
    reg(registry, cfg)
    assert promotion.promote(cfg, reason="release 1.2").passed
    (event,) = audit.read_events("actor")
    assert event.who == "release-job 42 (ci@example.org)" and event.reason == "release 1.2"
    assert event.host and event.git_commit
    run = MlflowClient().get_run(event.run_id or "")
    assert run.data.tags["audit.who"] == event.who and run.data.tags["audit.kind"] == "promote"
    assert run.info.status == "FINISHED"


def test_a_refused_promotion_is_an_event_with_the_failing_gates_numbers(registry: dict[str, Any]) -> None:
    cfg = make_cfg("refused")
    version = reg(registry, cfg, auc(0.61))
    result = promotion.promote(cfg, reason="try it")
    assert not result.passed
    (event,) = audit.read_events("refused")
    assert (event.kind, event.from_version, event.to_version) == ("refuse", None, version)
    assert event.reason == "try it"
    assert [(g.name, g.value, g.threshold, g.passed) for g in event.failed] == [
        ("floor:macro_auc", 0.61, 0.7, False)]
    assert event.failed[0].detail == "macro_auc 0.610 < floor 0.700"
    tags = MlflowClient().get_model_version(cfg.registered_name, str(version)).tags
    assert tags[versions.TAG_AUDIT_LAST].startswith("refuse by alice at ")
    assert MlflowClient().get_run(event.run_id or "").data.tags["audit.gates_failed"] == "floor:macro_auc"


def test_the_description_is_the_card_in_brief_and_notes_the_promotion(registry: dict[str, Any]) -> None:
    cfg = make_cfg("described")
    version = reg(registry, cfg)
    client = MlflowClient()
    registered = client.get_model_version(cfg.registered_name, str(version)).description
    assert "**macro_auc = 0.850** (95% CI 0.780-0.910, bootstrap)" in registered
    assert "Not for diagnosis" in registered and "test split `split-a` (79 images)" in registered
    assert "macro_auc 0.850 vs floor 0.700 (ok)" in registered
    assert versions.STAGE_NOTE_MARKER not in registered
    assert promotion.promote(cfg, reason="go").passed
    promoted = client.get_model_version(cfg.registered_name, str(version)).description
    summary, note = promoted.split(versions.STAGE_NOTE_MARKER)
    assert summary == registered  # the card in brief is kept, the note appended
    assert note.startswith("promoted to @production at ") and "by alice, from none" in note
    assert "Reason: go" in note and "floor:macro_auc 0.850 >= 0.700 ok" in note
    assert len(promoted) <= versions.DESCRIPTION_LIMIT


def test_events_survive_and_a_service_records_a_swap_once(registry: dict[str, Any]) -> None:
    cfg = make_cfg("survive", floors={})
    v1 = reg(registry, cfg)
    assert promotion.promote(cfg).passed
    swap = audit.record_event("survive", "swap", from_version=None, to_version=v1,
                              reason="alias moved; the service now serves v1")
    assert swap.run_id and swap.model == "breastscan-survive"
    first = audit.read_events("survive")
    assert audit.write_event(first[-1]).run_id == swap.run_id  # its event_id is there: not written again
    again = audit.read_events("breastscan-survive", client=MlflowClient())
    assert again == first and [e.kind for e in again] == ["promote", "swap"]
    assert audit.read_events("survive", stage="staging") == []
    assert audit.read_events("nobody") == []
    with pytest.raises(ValueError, match="not one of"):
        audit.record_event("survive", "delete")


def test_an_interrupted_promotion_records_its_event_once(registry: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg("resumed", floors={})
    v1 = reg(registry, cfg)

    def broken(*args: Any) -> str:
        raise RuntimeError("registry down")

    with monkeypatch.context() as mp:
        mp.setattr(promotion, "set_stage_note", broken)  # fails after the event is written
        with pytest.raises(RuntimeError, match="registry down"):
            promotion.promote(cfg, reason="first")
    tags = MlflowClient().get_registered_model(cfg.registered_name).tags
    assert promotion.PENDING_TAG_PREFIX + "production" in tags
    assert promotion.promote(cfg).passed  # finishes the interrupted one; v1 holds already
    (event,) = audit.read_events("resumed")
    assert (event.kind, event.to_version, event.reason) == ("promote", v1, "first")
    assert "Reason: first" in MlflowClient().get_model_version(cfg.registered_name, str(v1)).description


def test_a_long_event_is_split_across_tags_and_read_back_whole(registry: dict[str, Any]) -> None:
    gates = [audit.GateResult(f"floor:m{i}", i % 2 == 0, 0.5, 0.6, "x" * 150) for i in range(80)]
    event = audit.record_event("long", "refuse", to_version=1, gates=gates, reason="r" * audit.MAX_REASON)
    tags = MlflowClient().get_run(event.run_id or "").data.tags
    assert int(tags["audit.event.parts"]) > 1
    assert all(len(v) <= 8000 for v in tags.values())
    assert audit.read_events("long") == [event]
    with pytest.raises(ValueError, match="too long"):
        audit.new_event("long", "refuse", stage="production", from_version=None, to_version=1,
                        reason="r" * (audit.MAX_REASON + 1))
    cfg = make_cfg("long")
    reg(registry, cfg)
    with pytest.raises(ValueError, match="too long"):  # refused before any gate runs: no event
        promotion.promote(cfg, reason="r" * (audit.MAX_REASON + 1))
    assert audit.read_events("long") == [event]
    assert replace(event, run_id=None).to_dict()["gates"][0]["detail"] == "x" * 150
