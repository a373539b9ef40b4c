"""A data source or model that is not a local path is a Hugging Face hub id. Before `datasets` or transformers try
it (retries for up to a minute, then a long ConnectionError traceback), one quick look says whether it can work
here: offline and not cached, no such repository, gated, or the hub unreachable are each one line naming what the
name was taken for and what to do instead."""

from __future__ import annotations

import os
from pathlib import Path

from dora_dist.errors import DataError, ModelError, UserError, one_line

_TRUE = ("1", "true", "yes", "on")


def offline(repo_type: str = "dataset") -> bool:
    """HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE) is set, read now, not at the libraries' import."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE" if repo_type == "dataset" else "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in keys)


def in_cache(repo_id: str, repo_type: str = "dataset") -> bool:
    """Whether the hub download cache (or, for a dataset, the datasets cache) holds this repository."""
    from huggingface_hub import constants

    if (Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}").is_dir():
        return True
    if repo_type == "dataset":
        import datasets.config

        return (Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).is_dir()
    return False


def check_hub_repo(repo_id: str, repo_type: str, key: str, revision: str | None = None) -> None:
    """Raise a one-line UserError (DataError for a dataset, ModelError for a model) when the hub repository
    `repo_id` cannot be loaded here; return when it can (or may: a cached copy while the hub is unreachable)."""
    error: type[UserError] = DataError if repo_type == "dataset" else ModelError
    what = "a Hugging Face hub dataset id" if repo_type == "dataset" else "a Hugging Face hub model id"
    taken = f"{key}={repo_id!r} is not a local file or directory, so it was taken for {what}, but"
    local = f"for a local path write ./{repo_id}"
    if offline(repo_type):
        if not in_cache(repo_id, repo_type):
            raise error(
                f"{taken} offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache: download it "
                f"once with network access, or copy its files here and give their path; {local}"
            )
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    try:
        getattr(HfApi(), f"{repo_type}_info")(repo_id, revision=revision, timeout=10)
    except GatedRepoError as exc:
        if in_cache(repo_id, repo_type):
            return
        raise error(
            f"{taken} it is gated: accept its terms on {page} and log in (`hf auth login`, or set HF_TOKEN)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise error(
            f"{taken} the hub has no such {repo_type} (or it is private: log in with `hf auth login`); {local}"
        ) from exc
    except RevisionNotFoundError as exc:
        raise error(f"{taken} it has no revision {revision!r}") from exc
    except Exception as exc:  # noqa: BLE001 (connection, DNS, proxy, timeout: whatever the HTTP client raises)
        if in_cache(repo_id, repo_type):
            return  # a cached copy: the library finds it (set HF_HUB_OFFLINE=1 to skip its retries)
        raise error(
            f"{taken} the hub cannot be reached ({type(exc).__name__}: {one_line(exc)[:120]}) and it is not "
            f"in the local cache; {local}, or run where the hub is reachable"
        ) from exc


def check_hub_dataset(repo_id: str, key: str = "data.source") -> None:
    check_hub_repo(repo_id, "dataset", key)


def check_hub_model(name: str, key: str, revision: str | None = None) -> None:
    """A model or tokenizer name that is not a local directory or the built-in model: check it on the hub."""
    if name.startswith("builtin:") or Path(name).expanduser().exists():
        return
    check_hub_repo(name, "model", key, revision)
