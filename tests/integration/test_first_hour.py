"""The first hour of a new user (issue 26), through the real entry points: what is not an error but must be said
(epochs beside max_steps, settings a finished run did not use, a restart at step 0), what must be quiet (checkpoint
and merge chatter), what must travel (the built-in base's name in adapter_config.json), what must help (`keys`,
`plan --help`), Ctrl-C, and the data-source and output-dir checks that a fixture cannot put in docs/errors.md
(a read-only filesystem, a hub the test cannot reach on demand). The one-line error cases are rows of
docs/errors.md (test_bad_inputs.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dora_dist.cli import main

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "dora_dist: error: "


def _args(tmp: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "training.max_steps=2",
        "data.synthetic_samples=64",
        "data.seq_len=32",
        "output.progress_bar=false",
        "output.plot=false",
        f"model.cache_dir={cache}",
        f"output.dir={tmp / 'run'}",
        *extra,
    ]


@pytest.fixture(scope="module")
def cache(builtin_cache) -> Path:
    return builtin_cache  # getbasetemp()/dora_dist_cache, shared with test_bad_inputs*.py


WARNINGS: list[str] = []  # what the `finished` runs warned (read by test_checkpoint_save_and_load_leak_no_warning)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache) -> Path:
    """A finished 2-step run of the built-in model, checkpointed every step, stopped after step 1 and resumed (so
    checkpoints are saved and loaded); the warnings the runs let through are kept in WARNINGS."""
    import warnings

    tmp = tmp_path_factory.mktemp("first_hour")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", *_args(tmp, cache, "checkpoint.every_steps=1", "training.stop_after_steps=1")]) == 0
        assert main(["train", *_args(tmp, cache, "checkpoint.every_steps=1")]) == 0  # resumes from step 1
    WARNINGS.extend(str(w.message) for w in caught)
    return tmp / "run"


# --- not errors, but said -----------------------------------------------------------------------------------------
def test_epochs_beside_max_steps_says_which_wins(capfd):
    from dora_dist import train

    assert train.main(["--check", "training.epochs=2"]) == 0
    out = capfd.readouterr().out
    assert "training.max_steps=200 sets the length; training.epochs=2 is not used" in out
    assert train.main(["--check", "training.max_steps=0", "training.epochs=2"]) == 0
    assert "not used" not in capfd.readouterr().out  # epochs alone decide: nothing to say


def test_a_finished_run_names_the_settings_it_did_not_use(finished, cache, capfd):
    before = (finished / "summary.json").read_bytes()
    capfd.readouterr()
    assert (
        main(
            [
                "train",
                *_args(
                    finished.parent, cache, "checkpoint.every_steps=1", "training.lr=1e-3", "training.warmup_steps=3"
                ),
            ]
        )
        == 0
    )
    out = capfd.readouterr().out
    assert "nothing to do" in out
    assert "not used (the run is finished): training.lr: 0.005 -> 0.001; training.warmup_steps: 10 -> 3" in out
    assert (finished / "summary.json").read_bytes() == before
    assert main(["train", *_args(finished.parent, cache, "checkpoint.every_steps=1")]) == 0
    assert "not used" not in capfd.readouterr().out  # the same command: nothing more to say


def test_a_restart_without_checkpoint_keeps_the_earlier_records(tmp_path, cache, capfd):
    """A run stopped before its first checkpoint restarts at step 0, says so, and moves its metrics aside."""
    args = _args(tmp_path, cache, "training.max_steps=3", "checkpoint.every_steps=0")
    assert main(["train", *args, "training.stop_after_steps=1"]) == 0
    first = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert [json.loads(x)["step"] for x in first.splitlines()] == [1]
    capfd.readouterr()
    assert main(["train", *args]) == 0
    out = capfd.readouterr().out
    assert "no checkpoint in" in out and "starting from step 0" in out and "metrics.1.jsonl" in out
    assert (tmp_path / "run" / "metrics.1.jsonl").read_text() == first
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


# --- quiet and portable -------------------------------------------------------------------------------------------
def test_checkpoint_save_and_load_leak_no_warning(finished):
    assert (finished / "checkpoints" / "step_00000002").is_dir()  # saved twice, loaded once
    leaked = [w for w in WARNINGS if "torch.distributed is disabled" in w]
    assert not leaked, leaked


def test_builtin_base_is_stored_by_name_and_accepted_back(finished, cache, tmp_path, capfd, monkeypatch):
    """adapter_config.json names the built-in model portably; merge, generate and analyze resolve it; merge is
    quiet (no DeepSpeed accelerator notice, no progress bars)."""
    adapter = finished / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "builtin:tiny-llama"
    capfd.readouterr()
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    out, err = capfd.readouterr()
    assert out.count("\n") == 1 and out.startswith("[dora_dist] merged"), out
    assert err == "", err  # no accelerator notice, no progress bar
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.model_type == "llama"
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(adapter),
                "--prompt",
                "17 + 5 =",
                "--no-chat-template",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    monkeypatch.setenv("DORA_DIST_CACHE", str(cache))  # analyze has no config: the default cache
    assert main(["analyze", "--base", "builtin:tiny-llama", "--tuned", str(adapter)]) == 0
    assert "Traceback" not in capfd.readouterr().err


def test_generate_checks_its_arguments_before_loading(finished, monkeypatch, capfd):
    from dora_dist import generate, models

    def no_loading(*a, **k):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(generate, "load_for_generation", no_loading)
    monkeypatch.setattr(models, "load_model", no_loading)
    t0 = time.perf_counter()
    assert main(["generate", "--adapter", str(finished / "adapter"), "--prompt", "x", "--temperature", "-1"]) == 2
    assert time.perf_counter() - t0 < 5
    assert capfd.readouterr().err.startswith(PREFIX + "--temperature must be >= 0")


# --- help -----------------------------------------------------------------------------------------------------------
def test_keys_shows_type_default_choices_and_doc(capfd):
    from dora_dist.config import valid_keys

    assert main(["keys"]) == 0
    out = capfd.readouterr().out
    entries: dict[str, list[str]] = {}
    key = ""  # set by the first (unindented) line
    for line in out.splitlines():
        if line.startswith("    "):
            entries[key] = entries[key] + [line.strip()]
        else:
            key = line.split()[0]
            entries[key] = [line]
    assert sorted(entries) == sorted(valid_keys())
    assert all(len(v) == 2 and v[1] for v in entries.values()), [k for k, v in entries.items() if len(v) != 2]
    assert entries["training.lr"][0] == "training.lr  (float, default: 0.0002)  > 0"
    assert "one of: auto, none, ddp, fsdp2, zero2, zero3" in entries["parallel.engine"][0]
    assert "one of: none, nf4, fp4, int8" in entries["quantization.mode"][0]
    assert "in [0, 1)" in entries["data.eval_fraction"][0]


def test_plan_flags_all_have_help_with_their_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["plan", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (
        ("--nodes", "1"),
        ("--gpus-per-node", "1"),
        ("--gpu", "h100-80gb"),
        ("--inter-node", "infiniband"),
    ):
        assert f"{flag} " in text and f"(default: {default})" in text, flag
    # the MFU defaults to the GPU preset's (derived per GPU from published runs, dora_dist/plan/FACTS.md)
    assert "--mfu " in text and "(default: the GPU preset's" in text
    for flag in ("--interconnect", "--bandwidth-gbps", "--latency-us", "--sweep"):
        assert flag in text
    assert text.count("(default:") >= 9


# --- checks a fixture cannot put in docs/errors.md ------------------------------------------------------------------
def test_output_dir_on_a_read_only_filesystem(capfd):
    from dora_dist import train

    probe = Path("/sys/dora_dist_probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:  # pragma: no cover
        probe.rmdir()
        pytest.skip("/sys is writable here")
    assert train.main(["--check", "output.dir=/sys/dora_dist_probe/run"]) == 2
    err = capfd.readouterr().err
    assert err.startswith(PREFIX + "output.dir=/sys/dora_dist_probe/run cannot be written: /sys is not writable")
    assert err.count("\n") == 1


@pytest.mark.parametrize("repo_type", ["dataset", "model"])
@pytest.mark.parametrize(
    "failure, expect",
    [
        ("missing", "the hub has no such"),
        ("gated", "it is gated: accept its terms on https://huggingface.co/"),
        ("offline", "the hub cannot be reached (ConnectionError: no route)"),
    ],
)
def test_a_hub_repo_that_cannot_be_loaded_is_one_line(repo_type, failure, expect, monkeypatch, tmp_path):
    """Before datasets / transformers retry for up to a minute: one probe of the hub, turned into one line (no
    network needed: the probe is replaced by one that fails as the hub would)."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from dora_dist.errors import DataError, ModelError
    from dora_dist.hub import check_hub_dataset, check_hub_model

    response = SimpleNamespace(headers={}, status_code=404, request=None, url="https://huggingface.co/api")

    def dataset_info(self, repo_id, revision=None, timeout=None):
        assert timeout is not None  # never the client's default wait
        if failure == "missing":
            raise RepositoryNotFoundError("404", response=response)
        if failure == "gated":
            raise GatedRepoError("403", response=response)
        raise ConnectionError("no route")

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(huggingface_hub.HfApi, f"{repo_type}_info", dataset_info)
    with pytest.raises(DataError if repo_type == "dataset" else ModelError) as err:
        if repo_type == "dataset":
            check_hub_dataset("nobody/no-such-repo")
        else:
            check_hub_model("nobody/no-such-repo", "model.name_or_path")
    key = "data.source" if repo_type == "dataset" else "model.name_or_path"
    assert str(err.value).startswith(
        f"{key}='nobody/no-such-repo' is not a local file or directory, so it was "
        f"taken for a Hugging Face hub {repo_type} id, but "
    )
    assert expect in str(err.value)
    (tmp_path / f"{repo_type}s--nobody--no-such-repo").mkdir()  # cached: an unreachable hub is no error
    if failure == "offline":
        (check_hub_dataset if repo_type == "dataset" else check_hub_model)(
            "nobody/no-such-repo", "data.source" if repo_type == "dataset" else "model.name_or_path"
        )


