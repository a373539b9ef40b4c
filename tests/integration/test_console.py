"""Console output of a run: piped, plain lines and no carriage returns or third-party bars; in a terminal (a pty),
the screen shows every log line once and intact plus one progress bar, as a terminal would render the bytes."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

# spawns `python -m dora_dist.train` (piped and on a pseudo-terminal)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEP_LINE = re.compile(
    r"^step +(\d+)/3  loss \d+\.\d{4}  lr \S+  grad_norm \S+  tok/s \d+  peak_mem \d+ MiB"
    r"(  attn dM/m \S+ dD \S+ share \S+  mlp dM/m \S+ dD \S+ share \S+)?$"
)  # + DoRA health
EVAL_LINE = re.compile(r"^eval +(\d+)/3  eval_loss \d+\.\d{4}  eval_ppl \S+  tokens \d+$")


def command(tmp_path: Path, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dora_dist.train",
        f"model.cache_dir={tmp_path / 'cache'}",
        "data.seq_len=32",
        "data.synthetic_samples=60",
        "data.eval_fraction=0.1",
        "training.eval_every=2",
        "training.max_steps=3",
        "training.micro_batch_size=2",
        "training.global_batch_size=2",
        "checkpoint.resume=none",
        "output.plot=false",
        f"output.dir={tmp_path / name}",
    ]


def child_env() -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("DORA_DIST_VERBOSE", None)
    return env


def check_lines(lines: list[str]) -> None:
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, lines) if m]
    evals = [int(m.group(1)) for m in map(EVAL_LINE.match, lines) if m]
    assert steps == [1, 2, 3], lines
    assert evals == [2, 3], lines


def test_piped_output_is_plain_lines(tmp_path):
    proc = subprocess.run(
        command(tmp_path, "piped"), cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr  # no bar redraws in a log file
    assert "it/s" not in proc.stderr and "Loading weights" not in proc.stderr
    check_lines(proc.stdout.splitlines())


def render(data: str) -> list[str]:
    """The screen a terminal shows for `data`: \\r returns to column 0, \\n goes down, ESC[A up, ESC[K/ESC[2K
    clear; other text overwrites in place."""
    screen: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(data):
        ch = data[i]
        if ch == "\x1b":
            m = re.match(r"\x1b\[(\d*)([A-Za-z])", data[i:])
            if m:
                n, code = int(m.group(1) or 1), m.group(2)
                if code == "A":
                    row = max(0, row - n)
                elif code == "K":
                    del screen[row][col:]
                i += len(m.group(0))
                continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            while len(screen) <= row:
                screen.append([])
        else:
            line = screen[row]
            while len(line) < col:
                line.append(" ")
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    return ["".join(r).rstrip() for r in screen]


def test_terminal_shows_one_bar_and_clean_lines(tmp_path):
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    env = child_env() | {"TERM": "xterm"}
    proc = subprocess.Popen(command(tmp_path, "tty"), cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.time() + 300
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the pty
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=60) == 0
    raw = b"".join(chunks).decode("utf-8", "replace")
    screen = [line for line in render(raw) if line.strip()]
    check_lines(screen)
    bars = [line for line in screen if line.startswith("train:")]
    assert len(bars) == 1 and "3/3" in bars[0], screen  # one bar, finished, not interleaved
    assert not any("Loading weights" in line for line in screen)
