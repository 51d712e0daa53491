"""ferry.logs: the text and JSON line formats, and the phase-transition line."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ferry import logs
from ferry.settings import Settings, SettingsError


def _line(fmt: str, **extra) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter(fmt))
    log = logging.getLogger("ferry.test-logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("migration %s/%s: %s -> %s", "ns", "move", "PreCopy", "CutOver", extra=extra)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_json_lines_carry_the_message_and_the_fields_passed_with_extra() -> None:
    out = _line("json", migration="ns/move", phase="CutOver", previous_phase="PreCopy")
    assert out.count("\n") == 1
    rec = json.loads(out)
    assert rec["message"] == "migration ns/move: PreCopy -> CutOver"
    assert rec["level"] == "INFO" and rec["logger"] == "ferry.test-logs"
    assert (rec["migration"], rec["phase"], rec["previous_phase"]) == ("ns/move", "CutOver", "PreCopy")
    assert rec["time"].endswith("+00:00")


def test_text_lines_are_the_default_format() -> None:
    out = _line("text", migration="ns/move")
    assert "INFO ferry.test-logs: migration ns/move: PreCopy -> CutOver" in out
    assert logs.log_format({}) == "text"
    assert logs.log_format({"FERRY_LOG_FORMAT": "JSON"}) == "json"
    with pytest.raises(ValueError):
        logs.log_format({"FERRY_LOG_FORMAT": "xml"})


def test_settings_reject_an_unknown_log_format_and_a_bad_port() -> None:
    assert Settings.from_env({"FERRY_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SettingsError, match="FERRY_LOG_FORMAT"):
        Settings.from_env({"FERRY_LOG_FORMAT": "xml"})
    with pytest.raises(SettingsError, match="FERRY_AGENT_METRICS_PORT"):
        Settings.from_env({"FERRY_AGENT_METRICS_PORT": "70000"})


def test_an_exception_travels_in_the_json_object() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("json"))
    log = logging.getLogger("ferry.test-logs-exc")
    log.addHandler(handler)
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("cycle failed")
    finally:
        log.removeHandler(handler)
    rec = json.loads(stream.getvalue())
    assert rec["message"] == "cycle failed" and "RuntimeError: boom" in rec["exception"]