def test_ctrl_c_outside_a_training_loop_is_one_line(monkeypatch, capfd):
    from dora_dist import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "merge", interrupted)
    assert main(["merge", "--adapter", "x", "--out", "y"]) == 130
    err = capfd.readouterr().err
    assert "interrupted (Ctrl-C): stopped at once" in err and "Traceback" not in err


# --- Ctrl-C in a real run -----------------------------------------------------------------------------------------
def _run_and_interrupt(argv: list[str], after_line: str, signals: int) -> tuple[int, str]:
    """Start `python -m dora_dist.train argv`; send SIGINT once `after_line` is printed and, with signals=2, again
    as soon as the run says it is stopping."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dora_dist.train", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines = []
    sent = 0
    for line in proc.stdout:
        lines.append(line)
        if (sent == 0 < signals and after_line in line) or (sent == 1 < signals and "Ctrl-C: stopping" in line):
            proc.send_signal(signal.SIGINT)
            sent += 1
    return proc.wait(timeout=120), "".join(lines)


@pytest.mark.slow
def test_ctrl_c_checkpoints_says_how_to_resume_and_exits_130(tmp_path, cache):
    argv = _args(tmp_path, cache, "training.max_steps=6")
    rc, out = _run_and_interrupt(argv, "step     2/6", signals=1)
    assert rc == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    stop = [line for line in out.splitlines() if "interrupted (Ctrl-C) after step" in line]
    assert len(stop) == 1 and "run the same command again to resume (exit code 130)" in stop[0], out[-3000:]
    step = int(stop[0].split("after step ")[1].split(";")[0])
    assert f"checkpoint {tmp_path / 'run' / 'checkpoints' / f'step_{step:08d}'}" in stop[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_signal"] == "SIGINT" and not summary["finished"]
    rc, out = _run_and_interrupt(argv, "never printed", signals=0)  # the same command again
    assert rc == 0 and "resumed_from=" in out, out[-3000:]
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # nothing lost, nothing repeated


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, cache):
    rc, out = _run_and_interrupt(_args(tmp_path, cache, "training.max_steps=6"), "step     1/6", signals=2)
    assert rc == 130, out[-3000:]
    assert "Traceback" not in out and "stopped at once" in out, out[-3000:]
