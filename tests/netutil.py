"""Small helpers shared by the multi-process tests (tests/ is on sys.path through its conftest)."""
import socket


def free_port() -> int:
    """A TCP port on the loopback that is free right now, for one test's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
