"""Where a result came from: code version, environment and content hashes."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cxrdebias
from cxrdebias.training import allocator

_PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_PACKAGE_DIR), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def code_version() -> dict[str, Any]:
    """Package version plus the git commit (and whether the tree had local changes)."""
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status)
    return {"package": cxrdebias.__version__, "git_commit": commit, "git_dirty": dirty}


def _cpu_model() -> str | None:
    """The CPU's marketing name (Linux /proc/cpuinfo), which says more about speed than the ISA."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment() -> dict[str, Any]:
    """Versions of the things that change numbers or speed: Python, torch, numpy, CPU/GPU."""
    from cxrdebias.training.device import (
        cpu_has_native_bf16,  # train imports much; only needed here
    )

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "malloc_threshold": allocator.applied(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def run_info(data: dict[str, Any]) -> dict[str, Any]:
    """What ``run.json`` records when a run starts: time, command line, code, environment, data."""
    import sys
    from datetime import datetime, timezone

    return {
        "started": datetime.now(timezone.utc).isoformat(),
        "command": sys.argv,
        "code_version": code_version(),
        "environment": environment(),
        "data": data,
    }
