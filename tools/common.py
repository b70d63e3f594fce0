"""What every benchmark suite shares: machine description, timing, markdown tables, output files.

Not part of the product (``forvalue``); imported as ``tools.common`` by the suites of this package.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: the folder that holds the ``tools`` package."""


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table(s) to this file")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0 = torch default); 1 gives steadier timings on a loaded machine",
    )


def apply_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def resolve(device: str) -> torch.device:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA GPU")
    return dev


def sync(device: torch.device | str | None) -> None:
    """Wait for queued GPU work so wall-clock timings cover it (no-op on CPU)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device) -> tuple[float, object]:
    """``(seconds, result)`` of ``fn()``, synchronising the GPU before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def cpu_model() -> str:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


START_LOAD = _loadavg()


def machine_info(device) -> str:
    """One markdown paragraph that says where the numbers come from (call it at the end of a run)."""
    import torch

    dev = torch.device(device)
    parts = [
        f"cores {os.cpu_count()} (torch threads {torch.get_num_threads()})",
        f"CPU {cpu_model()}",
        f"torch {torch.__version__}",
        f"device {dev}",
    ]
    if dev.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(dev)}")
    try:
        import lance
        import lancedb

        parts.append(f"lancedb {lancedb.__version__} / pylance {lance.__version__}")
    except ImportError:
        pass
    parts.append(f"load avg (1/5/15 min) at start {START_LOAD}, at end {_loadavg()}")
    return "Machine: " + ", ".join(parts) + "."


def machine_facts() -> dict:
    """The machine as a dict (CPU, cores, memory, torch/transformers/python versions, GPU name or None)."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def machine_short() -> str:
    """``"2 threads, <CPU model name>, torch <version>"``: the one-line machine note of the audit table."""
    import torch

    return f"{torch.get_num_threads()} threads, {machine_facts()['cpu']}, torch {torch.__version__}"


def run_module(module: str, args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m MODULE ARGS`` in a fresh interpreter that can import ``tools`` (same cwd).

    The child gets the repository root in front of ``PYTHONPATH`` so ``tools.…`` resolves wherever
    the caller's working directory is; ``kwargs`` go to ``subprocess.run``.
    """
    env = dict(kwargs.pop("env", None) or os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env, **kwargs)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(x: object) -> str:
        return x if isinstance(x, str) else f"{x}"

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(text: str, out: Path | None) -> None:
    """Print ``text`` (markdown) and, with ``--out``, write it to that file."""
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text if text.endswith("\n") else text + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def quiet_transformers() -> None:
    """No transformers warnings or progress bars in benchmark output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class LazyModel:
    """Mixin of the fine-tuning suites: ``runner`` (the model at ``self.model_path`` on ``self.device``, loaded
    on first use) and ``tok(rows)`` (rows tokenized as the fine-tune reads them, ``self.s.max_length``)."""

    _runner = None

    @property
    def runner(self):
        if self._runner is None:
            from forvalue.indexer.model_runner import load_runner
            from forvalue.schemas.config import ModelConfig

            quiet_transformers()
            self._runner = load_runner(ModelConfig(path=self.model_path, device=self.device))
        return self._runner

    def tok(self, rows):
        from tools.selection_lora import sft_tokenize

        return sft_tokenize(self.runner.tokenizer, rows, self.s.max_length)
