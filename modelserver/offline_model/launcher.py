"""Start the server as a real subprocess on a free loopback port (used by tests, benchmarks and demos).

    with ModelServerProcess(ttft_ms=50, api_key="k") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k")

Knobs are the server's flags as keyword arguments (``fault_429_rate=0.5`` becomes ``--fault-429-rate 0.5``);
the API key travels in the environment, never on the command line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ModelServerProcess:
    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, api_key: str | None = None,
                 startup_timeout: float = 30.0, **knobs: Any) -> None:
        self.host = host
        self.port = port or free_port()
        self.api_key = api_key
        self.knobs = knobs
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="modelserver-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(self._log.name)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What ``openai.OpenAI(base_url=...)`` and ``ChatOpenAI(base_url=...)`` take."""
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "offline_model", "--host", self.host, "--port", str(self.port)]
        for key, value in self.knobs.items():
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            cmd += ["--" + key.replace("_", "-"), str(value)]
        return cmd

    def start(self) -> ModelServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVER_")}
        if self.api_key:
            env["MODELSERVER_API_KEY"] = self.api_key
        self.proc = subprocess.Popen(self.command(), env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"model server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"model server did not become ready in {self.startup_timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stats(self) -> dict[str, Any]:
        """Calls counted by kind/status, faults, tokens (GET /v1/offline/stats)."""
        response = httpx.get(f"{self.base_url}/offline/stats", headers=self._headers(), timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset(self) -> None:
        """Zero the stats and restart the fault sequence (POST /v1/offline/stats/reset)."""
        httpx.post(f"{self.base_url}/offline/stats/reset", headers=self._headers(), timeout=10).raise_for_status()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def __enter__(self) -> ModelServerProcess:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
