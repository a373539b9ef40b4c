"""benchmarks/gpu_check.sh's report: every step's exit status, time and figures in one JSON file.

    python benchmarks/gpu_check_report.py WORK_DIR OUT_JSON

WORK_DIR holds steps.tsv (name, exit status, milliseconds, command per line), each step's NAME.log and NAME.json,
pytest's junit XML (pytest_gpu.xml), the fidelity figures (figures.jsonl) and the QDoRA run's output (qdora/); any
of them may be missing (a step that failed or timed out is reported with the last lines of its log)."""

from __future__ import annotations

import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def environment() -> dict:
    import torch

    env = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # recorded, not fatal: the 4-bit steps say what failed
        env["bitsandbytes"] = f"unavailable: {exc}"
    return env


def junit_outcomes(path: Path) -> dict[str, str]:
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = child.tag
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = status
    return outcomes


def build_report(work: Path) -> dict:
    report = {**environment(), "steps": {}}
    for line in (work / "steps.tsv").read_text().splitlines():
        name, rc, millis, cmd = line.split("\t", 3)
        step = {"exit": int(rc), "seconds": round(int(millis) / 1000, 1), "command": cmd}
        if int(rc) != 0:
            log = work / f"{name}.log"
            step["log_tail"] = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else []
        result = work / f"{name}.json"
        if result.exists():
            step["result"] = json.loads(result.read_text())
        report["steps"][name] = step
    if (work / "pytest_gpu.xml").exists() and "pytest_gpu" in report["steps"]:
        report["steps"]["pytest_gpu"]["tests"] = junit_outcomes(work / "pytest_gpu.xml")
    figures = work / "figures.jsonl"
    if figures.exists():
        report["fidelity"] = [json.loads(line) for line in figures.read_text().splitlines() if line.strip()]
    summary = work / "qdora" / "summary.json"
    if summary.exists() and "qdora_fsdp2" in report["steps"]:
        report["steps"]["qdora_fsdp2"]["summary"] = json.loads(summary.read_text())
    return report


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    report = build_report(work)
    out.write_text(json.dumps(report, indent=2))
    failed = [name for name, step in report["steps"].items() if step["exit"] != 0]
    print(f"gpu_check: {len(report['steps']) - len(failed)} of {len(report['steps'])} steps passed; figures in {out}")
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
