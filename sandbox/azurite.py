"""Start and stop Azurite (the Azure Storage emulator, npm package ``azurite``).

Installed locally by ``npm install`` (see package.json); Blob, Queue and Table services on free
loopback ports, in-memory, so every test session starts from empty storage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
# Three fixes to Azurite's costs that Azure Storage does not have: see the file for why.
AZURITE_PRELOAD = Path(__file__).resolve().parent / "node" / "azurite_fixes.cjs"
# The well-known development account of Azurite and the Storage emulator (public, not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary() -> str:
    local = ROOT / "node_modules" / ".bin" / "azurite"
    if local.exists():
        return str(local)
    found = shutil.which("azurite")
    if found:
        return found
    raise FileNotFoundError("azurite is not installed: run `npm install` (or `make test`, which does it)")


@dataclass
class Azurite:
    """One Azurite process with its three services on free ports."""

    blob_port: int = field(default_factory=free_port)
    queue_port: int = field(default_factory=free_port)
    table_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    workdir: str | None = None

    @property
    def connection_string(self) -> str:
        host = "http://127.0.0.1"
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={host}:{self.blob_port}/{ACCOUNT};"
            f"QueueEndpoint={host}:{self.queue_port}/{ACCOUNT};"
            f"TableEndpoint={host}:{self.table_port}/{ACCOUNT};"
        )

    def start(self, *, same_ports: bool = False) -> Azurite:
        """Start on this object's ports. A free port can be taken by another process between
        choosing it and Azurite binding it: then (unless ``same_ports``) choose again."""
        for attempt in range(3):
            try:
                return self._start()
            except RuntimeError as exc:
                if same_ports or "EADDRINUSE" not in str(exc) or attempt == 2:
                    raise
                self.blob_port, self.queue_port, self.table_port = free_port(), free_port(), free_port()
        raise AssertionError("unreachable")

    def _start(self) -> Azurite:
        self.workdir = tempfile.mkdtemp(prefix="azurite-")
        cmd = [
            azurite_binary(),
            "--silent",
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableProductStyleUrl",
            "--blobHost", "127.0.0.1", "--blobPort", str(self.blob_port),
            "--queueHost", "127.0.0.1", "--queuePort", str(self.queue_port),
            "--tableHost", "127.0.0.1", "--tablePort", str(self.table_port),
        ]
        env = dict(os.environ)
        env["NODE_OPTIONS"] = f"{env.get('NODE_OPTIONS', '')} --require \"{AZURITE_PRELOAD}\"".strip()
        # cwd is a scratch folder: Azurite writes its debug/extent files where it runs.
        self.process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd, cwd=self.workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for port in (self.blob_port, self.queue_port, self.table_port):
            self._raise_if_exited()
            wait_for_port(port, alive=lambda: self.process is not None and self.process.poll() is None)
        # A port another process holds answers too: Azurite learns it cannot bind it a moment after
        # listening on the others, and exits.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=0.3)
        self._raise_if_exited()
        return self

    def _raise_if_exited(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            self.stop()
            raise RuntimeError(f"azurite exited at start: {err.strip()[:500]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            # In-memory storage has nothing to flush, and Azurite ignores SIGTERM once it has
            # served queue traffic: stop it outright.
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def stalled(self):
        """Storage that takes connections and answers nothing while inside (the process is stopped;
        the kernel still completes connections): a stalled account or a network black hole,
        rather than one that refuses at once."""
        assert self.process is not None and self.process.poll() is None, "azurite is not running"
        os.killpg(self.process.pid, signal.SIGSTOP)
        try:
            yield self
        finally:
            os.killpg(self.process.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Stop and start on the same ports (fault injection: storage goes away and comes back empty)."""
        self.stop()
        self.start(same_ports=True)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
