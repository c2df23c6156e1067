"""Memory and timing of one training run for the training benchmark (bench_training.py): RSS and
its high-water mark from /proc (CPU) or torch.cuda peaks (GPU), per-step times and token counts,
and the TrainerCallback that feeds them."""

from __future__ import annotations

import ctypes
import gc
import time
from pathlib import Path


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


class Meter:
    """Timing and memory for one run (a TrainerCallback is built around it).

    `batch_tokens` receives the real-token count of every micro-batch in collation
    order (= training order). Tokens of step k are those of micro-batches
    (k-1)*accum .. k*accum-1; counting at step ends instead would be off by the one
    batch the dataloader prefetches."""

    def __init__(self, warmup_steps: int, grad_accum: int):
        import torch

        self.cuda = torch.cuda.is_available()
        self.warmup = warmup_steps
        self.accum = grad_accum
        self.batch_tokens: list[int] = []
        self.marks: list[tuple[int, float]] = []  # (step, time)
        self.loss = None
        trim()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.hwm_ok = reset_hwm()
            self.before = rss_kib() * 1024
        self.after_load = None
        self.peak_total = None
        self.peak_train = None

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def train_begin(self) -> None:
        import torch

        self._sync()
        if self.cuda:
            self.after_load = torch.cuda.memory_allocated()
            self.peak_load = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_load = rss_kib("VmHWM") * 1024
            trim()
            self.after_load = rss_kib() * 1024
            reset_hwm()
        self.marks.append((0, time.perf_counter()))

    def step_end(self, step: int) -> None:
        self._sync()
        self.marks.append((step, time.perf_counter()))

    def finish(self) -> dict:
        import torch

        self._sync()
        if self.cuda:
            peak_train = torch.cuda.max_memory_allocated()
        else:
            peak_train = rss_kib("VmHWM") * 1024
        peak_total = max(self.peak_load, peak_train)
        timed = [m for m in self.marks if m[0] >= self.warmup]
        (s0, t0), (s1, t1) = timed[0], timed[-1]
        tokens = sum(self.batch_tokens[s0 * self.accum:s1 * self.accum])
        return {
            "memory_method": "torch.cuda.max_memory_allocated" if self.cuda else "RSS high-water mark (VmHWM) delta",
            "peak_bytes": peak_total - self.before,
            "peak_train_bytes": peak_train - self.before,
            "model_resident_bytes": self.after_load - self.before,
            "timed_steps": s1 - s0,
            "timed_seconds": t1 - t0,
            "timed_tokens": tokens,
            "tokens_per_s": tokens / (t1 - t0) if t1 > t0 else None,
            "step_seconds": [round(b[1] - a[1], 3) for a, b in zip(self.marks, self.marks[1:])],
            "total_tokens": sum(self.batch_tokens),
            "final_loss": self.loss,
        }


def meter_callback(meter: Meter):
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            meter.train_begin()

        def on_step_end(self, args, state, control, **kw):
            meter.step_end(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                meter.loss = float(logs["loss"])

    return _CB()
