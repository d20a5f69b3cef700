"""Running a hub: uvicorn on a socket we bind ourselves (so port 0 works), plus the webhook worker."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable

import uvicorn

from localhub.accounts import Account, TokenRole
from localhub.app import create_app
from localhub.config import HubConfig
from localhub.db import Clock, utc_now
from localhub.hub import LocalHub
from localhub.webhooks import DOMAINS, Delivery, Domain, WatchedItem, Webhook, WebhookDispatcher


class LocalHubServer:
    """A localhub serving `config.data_dir` on `host:port` (port 0: a free one), in a thread or in the foreground."""

    def __init__(
        self,
        config: HubConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        clock: Clock = utc_now,
    ) -> None:
        self.config = config
        self.hub = LocalHub(config, clock=clock)
        self._host = host
        self._requested_port = port
        self._log_level = log_level
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._dispatcher = WebhookDispatcher(self.hub.db, config)
        self.hub.on_outbox(self._dispatcher.wake)

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the server is not started")
        return int(self._socket.getsockname()[1])

    @property
    def endpoint(self) -> str:
        """The URL to give huggingface_hub (``HfApi(endpoint=...)``)."""
        return f"http://{self._host}:{self.port}"

    def _prepare(self) -> uvicorn.Server:
        self.hub.blobs.clear_tmp()
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this: without it, a response written in two parts waits for
        # the client's delayed ACK (40 ms a request on keep-alive connections).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self._host, self._requested_port))
        sock.listen(128)
        self._socket = sock
        config = uvicorn.Config(
            create_app(self.hub),
            log_level=self._log_level,
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._dispatcher.start()
        return self._server

    def start(self, timeout: float = 20.0) -> LocalHubServer:
        """Serve from a background thread; return once requests are accepted."""
        server = self._prepare()
        assert self._socket is not None
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, name="localhub-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("localhub did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve in the foreground until interrupted (Ctrl-C / SIGTERM)."""
        server = self._prepare()
        assert self._socket is not None
        try:
            server.run(sockets=[self._socket])
        finally:
            self._shutdown()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._shutdown()

    def _shutdown(self) -> None:
        self._dispatcher.stop()
        if self._socket is not None:
            self._socket.close()
        self._server = None

    # admin verbs, for tests that hold the server

    def add_user(
        self, name: str, token: str | None = None, orgs: Iterable[str] = (), role: TokenRole = "write"
    ) -> Account:
        return self.hub.add_user(name, token, orgs=orgs, role=role)

    def add_webhook(
        self,
        url: str,
        watch: Iterable[str | WatchedItem],
        secret: str | None = None,
        domains: Iterable[Domain] = DOMAINS,
    ) -> Webhook:
        return self.hub.add_webhook(url, watch, secret=secret, domains=domains)

    def deliveries(self, webhook_id: str | None = None) -> list[Delivery]:
        return self.hub.deliveries(webhook_id)

    def __enter__(self) -> LocalHubServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
