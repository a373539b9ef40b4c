"""The trainer's measurement hooks, off unless a benchmark turns them on through environment variables:

- DORA_DIST_COUNT_COMM=1: bytes and calls per collective kind of every step (`comm_counter.CommCounter`) go into
  metrics.jsonl; with DORA_DIST_COUNT_COMM_DIR=D each rank also writes D/comm_rank<r>.json (all its steps).
- DORA_DIST_MEMORY_STEP=k: step k's peak bytes of live tensors on this rank (`live_bytes_peak`), measured as the
  bytes of live tensors at the step's start (a census of every tensor storage reachable from Python, plus the
  optimizer/engine state they hold) plus the peak of the allocations and frees the profiler records during the
  step. On the CPU this is what the projection's memory model predicts; RSS also holds the interpreter, the
  libraries and the allocator's caches. (The profiler slows the step: benchmarks leave that step out of timings.)
- DORA_DIST_COUNT_LINK=<interface>: the bytes the interface sent and received during each step (`link_tx_bytes`,
  `link_rx_bytes`, from /sys/class/net/<interface>/statistics, the counters `ip -s link` shows), so a benchmark over
  an emulated link (benchmarks/emulated_nodes.py) holds the wire bytes of the steady-state steps against the
  counted collectives; with it, the main thread's time on a CPU and waiting for one (`sched_run_s`,
  `sched_wait_s`, /proc/self/schedstat): the rest of the step it was blocked, waiting for collectives, a split that
  holds on a machine whose other load slows the compute.

    with step_probe.probing():          # around the whole run
        step_probe.start_step(step)     # before a step
        rec.update(step_probe.end_step())
"""

from __future__ import annotations

import gc
import json
import os
import resource
import time
from pathlib import Path

import torch

from dora_dist.parallel.comm_counter import ENV_VAR, CommCounter

MEMORY_ENV = "DORA_DIST_MEMORY_STEP"
LINK_ENV = "DORA_DIST_COUNT_LINK"
_LINK0: dict[str, float] = {}
_COUNTER: CommCounter | None = None
_STEPS: list[dict] = []
_PROF = None
_BASE = 0
_STEP = 0
_T0 = 0.0


_TOP: list = []
_PADDED = 0  # tokens of this step's micro-batches as computed (padding included): tensor parallelism's activation
# all-reduces scale with them, so a benchmark holds the counted bytes against plan.comm for these exact shapes


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every live CPU/CUDA tensor reachable from Python (gc census); the ten
    largest (type, dtype, shape) groups are kept in `_TOP` for the step's record."""
    global _TOP
    seen: dict[int, int] = {}
    groups: dict[str, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            local = getattr(obj, "_local_tensor", None)
            t = local if local is not None else obj
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr and ptr not in seen:
                seen[ptr] = st.nbytes()
                key = f"{type(t).__name__} {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"
                groups[key] = groups.get(key, 0) + st.nbytes()
        except Exception:  # wrapper subclasses without storage, released tensors
            continue
    _TOP = sorted(groups.items(), key=lambda kv: -kv[1])[:10]
    return sum(seen.values())


def _profile_peak(prof) -> int:
    """Peak of the running sum of the profiler's allocation records (bytes; frees are negative)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    run = peak = 0
    for e in events:
        run += e.nbytes()
        peak = max(peak, run)
    return peak


class probing:
    def __enter__(self):
        global _COUNTER, _STEPS
        _STEPS = []
        _COUNTER = CommCounter.from_env()
        if _COUNTER is not None:
            _COUNTER.__enter__()
        return self

    def __exit__(self, *exc):
        global _COUNTER
        if _COUNTER is not None:
            _COUNTER.__exit__(*exc)
        out_dir = os.environ.get(ENV_VAR + "_DIR")
        if out_dir and (_COUNTER is not None or _STEPS):
            rank = os.environ.get("RANK", "0")
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            Path(out_dir, f"comm_rank{rank}.json").write_text(
                json.dumps({"rank": int(rank), "steps": _STEPS, "total": _COUNTER.snapshot() if _COUNTER else {}})
            )
        _COUNTER = None


def link_counters(iface: str) -> dict[str, int]:
    """tx/rx byte counters of a network interface (Linux sysfs; {} where it cannot be read)."""
    out = {}
    for d in ("tx", "rx"):
        try:
            out[f"link_{d}_bytes"] = int(Path(f"/sys/class/net/{iface}/statistics/{d}_bytes").read_text())
        except (OSError, ValueError):
            return {}
    return out


def sched_times() -> dict[str, float]:
    """The calling process's main thread: seconds on a CPU and runnable but waiting for one ({} off Linux)."""
    try:
        run_ns, wait_ns = (int(x) for x in Path("/proc/self/schedstat").read_text().split()[:2])
    except (OSError, ValueError):
        return {}
    return {"sched_run_s": run_ns / 1e9, "sched_wait_s": wait_ns / 1e9}


def _memory_step() -> bool:
    return bool(os.environ.get(MEMORY_ENV)) and int(os.environ[MEMORY_ENV]) == _STEP


def note_batch(padded_tokens: int) -> None:
    """One micro-batch of `padded_tokens` (batch × padded length) ran in this step (counted when the counter is on)."""
    global _PADDED
    _PADDED += padded_tokens


def start_step(step: int = 0) -> None:
    global _PROF, _BASE, _STEP, _T0, _LINK0, _PADDED
    _STEP = step + 1
    _PADDED = 0
    if os.environ.get(LINK_ENV):
        _LINK0 = {**link_counters(os.environ[LINK_ENV]), **sched_times()}
    if _COUNTER is not None:
        _COUNTER.start_step()
    if _memory_step():
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # on GPUs the caching allocator's own accounting is exact: live bytes now, then the step's peak
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            _BASE = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            _BASE = live_tensor_bytes()
            _PROF = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            _PROF.__enter__()
    _T0 = time.perf_counter()


def end_step() -> dict:
    """This step's measurements as metric keys ({} when nothing is enabled)."""
    global _PROF
    rec: dict = {}
    step_s = time.perf_counter() - _T0
    if _COUNTER is not None:
        rec.update(_COUNTER.end_step())
        rec["padded_tokens"] = _PADDED
    if _LINK0 and os.environ.get(LINK_ENV):
        now = {**link_counters(os.environ[LINK_ENV]), **sched_times()}
        rec.update({k: now[k] - _LINK0[k] for k in now if k in _LINK0})
    if _memory_step():
        rec["live_bytes_start"] = _BASE
        if _PROF is not None:
            _PROF.__exit__(None, None, None)
            rec["live_bytes_peak"] = _BASE + _profile_peak(_PROF)
            _PROF = None
        else:
            rec["live_bytes_peak"] = int(torch.cuda.max_memory_allocated())
    if rec:
        top = {"live_top": [list(kv) for kv in _TOP]} if _memory_step() and _TOP else {}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        full = dict(rec, **top, step_s=step_s, max_rss_bytes=rss)
        if _COUNTER is not None and _COUNTER.record_calls:
            full["calls"] = list(_COUNTER.log)
        _STEPS.append({"step": _STEP, **full})
    return rec
