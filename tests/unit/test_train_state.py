"""TrainState (what a checkpoint restores of the loop) and EvalResult (what an eval measured): round trips, the
on-disk trainer state unchanged from the ad hoc dict it replaces, DCP's Stateful protocol, and an eval record that
changes nothing of the job."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.stateful import Stateful

from dora_dist.data import GlobalBatchSampler
from dora_dist.evaluate import EvalResult, evaluate, run_eval
from dora_dist.parallel.dist_env import DistEnv
from dora_dist.train_state import TrainState


def sampler(seed: int = 3) -> GlobalBatchSampler:
    return GlobalBatchSampler(40, micro_batch=2, grad_accum=2, world_size=1, rank=0, seed=seed)


def test_round_trip_restores_step_best_eval_and_data_position():
    a = TrainState(data=sampler(), step=7, best_eval=1.25)
    a.data.step = 7
    b = TrainState(data=sampler())
    b.load_state_dict(a.state_dict())
    assert (b.step, b.best_eval, b.data.step) == (7, 1.25, 7)
    assert b.state_dict() == a.state_dict()
    assert b.data.global_indices(7) == a.data.global_indices(7)  # the same batches from here on


def test_state_dict_is_the_trainer_state_checkpoints_always_held():
    """The dict train.save_checkpoint built by hand before TrainState existed: same keys, same order, same values,
    so checkpoints written before and after are read alike (an older one, without best_eval, too)."""
    data = sampler()
    data.step = 5
    state = TrainState(data=data, step=5, best_eval=None)
    legacy = {"step": 5, "data": data.state_dict(), "best_eval": None}
    assert state.state_dict() == legacy and list(state.state_dict()) == list(legacy)

    restored = TrainState(data=sampler(), best_eval=9.0)
    restored.load_state_dict({"step": 4, "data": {**data.state_dict(), "step": 4}})  # no best_eval key
    assert (restored.step, restored.best_eval, restored.data.step) == (4, None, 4)


def test_a_data_position_of_another_job_is_refused():
    state = TrainState(data=sampler(seed=1))
    with pytest.raises(ValueError, match="cannot resume the data position: checkpoint has seed=3"):
        state.load_state_dict(TrainState(data=sampler(seed=3), step=2).state_dict())


def test_is_a_dcp_stateful_and_round_trips_through_dcp(tmp_path):
    import torch.distributed.checkpoint as dcp

    saved = TrainState(data=sampler(), step=6, best_eval=0.5)
    saved.data.step = 6
    assert isinstance(saved, Stateful)
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save({"train_state": saved}, checkpoint_id=str(tmp_path), no_dist=True)
    loaded = TrainState(data=sampler())
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.load({"train_state": loaded}, checkpoint_id=str(tmp_path), no_dist=True)
    assert loaded.state_dict() == saved.state_dict()


def test_improves_the_first_eval_and_only_a_lower_loss():
    state = TrainState(data=sampler())
    assert state.improves(3.0)
    state.best_eval = 3.0
    assert state.improves(2.5) and not state.improves(3.0) and not state.improves(4.0)


def test_eval_record_fields_and_best_flag():
    result = EvalResult(step=4, eval_loss=2.0, eval_ppl=7.389, eval_tokens=120, eval_time_s=0.5)
    rec = result.record()
    assert list(rec) == ["step", "eval_loss", "eval_ppl", "eval_tokens", "eval_time_s"]  # metrics.jsonl's order
    assert rec == {"step": 4, "eval_loss": 2.0, "eval_ppl": 7.389, "eval_tokens": 120, "eval_time_s": 0.5}
    assert result.record(best=True) == {**rec, "best": True}


def test_run_eval_returns_the_measurement_and_changes_nothing():
    from test_evaluate import tiny_dataset, tiny_model

    model, ds = tiny_model(), tiny_dataset()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_eval(model, ds, DistEnv(), batch_size=2, step=11)
    direct = evaluate(model, ds, DistEnv(), batch_size=2)
    assert isinstance(result, EvalResult) and result.step == 11 and result.eval_time_s >= 0
    assert (result.eval_loss, result.eval_ppl, result.eval_tokens) == (
        direct["eval_loss"],
        direct["eval_ppl"],
        direct["eval_tokens"],
    )  # the same float64 sums in the same order: equal, not close
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
