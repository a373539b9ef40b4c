"""A data source that is not a local path is a Hugging Face hub dataset id. Before `datasets` tries it (five
network retries, then a long ConnectionError traceback), one quick look says whether it can work here: offline and
not cached, no such dataset, gated, or the hub unreachable are each one line naming what the source was taken for
and how to name a local path instead."""
from __future__ import annotations

import os
from pathlib import Path

from dora_dist.errors import DataError, one_line

_TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set (read now, not at the libraries' import)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def in_cache(repo_id: str) -> bool:
    """Whether `datasets` has this hub dataset in its caches (the hub download cache or its own)."""
    import datasets.config
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}").is_dir() or \
        (Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).is_dir()


def check_hub_dataset(repo_id: str, key: str = "data.source") -> None:
    """Raise a DataError when the hub dataset `repo_id` cannot be loaded here; return when it can (or may)."""
    taken = (f"{key}={repo_id!r} is not a local file or directory, so it was taken for a Hugging Face hub dataset "
             "id, but")
    local = f"for a local path write ./{repo_id}"
    if offline():
        if not in_cache(repo_id):
            raise DataError(f"{taken} offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the "
                            f"local cache: load it once with network access, or copy its files here and give "
                            f"their path; {local}")
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(repo_id, timeout=10)
    except GatedRepoError as exc:
        raise DataError(f"{taken} it is gated: accept its terms on https://huggingface.co/datasets/{repo_id} and log "
                        "in (`hf auth login`, or set HF_TOKEN)") from exc
    except RepositoryNotFoundError as exc:
        raise DataError(f"{taken} the hub has no such dataset (or it is private: log in with `hf auth login`); "
                        f"{local}") from exc
    except Exception as exc:  # noqa: BLE001 (connection, DNS, proxy, timeout: whatever the HTTP client raises)
        if in_cache(repo_id):
            raise DataError(f"{taken} the hub cannot be reached ({type(exc).__name__}: {one_line(exc)[:120]}); it is "
                            "in the local cache: set HF_HUB_OFFLINE=1 to use that copy") from exc
        raise DataError(f"{taken} the hub cannot be reached ({type(exc).__name__}: {one_line(exc)[:120]}); "
                        f"{local}, or run where the hub is reachable") from exc
