"""CheckpointManager: atomic directories, keep-last-K, latest complete one, exact restore of adapter + optimizer +
scheduler + RNG (single process, DCP without a process group)."""

from __future__ import annotations

import torch
from torch import nn

from dora_dist.checkpoint import CheckpointManager, find_latest
from dora_dist.config import load_config
from dora_dist.parallel.dist_env import DistEnv
from dora_dist.parallel.none import SingleProcessEngine


def make_engine(adapter_seed: int):
    from dora_dist.adapters import DoRAConfig, apply_dora

    torch.manual_seed(0)  # the frozen base is the same (it is not checkpointed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    torch.manual_seed(adapter_seed)
    apply_dora(model, DoRAConfig(r=2, alpha=4, target_modules=["0", "2"]))
    cfg = load_config(None, ["training.max_steps=10", "training.warmup_steps=2", "training.lr=1e-2"])
    engine = SingleProcessEngine(cfg, DistEnv())
    engine.prepare(model)
    return engine


def train_steps(engine, n: int) -> list[float]:
    out = []
    for _ in range(n):
        x = torch.randn(4, 8)
        loss = engine.model(x).pow(2).mean()
        engine.backward(loss)
        engine.guarded_step()
        out.append(float(loss))
    return out


def test_save_prune_latest_and_exact_resume(tmp_path):
    env = DistEnv()
    a = make_engine(0)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, env=env)
    torch.manual_seed(123)
    for step in range(1, 4):
        train_steps(a, 1)
        manager.save(a, step, {"step": step, "data": {"step": step}})
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step_00000002", "step_00000003"]
    # an interrupted save (tmp dir, no COMPLETE) is never picked
    (tmp_path / "ckpt" / ".tmp_step_00000004").mkdir()
    (tmp_path / "ckpt" / "step_00000005").mkdir()  # no COMPLETE marker: incomplete
    assert find_latest(tmp_path / "ckpt").name == "step_00000003"
    expected = train_steps(a, 3)  # continues with the RNG state saved at step 3

    b = make_engine(1)  # other adapter init: it must all come from the file
    extra = manager.load(b, find_latest(tmp_path / "ckpt"))
    assert extra == {"step": 3, "data": {"step": 3}}
    assert b.scheduler.last_epoch == 3
    got = train_steps(b, 3)
    assert got == expected
    for (name, p1), (_, p2) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p1, p2), name


class _Payload:
    """Unpickling this runs code (here: it would create a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path):
    """Review bug: `checkpoint.resume=<dir>` may point anywhere, and the RNG state was read with
    torch.load(weights_only=False). Our files hold no pickle now, and the files libraries pickle (DCP's .metadata,
    DeepSpeed's .pt) are checked against an allow-list before the library reads them."""
    import pickle

    import pytest

    from dora_dist.checkpoint.safe_load import UnsafeCheckpointError, verify_torch_file

    env = DistEnv()
    a = make_engine(0)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, env=env)
    train_steps(a, 1)
    good = manager.save(a, 1, {"step": 1, "data": {"step": 1}})
    assert (good / "rng_rank00000.json").is_file() and not list(good.glob("*.pt"))[1:]  # RNG as JSON
    marker = tmp_path / "pwned"

    (good / "rng_rank00000.pt").write_bytes(pickle.dumps(_Payload(str(marker))))  # an old-style RNG pickle: unread
    manager.load(make_engine(1), good)
    assert not marker.exists()

    meta = good / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload(str(marker))))  # DCP's own pickle, crafted
    with pytest.raises(ValueError, match="cannot resume"):  # caught as damage first
        manager.load(make_engine(1), good)
    forge_manifest(good)  # a crafted COMPLETE too
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        manager.load(make_engine(1), good)
    assert not marker.exists()

    torch.save({"state": _Payload(str(marker))}, tmp_path / "optim_states.pt")  # a DeepSpeed-style file
    with pytest.raises(UnsafeCheckpointError):
        verify_torch_file(tmp_path / "optim_states.pt")
    assert not marker.exists()


def forge_manifest(directory):
    import json

    from dora_dist.checkpoint.manager import COMPLETE, file_manifest

    info = json.loads((directory / COMPLETE).read_text())
    info["files"] = file_manifest(directory)
    (directory / COMPLETE).write_text(json.dumps(info))


def test_a_damaged_latest_checkpoint_is_skipped_or_named(tmp_path, capsys):
    """A truncated or bit-flipped file in the newest checkpoint: resume=auto takes the previous complete one and
    says why; loading the damaged one explicitly is a clear error naming the file."""
    import pytest

    from dora_dist.checkpoint import DamagedCheckpointError

    env = DistEnv()
    a = make_engine(0)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3, env=env)
    for step in (1, 2):
        train_steps(a, 1)
        manager.save(a, step, {"step": step, "data": {"step": step}})
    newest = tmp_path / "ckpt" / "step_00000002"
    assert manager.latest() == newest
    shard = max((p for p in newest.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    assert manager.latest() == tmp_path / "ckpt" / "step_00000001"
    assert "truncated" in capsys.readouterr().out
    with pytest.raises(ValueError, match=shard.name):
        manager.load(make_engine(1), newest)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert manager.latest() == tmp_path / "ckpt" / "step_00000001"
    with pytest.raises(ValueError, match="checksum"):
        manager.load(make_engine(1), newest)
    for d in (tmp_path / "ckpt").iterdir():  # nothing undamaged left
        (d / shard.name).write_bytes(b"") if (d / shard.name).exists() else None
    with pytest.raises(DamagedCheckpointError, match="every checkpoint under .* is damaged"):
        manager.latest()  # an error, not a silent restart from step 0
    assert find_latest(tmp_path / "ckpt") is None


def test_leftovers_of_a_killed_replace_or_prune_are_never_newer_and_are_tidied(tmp_path):
    """The states a SIGKILL can leave inside publish/prune that the process tests do not stop at (a kill while the
    set-aside copy is deleted after the new one is in place; a .del_ directory): find_latest takes the published
    step_N, and the next save removes the rest (tests/integration/test_checkpoint_write_faults.py kills for real)."""
    import shutil

    from dora_dist.checkpoint.manager import verify_checkpoint

    env = DistEnv()
    a = make_engine(0)
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=2, env=env)
    for step in (1, 2):
        train_steps(a, 1)
        manager.save(a, step, {"step": step, "data": {"step": step}})
    shutil.copytree(root / "step_00000001", root / ".old_step_00000002")  # stale aside next to its step_N
    shutil.copytree(root / "step_00000001", root / ".del_step_00000000")  # half-deleted pruned checkpoint
    (root / ".old_step_00000002" / "COMPLETE").unlink()  # (whatever state it was cut in)
    assert find_latest(root) == root / "step_00000002"
    train_steps(a, 1)
    manager.save(a, 3, {"step": 3, "data": {"step": 3}})
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]
    assert verify_checkpoint(root / "step_00000002") is None


def test_a_save_is_never_pruned_by_newer_checkpoints(tmp_path):
    """Resumed from an earlier checkpoint (or past a damaged newer one): the newer ones do not make the checkpoint
    just written look old, so keep_last never deletes it."""
    env = DistEnv()
    engine = make_engine(0)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, env=env)
    for step in (4, 6, 2, 3):  # a run resumed at step 2 saves 3 while 4 and 6 exist
        train_steps(engine, 1)
        manager.save(engine, step, {"step": step, "data": {"step": step}})
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step_00000002", "step_00000003", "step_00000004", "step_00000006"]
