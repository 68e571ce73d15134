"""Starting, watching and stopping service processes: used by the demo, the tests and the scripts.

Each service is its own process (not under honcho, which stops everything when one exits), with its log
in a file, so a fault can be injected into one and a failure shows the log of the process that failed.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..config import SERVICES
from ..frontend.client import AsyncClient, CoordinatorUnavailableError


class ServiceExited(RuntimeError):
    pass


def service_env(cfg, url: str) -> dict[str, str]:
    """The environment that starts services with cfg's models, devices and dtype on the coordinator at url."""
    return {"AMUSD_COORDINATOR_URL": url, "AMUSD_DRAFT_MODEL": cfg.draft_model, "AMUSD_VERIFY_MODEL": cfg.verify_model,
            "AMUSD_DRAFT_DEVICE": cfg.draft_device, "AMUSD_VERIFY_DEVICE": cfg.verify_device, "AMUSD_DTYPE": cfg.dtype,
            "AMUSD_RUNNER": cfg.runner, "AMUSD_MAX_CONTEXT": str(cfg.max_context),
            "AMUSD_MAX_BATCH": str(cfg.max_batch),
            "AMUSD_LOOKAHEAD": str(cfg.lookahead), "AMUSD_THREADS": str(cfg.threads),
            "AMUSD_CACHE_DIR": cfg.cache_dir, "AMUSD_TRACE_COMPUTE": cfg.trace_compute}


class Deployment:
    def __init__(self, env: dict[str, str], log_dir: str | Path, roles: tuple[str, ...] = SERVICES):
        self.env = {**os.environ, **env}
        self.url = self.env.get("AMUSD_COORDINATOR_URL", "tcp://127.0.0.1:5550")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        for role in roles:
            self.start(role)

    def start(self, role: str, name: str | None = None, netns: str | None = None, **env: str) -> subprocess.Popen:
        """Start a service, inside network namespace `netns` when given (as another host would be)."""
        name = name or role
        log = open(self.log_dir / f"{name}.log", "ab")
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.procs[name] = subprocess.Popen(
            prefix + [sys.executable, "-m", "amusd_mq", role], env={**self.env, **env}, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        return self.procs[name]

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ServiceExited(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")

    async def wait_ready(self, verifiers: int = 1, drafts: int = 1, timeout_s: float = 600.0) -> None:
        """Until the coordinator answers and enough workers have registered, failing fast if one exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                # With CURVE on, the deployment's own environment holds the keys a client uses.
                async with AsyncClient(self.url, timeout_s=1.0, curve_secret_key=self.env.get("AMUSD_CURVE_SECRET_KEY"),
                                       curve_server_key=self.env.get("AMUSD_CURVE_SERVER_KEY")) as client:
                    welcome = client.welcome
                if welcome.verifiers >= verifiers and welcome.drafts >= drafts:
                    return
            except CoordinatorUnavailableError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError(f"services not ready within {timeout_s:g}s; logs in {self.log_dir}")

    def stop(self, timeout_s: float = 5.0) -> dict[str, int]:
        """SIGTERM everything, SIGKILL what is still there after timeout_s. Returns the exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
