"""Server settings: one frozen dataclass, filled from command-line flags and ``MODELSERVER_*`` env vars."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_MODEL = "offline-research-1"
DEFAULT_ALIASES = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-3.5-turbo")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    model: str = DEFAULT_MODEL
    aliases: tuple[str, ...] = DEFAULT_ALIASES
    api_key: str | None = field(default=None, repr=False)
    # latency model
    ttft_ms: float = 0.0
    token_ms: float = 0.0
    # admission
    max_concurrency: int = 64
    retry_after_ms: int = 1000
    # fault injection (probabilities in [0, 1], drawn per request from a seeded sequence)
    fault_429_rate: float = 0.0
    fault_500_rate: float = 0.0
    fault_503_rate: float = 0.0
    fault_hang_rate: float = 0.0
    fault_invent_citation_rate: float = 0.0  # writing answers with one invented cited sentence
    fault_seed: int = 0
    hang_seconds: float = 600.0
    # request log
    request_log: Path | None = None
    log_level: str = "info"

    @property
    def served_models(self) -> tuple[str, ...]:
        return (self.model, *[a for a in self.aliases if a != self.model])

    def __post_init__(self) -> None:
        for name in (
            "fault_429_rate",
            "fault_500_rate",
            "fault_503_rate",
            "fault_hang_rate",
            "fault_invent_citation_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        total = self.fault_429_rate + self.fault_500_rate + self.fault_503_rate + self.fault_hang_rate
        if total > 1.0:
            raise ValueError(f"fault rates add up to {total}, more than 1")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.ttft_ms < 0 or self.token_ms < 0:
            raise ValueError("latencies must not be negative")


def _split_aliases(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


_PARSERS = {
    "port": int,
    "ttft_ms": float,
    "token_ms": float,
    "max_concurrency": int,
    "retry_after_ms": int,
    "fault_429_rate": float,
    "fault_500_rate": float,
    "fault_503_rate": float,
    "fault_hang_rate": float,
    "fault_invent_citation_rate": float,
    "fault_seed": int,
    "hang_seconds": float,
}

_HELP = {
    "host": "address to listen on (0.0.0.0 in a container)",
    "port": "TCP port",
    "model": "primary served model name",
    "aliases": "comma-separated extra model names accepted as the same model",
    "api_key": "if set, require 'Authorization: Bearer <key>' (prefer the env var: flags show in ps)",
    "ttft_ms": "time to first token, milliseconds",
    "token_ms": "time per further completion token, milliseconds",
    "max_concurrency": "chat completions running at once; beyond it: HTTP 429 with Retry-After",
    "retry_after_ms": "back-off advertised in Retry-After / retry-after-ms on 429 and 503",
    "fault_429_rate": "share of chat completions answered 429 rate_limit_exceeded",
    "fault_500_rate": "share of chat completions answered 500 server_error",
    "fault_503_rate": "share of chat completions answered 503 (overloaded)",
    "fault_hang_rate": "share of chat completions that never answer (until --hang-seconds)",
    "fault_invent_citation_rate": "share of writing answers (section, report, intro, conclusion) that carry one "
    "invented sentence citing a real source",
    "fault_seed": "seed of the fault sequence (the Nth request's fate depends only on seed and N)",
    "hang_seconds": "how long a hung response hangs before the server gives up on it",
    "request_log": "append one JSON line per request to this file",
    "log_level": "uvicorn / server log level",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="research-modelserver",
        description="Offline, deterministic OpenAI-compatible chat completions server. "
        "Every flag also reads MODELSERVER_<FLAG> from the environment (e.g. MODELSERVER_PORT).",
    )
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, default=None, help=_HELP.get(f.name, ""))
    return parser


def settings_from(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over ``MODELSERVER_*`` environment variables, which win over the defaults."""
    env = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = args.get(f.name)
        if raw is None:
            raw = env.get("MODELSERVER_" + f.name.upper())
        if raw is None or raw == "":
            continue
        if f.name == "aliases":
            values[f.name] = _split_aliases(raw)
        elif f.name == "request_log":
            values[f.name] = Path(raw)
        elif f.name in _PARSERS:
            values[f.name] = _PARSERS[f.name](raw)
        else:
            values[f.name] = raw
    return Settings(**values)  # type: ignore[arg-type]
