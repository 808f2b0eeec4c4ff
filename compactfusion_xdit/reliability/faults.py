"""Fault injection for reliability tests: make a rank die or fail at a chosen denoising step.

    CFX_FAULT=exit:1:3      rank 1 ends its process (os._exit) at its 3rd scheduler step of the run
    CFX_FAULT=raise:*:2     every rank raises `InjectedFault` at its 2nd scheduler step of a request
    CFX_FAULT=freeze:1:2    rank 1 stops itself (SIGSTOP) at its 2nd scheduler step: alive but frozen

Steps are counted over the whole run (across requests), so each fault fires once. Unset (the
default) nothing is wrapped. The worker calls `install` on its
pipeline; the hook wraps ``pipe.scheduler.step``, which every diffusers denoising loop calls once per
step (per patch under PipeFusion).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import Any

from compactfusion_xdit import envs

ENV = envs.FAULT
KINDS = ("exit", "raise", "freeze")
EXIT_STATUS = 17


class InjectedFault(RuntimeError):
    """The failure `CFX_FAULT=raise:...` asked for."""


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    rank: int | None  # None: every rank
    step: int  # 1-based scheduler step at which it fires

    @classmethod
    def parse(cls, text: str) -> "Fault":
        parts = text.split(":")
        if len(parts) != 3 or parts[0] not in KINDS:
            raise ValueError(f"{ENV}={text!r}: expected KIND:RANK:STEP with KIND one of {', '.join(KINDS)}, "
                             "RANK an integer or *, STEP an integer >= 1 (e.g. exit:1:3)")
        try:
            rank = None if parts[1] == "*" else int(parts[1])
            step = int(parts[2])
        except ValueError:
            raise ValueError(f"{ENV}={text!r}: RANK must be an integer or *, STEP an integer >= 1") from None
        if step < 1:
            raise ValueError(f"{ENV}={text!r}: STEP must be >= 1")
        return cls(parts[0], rank, step)


class StepFault:
    """Wraps a scheduler's ``step``; fires `fault` on this rank at the chosen call."""

    def __init__(self, fault: Fault, rank: int) -> None:
        self.fault = fault
        self.rank = rank
        self.calls = 0  # scheduler steps since the start of the run

    def before_step(self) -> None:
        self.calls += 1
        fault = self.fault
        if self.calls != fault.step or (fault.rank is not None and fault.rank != self.rank):
            return
        if fault.kind == "exit":
            print(f"[{ENV}] rank {self.rank} exits at scheduler step {self.calls}", file=sys.stderr, flush=True)
            os._exit(EXIT_STATUS)
        if fault.kind == "freeze":
            print(f"[{ENV}] rank {self.rank} freezes at scheduler step {self.calls}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)  # whoever launched it must SIGKILL it
            return
        raise InjectedFault(f"injected failure on rank {self.rank} at scheduler step {self.calls} ({ENV})")


def install(pipe: Any, rank: int, spec: str | None = None) -> StepFault | None:
    """Wrap ``pipe.scheduler.step`` per `spec` (default: the ``CFX_FAULT`` variable); None when unset."""
    spec = envs.get(ENV) if spec is None else spec
    if not spec:
        return None
    hook = StepFault(Fault.parse(spec), rank)
    scheduler = pipe.scheduler
    original = scheduler.step

    def step(*args, **kwargs):
        hook.before_step()
        return original(*args, **kwargs)

    # object.__setattr__: xfuser's scheduler wrapper forwards attribute writes to the inner scheduler.
    object.__setattr__(scheduler, "step", step)
    return hook
