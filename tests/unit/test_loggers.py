"""output.loggers: validation, the missing-package error naming the extra, rank-0 only, and what TensorBoard / wandb
(offline) receive: the same scalars as metrics.jsonl, eval metrics included, and the config as hyper-parameters."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from dora_dist.config import ConfigError, load_config
from dora_dist.loggers import check_loggers, flat_config, make_loggers

STEP = {
    "step": 1,
    "loss": 2.5,
    "lr": 1e-3,
    "grad_norm": 0.7,
    "tokens_per_s": 100.0,
    "step_time_s": 0.1,
    "peak_mem_bytes": 1024,
    "epoch": 0.1,
}
EVAL = {"step": 1, "eval_loss": 2.4, "eval_ppl": 11.02, "eval_tokens": 50, "eval_time_s": 0.01, "best": True}


def test_config_normalises_and_rejects():
    assert load_config(None, ["output.loggers=tensorboard"]).output.loggers == ["tensorboard"]
    assert load_config(None, []).output.loggers == ["jsonl"]
    with pytest.raises(ConfigError, match="unknown logger"):
        load_config(None, ["output.loggers=[jsonl,mlflow]"])


def test_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'dora_dist\[wandb\]'"):
        check_loggers(["jsonl", "wandb"])


def test_jsonl_only_on_rank_0(tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path}"])
    other = make_loggers(cfg, tmp_path / "r1", is_main=False)
    other.log(STEP)
    other.close()
    assert not (tmp_path / "r1").exists()
    main = make_loggers(cfg, tmp_path, is_main=True)
    main.log(STEP)
    main.log(EVAL)
    main.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [STEP, EVAL]


def test_flat_config_keeps_every_key():
    cfg = load_config(None, [])
    flat = flat_config(cfg.to_dict())
    assert flat["training.lr"] == cfg.training.lr and flat["output.loggers"] == "['jsonl']"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_tensorboard_receives_scalars_and_hparams(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, [f"output.dir={tmp_path}", "output.loggers=[jsonl,tensorboard]"])
    loggers = make_loggers(cfg, tmp_path, is_main=True)
    loggers.log(STEP)
    loggers.log({**STEP, "step": 2, "loss": 2.0})
    loggers.log(EVAL)
    loggers.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/ppl"} <= set(tags)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]
    assert acc.Scalars("eval/ppl")[0].value == pytest.approx(11.02)
    assert acc.Tags()["tensors"] == ["config/text_summary"]  # the resolved config as YAML text
    hp = acc.PluginTagToContent("hparams")  # and as hyper-parameters
    assert "_hparams_/session_start_info" in hp
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["training.lr"].number_value == pytest.approx(cfg.training.lr)
    assert start.hparams["parallel.engine"].string_value == cfg.parallel.engine


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'dora_dist[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.loggers=[wandb]", "output.wandb_mode=offline"])
    loggers = make_loggers(cfg, tmp_path, is_main=True)
    run = loggers.loggers[0].run
    assert run.config["training"]["lr"] == cfg.training.lr
    loggers.log(STEP)
    loggers.log(EVAL)
    summary = dict(run.summary)
    loggers.close()
    assert summary["train/loss"] == 2.5 and summary["eval/loss"] == 2.4
    assert not (tmp_path / "metrics.jsonl").exists()  # jsonl not chosen
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_calls_with_a_stand_in_module(tmp_path, monkeypatch):
    """Without the package: a stand-in `wandb` module records what the logger sends (init once with the config
    and offline mode, one log per record at its step, finish on close)."""
    import types

    calls: dict = {"log": []}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.update(init=kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    cfg = load_config(None, [f"output.dir={tmp_path / 'myrun'}", "output.loggers=[wandb]"])
    loggers = make_loggers(cfg, tmp_path, is_main=True)
    loggers.log(STEP)
    loggers.log(EVAL)
    loggers.close()
    init = calls["init"]
    assert init["mode"] == "offline" and init["project"] == "dora_dist" and init["name"] == "myrun"
    assert init["config"] == cfg.to_dict()
    assert calls["log"][0] == (
        1,
        {
            "train/loss": 2.5,
            "train/lr": 1e-3,
            "train/grad_norm": 0.7,
            "train/tokens_per_s": 100.0,
            "train/step_time_s": 0.1,
            "train/peak_mem_bytes": 1024.0,
            "train/epoch": 0.1,
        },
    )
    assert calls["log"][1] == (1, {"eval/loss": 2.4, "eval/ppl": 11.02, "eval/tokens": 50.0, "eval/time_s": 0.01})
    assert calls["finished"]
