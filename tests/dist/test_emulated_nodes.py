"""Two emulated nodes (network namespaces joined by a tc-shaped veth pair, benchmarks/netns_link.py), one torchrun
agent per node: a DDP step and an FSDP2 step of the real trainer cross the link, the collective bytes counted on
both ranks equal the projection's, the bytes the veth itself sent cover the ring's wire bytes (plus TCP/IP headers
and ACKs, no more), and no namespace or link is left behind. Both runs go at once on two separate links, so the
names of parallel runs must not collide. Skipped where network namespaces cannot be made (not root, no CAP_NET_ADMIN,
no tbf qdisc)."""

from __future__ import annotations

import subprocess
import sys
import threading
from argparse import Namespace
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from emulated_nodes import collect, projection, run_two_nodes  # noqa: E402
from netns_link import EmulatedLink, LinkSpec, netns_unavailable  # noqa: E402

# TCP/IPv4 with timestamps over a 1500-byte MTU: 1448 payload bytes per 1514-byte frame (+4.6%); the receiver's
# ACKs travel on the same veth end in the other direction, at most one 66-byte frame per segment (+4.6%).
HEADER_OVERHEAD = 1514 / 1448 - 1 + 66 / 1448
SMALL_MESSAGES = 64 * 1024  # gloo's per-collective handshakes and the 8-byte loss all-reduce, in bytes per step


@pytest.fixture(scope="module")
def netns_ok():
    why = netns_unavailable()
    if why:
        pytest.skip(why)


def _namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def test_ddp_and_fsdp2_step_over_shaped_links(netns_ok, tmp_path):
    args = Namespace(steps=3, micro=2, accum=1, global_batch=4, seq=32, device="cpu", timeout=240,
                     cache=str(tmp_path / "cache"), workdir=str(tmp_path))  # fmt: skip
    runs = {"ddp": LinkSpec(200), "fsdp2": LinkSpec(100)}
    links, results, errors = {}, {}, {}

    def one(engine: str) -> None:
        try:
            with EmulatedLink(runs[engine]) as link:
                links[engine] = link
                results[engine] = run_two_nodes(link, engine, args, tmp_path / engine)
        except BaseException as exc:  # reported by the main thread
            errors[engine] = exc

    threads = [threading.Thread(target=one, args=(e,)) for e in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert links["ddp"].names != links["fsdp2"].names
    for engine, link in links.items():
        assert link.leftovers() == [], f"{engine}: left behind {link.leftovers()}"
        assert not set(link.names) & _namespaces()

    for engine in runs:
        m = collect(tmp_path / engine, 3)
        pred = projection(engine, args, runs[engine].mbit * 1e6 / 8, None, 0.0)
        assert len(m["ranks"]) == 2
        for r in m["ranks"]:
            assert r["bytes"] == pred["bytes"], f"{engine} rank {r['rank']}: counted {r['bytes']}, projected {pred}"
            # the veth's own counter during the step: the ring's wire bytes, plus headers, never less
            wire = pred["wire_bytes"]
            assert wire <= r["link_tx_bytes"] <= wire * (1 + HEADER_OVERHEAD) + SMALL_MESSAGES, (engine, r, wire)
        # `ip -s link` over the whole run (set-up, rendezvous and the step) saw at least the step's bytes
        whole_run = sum(ipl["tx_bytes"] for ipl in results[engine]["ip_link"])
        assert whole_run >= sum(r["link_tx_bytes"] for r in m["ranks"]) > 0


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_run_removes_its_namespaces(netns_ok, sig):
    """Ctrl-C or SIGTERM while a process runs inside the emulated nodes: the namespaces, the veth pair and the
    process are gone when the interrupted program has exited."""
    import signal
    import time

    code = (
        "import signal, subprocess, sys, time\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "from emulated_nodes import _raise_on_signal\n"
        "from netns_link import EmulatedLink, LinkSpec\n"
        "signal.signal(signal.SIGTERM, _raise_on_signal)\n"
        # as emulated_nodes.main does: a background job of a non-interactive shell starts with SIGINT ignored
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "with EmulatedLink(LinkSpec(100)) as link:\n"
        "    link.popen(1, [sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "    print(*link.names, flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    names = proc.stdout.readline().split()
    assert len(names) == 2 and set(names) <= _namespaces()
    time.sleep(0.5)
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=60)
    assert not set(names) & _namespaces()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert not any(n in links for n in names)
