"""One settings object for every ferry program, read from ``FERRY_*`` environment variables.

The chart's values use the same names in camelCase (``FERRY_NOTICE_SECONDS`` ->
``noticeSeconds``). Tests override them through the environment of the process they start.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any


class SettingsError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Settings:
    notice_seconds: float = 600.0
    downtime_budget_ms: int = 300
    max_parallel: int = 5
    max_outbound_per_host: int = 2
    max_inbound_per_host: int = 2
    retry_backoff_seconds: float = 20.0
    max_attempts: int = 3
    progress_timeout_seconds: float = 120.0
    budget_seconds_per_gib: float = 60.0
    budget_base_seconds: float = 120.0
    heartbeat_seconds: float = 5.0
    heartbeat_timeout_seconds: float = 30.0
    #: a source host silent this long is lost: its migrations fail HostNotReady (0: five
    #: heartbeat timeouts, at least 60 s); until then they wait (an API outage stales every heartbeat)
    host_lost_seconds: float = 0.0
    placement_strategy: str = "spread"
    metrics_port: int = 8080  # the operator's /metrics (0: off)
    agent_metrics_port: int = 8082  # each agent's /metrics (0: off); agents use the host network in a cluster
    size_scale: float = 1.0
    driver: str = "sim"
    report_interval_seconds: float = 1.0
    migration_ttl_seconds: float = 604800.0  # finished migrations deleted this long after (0: never)
    migrations_kept_per_droplet: int = 5     # and only the newest N per droplet kept (0: no limit)
    cpu_model: str = ""  # agents: the CPU model reported to placement (empty: this machine's)
    cpu_flags: str = ""  # agents: the CPU flags reported, space or comma separated (empty: this machine's)
    namespace: str = ""  # empty: all namespaces
    log_format: str = "text"  # text | json (ferry.logs reads it before the settings are parsed)
    sim_channel: str = "aes-256-gcm"  # agents, sim driver: the migration data channel (aes-256-gcm | plain: opt-out)
    #: agents, sim driver: the UDP port each guest answers on its droplet's address (0: no service)
    sim_service_port: int = 7077

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            key = "FERRY_" + field.name.upper()
            if key not in env:
                continue
            raw = env[key]
            try:
                values[field.name] = field.type_cast(raw) if hasattr(field, "type_cast") else _cast(field, raw)
            except ValueError as exc:
                raise SettingsError(f"{key}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.placement_strategy not in ("spread", "pack"):
            raise SettingsError(f"FERRY_PLACEMENT_STRATEGY must be spread or pack, not {self.placement_strategy!r}")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"FERRY_LOG_FORMAT must be text or json, not {self.log_format!r}")
        for name in ("metrics_port", "agent_metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise SettingsError(f"FERRY_{name.upper()} must be a port number (0: off)")
        if not 0 <= self.sim_service_port <= 65535:
            raise SettingsError(f"FERRY_SIM_SERVICE_PORT must be 0..65535, not {self.sim_service_port}")
        if self.sim_channel not in ("aes-256-gcm", "plain"):
            raise SettingsError(f"FERRY_SIM_CHANNEL must be aes-256-gcm or plain, not {self.sim_channel!r}")
        if self.driver not in ("sim", "qemu"):
            raise SettingsError(f"FERRY_DRIVER must be sim or qemu, not {self.driver!r}")
        for name in ("max_parallel", "max_outbound_per_host", "max_inbound_per_host", "max_attempts"):
            if getattr(self, name) < 1:
                raise SettingsError(f"FERRY_{name.upper()} must be at least 1")
        for name in ("notice_seconds", "retry_backoff_seconds", "size_scale", "heartbeat_seconds",
                     "heartbeat_timeout_seconds", "host_lost_seconds", "progress_timeout_seconds", "migration_ttl_seconds",
                     "migrations_kept_per_droplet"):
            if getattr(self, name) < 0:
                raise SettingsError(f"FERRY_{name.upper()} must not be negative")


def _cast(field: dataclasses.Field, raw: str) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return raw.lower() in ("1", "true", "yes", "on")
    return raw
