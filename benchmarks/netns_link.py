"""Two emulated nodes on one machine: two network namespaces joined by a veth pair whose two ends are shaped with tc
(tbf for the bandwidth, netem for an added one-way delay where the kernel has it), and removed again whatever
happens (an exception, Ctrl-C, SIGTERM).

    with EmulatedLink(LinkSpec(mbit=100)) as link:       # needs root (CAP_NET_ADMIN)
        proc = link.popen(0, ["python", "-c", "..."])     # runs inside node 0's namespace
        link.counters(0)                                  # the veth's own counters (`ip -s link`)

Names carry this process's pid and a random suffix (`ddn<pid><xx>a` / `...b`, for the namespaces and the veth ends
alike), so parallel runs never collide; the addresses (10.254.0.1 and .2) exist only inside the two namespaces,
so they cannot collide either, and nothing is routed off the machine. Used by benchmarks/emulated_nodes.py and
tests/dist/test_emulated_nodes.py.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

PREFIX = "ddn"
ADDRS = ("10.254.0.1", "10.254.0.2")


class LinkError(RuntimeError):
    """The emulated link cannot be made here (not root, no network namespaces, a qdisc missing from the kernel)."""


@dataclass(frozen=True)
class LinkSpec:
    mbit: float | None  # line rate per direction, Mbit/s (None: unshaped)
    delay_ms: float = 0.0  # added one-way delay per direction (netem)

    @property
    def name(self) -> str:
        rate = f"{self.mbit:g}mbit" if self.mbit else "unshaped"
        return rate + (f"+{self.delay_ms:g}ms" if self.delay_ms else "")

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """'100mbit', '1gbit', '100mbit+5ms', 'unshaped'."""
        rate, _, delay = text.lower().partition("+")
        try:
            d = float(delay.removesuffix("ms")) if delay else 0.0
            if rate == "unshaped":
                return cls(None, d)
            if rate.endswith("gbit"):
                return cls(float(rate[:-4]) * 1000, d)
            return cls(float(rate.removesuffix("mbit")), d)
        except ValueError:
            raise ValueError(f"link {text!r}: expected e.g. 100mbit, 1gbit, 100mbit+5ms or unshaped") from None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LinkError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _tc(ns: str, *args: str) -> None:
    proc = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip()
        if "netem" in args and "unknown" in msg.lower():
            msg = (
                "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM), so no delay can be added; use links without +ms"
            )
        raise LinkError(f"`tc {' '.join(args)}` failed: {msg}")


def netns_unavailable() -> str | None:
    """Why two namespaces with a shaped veth cannot be made here, or None when they can (tries it, cleans up)."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "network namespaces and tc need root (CAP_NET_ADMIN)"
    try:
        with EmulatedLink(LinkSpec(100)):
            pass
    except (LinkError, FileNotFoundError) as exc:
        return f"cannot emulate a link here: {exc}"
    return None


@dataclass
class EmulatedLink:
    spec: LinkSpec
    tag: str = field(default_factory=lambda: f"{os.getpid()}{secrets.token_hex(1)}")
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def names(self) -> tuple[str, str]:
        """Namespace names; each veth end is named like its namespace."""
        return f"{PREFIX}{self.tag}a", f"{PREFIX}{self.tag}b"

    # --- set-up and tear-down --------------------------------------------------------------------------------
    def __enter__(self) -> EmulatedLink:
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        a, b = self.names
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        # both ends are created directly inside their namespaces: nothing is ever left in the host's namespace
        _ip("link", "add", a, "netns", a, "type", "veth", "peer", "name", b, "netns", b)
        for ns, addr in zip(self.names, ADDRS, strict=True):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", ns, "up")
            self._shape(ns)

    def _shape(self, dev: str) -> None:
        """Egress shaping of one veth end: tbf at the line rate (burst = 1 ms of traffic, ≥ 32 KiB, so the first
        bytes after an idle period are not sent at memory speed), then netem's delay under it."""
        s = self.spec
        parent: list[str] = ["root"]
        if s.mbit:
            rate_bps = s.mbit * 1e6 / 8
            burst = max(32 * 1024, int(rate_bps * 1e-3))
            _tc(dev, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", f"{s.mbit:g}mbit", "burst",
                str(burst), "latency", "400ms")  # fmt: skip
            parent = ["parent", "1:1"]
        if s.delay_ms:
            _tc(dev, "qdisc", "add", "dev", dev, *parent, "handle", "10:", "netem", "delay", f"{s.delay_ms:g}ms",
                "limit", "100000")  # fmt: skip

    def close(self) -> None:
        """Stop every process started in the namespaces, delete both namespaces (which deletes the veth pair).
        Idempotent; never raises."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.time() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for ns in self.names:
            # processes still inside our own namespaces (children that left the process group) were started by us
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        atexit.unregister(self.close)

    def leftovers(self) -> list[str]:
        """Namespaces or links of this instance that still exist (empty after close)."""
        ns = set(_ip("netns", "list", check=False).stdout.split())
        links = _ip("-o", "link", "show", check=False).stdout
        return [n for n in self.names if n in ns or f" {n}@" in links or f" {n}:" in links]

    # --- use ---------------------------------------------------------------------------------------------------
    def command(self, node: int, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[node], *cmd]

    def popen(self, node: int, cmd: list[str], **kw) -> subprocess.Popen:
        """Start `cmd` inside node `node`'s namespace, in its own process group (so close() can stop it)."""
        p = subprocess.Popen(self.command(node, cmd), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def counters(self, node: int) -> dict[str, int]:
        """The veth end's own counters, as `ip -s link` reports them."""
        out = _ip("-n", self.names[node], "-s", "-j", "link", "show", "dev", self.names[node]).stdout
        st = json.loads(out)[0]["stats64"]
        return {
            "tx_bytes": st["tx"]["bytes"],
            "rx_bytes": st["rx"]["bytes"],
            "tx_packets": st["tx"]["packets"],
            "rx_packets": st["rx"]["packets"],
        }

    def tcp_throughput(self, nbytes: int = 8 * 2**20, both_ways: bool = True) -> float:
        """Payload bytes/s per direction of TCP streams between the nodes, by default one each way at once (as a
        two-rank ring sends: each end's egress then carries its data and the ACKs of the other's); the benchmark
        passes it to the plan as the measured bandwidth."""
        server = (
            "import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            "s.bind((sys.argv[1],5999));s.listen(1);print('ready',flush=True);c,_=s.accept();n=0\n"
            f"while n<{nbytes}:\n b=c.recv(1<<20)\n if not b: break\n n+=len(b)\n"
            "c.sendall(b'k')"
        )
        client = (
            "import socket,sys,time;c=socket.create_connection((sys.argv[1],5999));input();"
            f"t=time.perf_counter();c.sendall(bytes({nbytes}));c.recv(1);print(time.perf_counter()-t)"
        )
        pairs = [(0, 1), (1, 0)] if both_ways else [(0, 1)]
        servers = []
        for _, dst in pairs:
            srv = self.popen(dst, [sys.executable, "-c", server, ADDRS[dst]], stdout=subprocess.PIPE, text=True)
            assert srv.stdout is not None
            srv.stdout.readline()
            servers.append(srv)
        clients = [
            self.popen(
                src,
                [sys.executable, "-c", client, ADDRS[dst]],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for src, dst in pairs
        ]
        time.sleep(0.2)  # connected: start all streams together
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        secs = [float(c.communicate(timeout=300)[0].strip()) for c in clients]
        for srv in servers:
            srv.wait(timeout=30)
        return nbytes / max(secs)
