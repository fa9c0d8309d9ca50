"""Health checks against real local servers: TCP listeners, an HTTP server, a fake guest
agent on a unix socket, a growing console log and scripts."""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2v.orchestration.checks import AnyCheck, CheckTarget, run_check, run_checks
from p2v.orchestration.checks_model import AgentCheck, ConsoleCheck, HttpCheck, ScriptCheck, TcpCheck

T, IV = 1.5, 0.2  # a fast check: timeout, interval


class TcpServer:
    """Accepts connections and does ``mode``: "silent" (keeps them open), "close", "banner"."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "close":
                conn.close()
            elif self.mode == "banner":
                conn.sendall(b"SSH-2.0-test\r\n")
                self.conns.append(conn)
            else:
                self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def tcp_server(request: pytest.FixtureRequest) -> Iterator[TcpServer]:
    server = TcpServer(request.param)
    yield server
    server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- tcp --------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp_server", ["silent"], indirect=True)
def test_tcp_listener_passes_and_reports_the_guest_port(tcp_server: TcpServer) -> None:
    target = CheckTarget("db1", ports={5432: tcp_server.port})
    res = run_check(TcpCheck(port=5432, timeout=T, interval=IV), target)
    assert res.ok and res.attempts == 1 and res.kind == "tcp" and res.check == "tcp:5432"
    assert f"127.0.0.1:{tcp_server.port} (guest port 5432): open" in res.message


def test_tcp_refused_retries_until_timeout() -> None:
    port = closed_port()
    t0 = time.monotonic()
    res = run_check(TcpCheck(port=port, timeout=1.2, interval=0.3), CheckTarget("db1"))
    assert not res.ok and "connection refused" in res.message and f"127.0.0.1:{port}" in res.message
    assert res.attempts >= 3 and 0.8 < time.monotonic() - t0 < 2.5


@pytest.mark.parametrize("tcp_server", ["close"], indirect=True)
def test_tcp_peer_that_closes_at_once_fails(tcp_server: TcpServer) -> None:
    res = run_check(TcpCheck(port=tcp_server.port, timeout=T, interval=IV), CheckTarget("web1"))
    assert not res.ok and "closed at once" in res.message


@pytest.mark.parametrize("tcp_server", ["banner"], indirect=True)
def test_tcp_banner_counts_at_once_even_when_slirp_says_syn_sent(tcp_server: TcpServer) -> None:
    target = CheckTarget("web1", ports={22: tcp_server.port}, usernet=lambda: "")
    res = run_check(TcpCheck(port=22, timeout=T, interval=IV), target)
    assert res.ok and "SSH-2.0-test" in res.message


def usernet_text(host_port: int, state: str) -> str:
    return (
        "Hub -1 (net0):\n"
        "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\n"
        f"  TCP[{state}]      12       127.0.0.1 {host_port}       10.0.2.15  5432     0     0\n"
        f"  TCP[HOST_FORWARD]   8       127.0.0.1 {host_port}       10.0.2.15  5432     0     0\n"
    )


@pytest.mark.parametrize("tcp_server", ["silent"], indirect=True)
def test_tcp_over_slirp_needs_the_guest_side_established(tcp_server: TcpServer) -> None:
    hp = tcp_server.port
    pending = CheckTarget("db1", ports={5432: hp}, usernet=lambda: usernet_text(hp, "SYN_SENT"))
    res = run_check(TcpCheck(port=5432, timeout=4, interval=1), pending)
    assert not res.ok and "guest did not answer" in res.message and "SYN_SENT" in res.message
    up = CheckTarget("db1", ports={5432: hp}, usernet=lambda: usernet_text(hp, "ESTABLISHED"))
    res = run_check(TcpCheck(port=5432, timeout=T, interval=IV), up)
    assert res.ok and "guest accepted" in res.message


def test_tcp_over_slirp_refuses_an_unforwarded_port() -> None:
    target = CheckTarget("db1", ports={22: 2222}, usernet=lambda: "")
    res = run_check(TcpCheck(port=5432, timeout=T, interval=IV), target)
    assert not res.ok and res.attempts == 0 and "guest port 5432 is not forwarded" in res.message


# -- http -------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        extra: dict[str, str]
        if self.path == "/health":
            code, body, extra = 200, b"status: ready\n", {}
        elif self.path == "/busy":
            code, body, extra = 503, b"starting\n", {}
        elif self.path == "/moved":
            code, body, extra = 302, b"", {"Location": "http://production.example.invalid/health"}
        else:
            code, body, extra = 404, b"nope\n", {}
        self.send_response(code)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    # a proxy that does not exist: the check must not use it
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_http_status_and_text(http_port: int) -> None:
    target = CheckTarget("web1", ports={80: http_port})
    ok = run_check(HttpCheck(path="/health", expect_text=r"^status: ready$", timeout=T, interval=IV), target)
    assert ok.ok and "HTTP 200" in ok.message and ok.check == "http:80/health"
    busy = run_check(HttpCheck(path="/busy", timeout=T, interval=IV), target)
    assert not busy.ok and "HTTP 503 (expected 200)" in busy.message and busy.attempts >= 2
    wrong = run_check(HttpCheck(path="/health", expect_text="green", timeout=T, interval=IV), target)
    assert not wrong.ok and "does not match /green/" in wrong.message


def test_http_redirect_is_not_followed(http_port: int) -> None:
    target = CheckTarget("web1", ports={80: http_port})
    res = run_check(HttpCheck(path="/moved", expect_status=302, timeout=T, interval=IV), target)
    assert res.ok, res.message
    res = run_check(HttpCheck(path="/moved", timeout=T, interval=IV), target)
    assert not res.ok and "HTTP 302" in res.message


def test_http_refused() -> None:
    res = run_check(HttpCheck(port=closed_port(), timeout=T, interval=IV), CheckTarget("web1"))
    assert not res.ok and "connection refused" in res.message


# -- agent ------------------------------------------------------------------------------


class FakeAgent:
    """A unix-socket server speaking the guest-agent protocol (or nothing, when ``silent``)."""

    def __init__(self, path: Path, *, silent: bool = False) -> None:
        self.path = path
        self.silent = silent
        self.requests: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while True:
                    data = conn.recv(4096)
                    if not data:
                        break
                    buf += data.replace(b"\xff", b"")
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        req = json.loads(line)
                        self.requests.append(req)
                        if self.silent:
                            continue
                        if req["execute"] == "guest-sync-delimited":
                            # a stale reply first, as after an earlier aborted exchange
                            reply = json.dumps({"return": req["arguments"]["id"]}).encode()
                            conn.sendall(b'{"return": {}}\n\xff' + reply + b"\n")
                        elif req["execute"] == "guest-ping":
                            conn.sendall(b'{"return": {}}\n')

    def close(self) -> None:
        self.sock.close()


def test_agent_ping(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "qga.sock")
    try:
        res = run_check(AgentCheck(timeout=T, interval=IV), CheckTarget("app1", agent_socket=agent.path))
    finally:
        agent.close()
    assert res.ok and res.check == "agent", res.message
    assert [r["execute"] for r in agent.requests] == ["guest-sync-delimited", "guest-ping"]


def test_agent_silent_or_missing(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "qga.sock", silent=True)
    try:
        res = run_check(AgentCheck(timeout=2, interval=0.5), CheckTarget("app1", agent_socket=agent.path))
    finally:
        agent.close()
    assert not res.ok and "no answer to guest-sync" in res.message
    res = run_check(AgentCheck(timeout=T, interval=IV), CheckTarget("app1", agent_socket=tmp_path / "none.sock"))
    assert not res.ok and "does not exist" in res.message
    res = run_check(AgentCheck(timeout=T, interval=IV), CheckTarget("app1"))
    assert not res.ok and res.attempts == 0 and "no guest-agent channel" in res.message


# -- console ----------------------------------------------------------------------------


def test_console_pattern_appears_later(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"SeaBIOS\r\nBooting from Hard Disk...\r\n")

    def later() -> None:
        time.sleep(0.6)
        with log.open("ab") as f:
            f.write(b"Debian GNU/Linux 12 srv1 ttyS0\r\n\r\nsrv1 log")
            f.flush()
            time.sleep(0.3)
            f.write(b"in: ")

    threading.Thread(target=later, daemon=True).start()
    check = ConsoleCheck(pattern=r"^srv1 login: ?$", timeout=5, interval=0.2)
    res = run_check(check, CheckTarget("srv1", console_log=log))
    assert res.ok and res.attempts >= 3 and "srv1 login:" in res.message


def test_console_pattern_missing_says_how_much_was_read(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"x" * 1000)
    res = run_check(ConsoleCheck(pattern="login:", timeout=T, interval=IV), CheckTarget("srv1", console_log=log))
    assert not res.ok and "not found in 1000 bytes" in res.message


# -- script -----------------------------------------------------------------------------


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "check.py"
    path.write_text(body)
    return f"{sys.executable} {path}"


def test_script_gets_the_target_in_its_environment(tmp_path: Path) -> None:
    run = script(tmp_path, "import os\nprint(os.environ['P2V_MACHINE'], os.environ['P2V_HOST'], "
                           "os.environ['P2V_PORT_5432'], os.environ['PLAN'])\n")  # fmt: skip
    target = CheckTarget("db1", host="127.0.0.1", ports={5432: 40001}, env={"PLAN": "erp"})
    res = run_check(ScriptCheck(run=run, timeout=T, interval=IV), target)
    assert res.ok and "db1 127.0.0.1 40001 erp" in res.message


def test_script_failure_shows_the_output_tail(tmp_path: Path) -> None:
    run = script(tmp_path, "import sys\nprint('x' * 2000)\nsys.exit('replica lag 300s')\n")
    res = run_check(ScriptCheck(run=run, timeout=T, interval=IV), CheckTarget("db1"))
    assert not res.ok and "exit 1" in res.message and res.message.endswith("replica lag 300s")
    assert len(res.message) < 700


def alive(pid: int) -> bool:
    """Running (a killed child waiting to be reaped by init is a zombie: not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_script_killed_at_timeout_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    run = f"sh -c 'sleep 60 & echo $! > {pidfile}; wait'"
    t0 = time.monotonic()
    res = run_check(ScriptCheck(run=run, timeout=1.0, interval=5), CheckTarget("db1"))
    assert not res.ok and "killed after" in res.message and time.monotonic() - t0 < 3
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not alive(child), "the script's child survived the check timeout"


def test_script_not_found() -> None:
    res = run_check(ScriptCheck(run="/nonexistent/check-db --fast", timeout=T, interval=IV), CheckTarget("db1"))
    assert not res.ok and "/nonexistent/check-db: command not found" in res.message


# -- sequencing -------------------------------------------------------------------------


@pytest.mark.parametrize("tcp_server", ["silent"], indirect=True)
def test_run_checks_stops_at_first_failure(tcp_server: TcpServer, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("login: ")
    checks: list[AnyCheck] = [
        TcpCheck(port=tcp_server.port, timeout=T, interval=IV),
        ScriptCheck(run="false", timeout=T, interval=IV),
        ConsoleCheck(pattern="login", timeout=T, interval=IV),
    ]
    results = run_checks(checks, CheckTarget("db1", console_log=log))
    assert [(r.kind, r.ok) for r in results] == [("tcp", True), ("script", False)]
    assert json.loads(json.dumps(results[1].to_dict()))["message"].startswith("not passed after")


def test_cancel_stops_retrying() -> None:
    t0 = time.monotonic()
    res = run_check(
        TcpCheck(port=closed_port(), timeout=60, interval=0.2),
        CheckTarget("db1"),
        cancelled=lambda: time.monotonic() - t0 > 0.5,
    )
    assert not res.ok and res.message.startswith("cancelled after") and res.seconds < 2
