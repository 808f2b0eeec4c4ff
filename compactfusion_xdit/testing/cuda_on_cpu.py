"""Test-only: let a GPU script (xfuser's shipped examples) run on a CPU-only torch.

    python -m torch.distributed.run --nproc_per_node 2 -m compactfusion_xdit.testing.cuda_on_cpu \\
        --compression residual-int4 --compression-stats <site-packages>/examples/pixartalpha_example.py ...

Run as a module, this installs the shim in the rank's process and then hands its arguments to
`compactfusion_xdit.launch.main`, so the script runs exactly as on the user's route, with CUDA
requests answered by the CPU:

* ``Tensor.to`` / ``Module.to`` / ``DiffusionPipeline.to`` (and ``.cuda()``) with a ``cuda``
  device go to ``cpu``;
* ``torch.Generator(device="cuda...")`` makes a CPU generator (``isinstance`` still holds);
* ``torch.cuda.max_memory_allocated`` / ``memory_allocated`` answer 0;
  ``reset_peak_memory_stats`` / ``synchronize`` / ``empty_cache`` do nothing.

``torch.cuda.is_available()`` stays False, so the plugin's CPU/gloo support still applies. This
is for the test suite only: nothing on the user's route imports it (a user runs the examples on a
GPU, where none of it is needed).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

_ORIGINALS: list[tuple[Any, str, Any]] = []


def _cpu(device: Any) -> Any:
    """`device` with any CUDA device replaced by ``cpu`` (other values unchanged)."""
    if isinstance(device, str) and device.split(":")[0] == "cuda":
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _map_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args = tuple(_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
    if "device" in kwargs:
        kwargs = {**kwargs, "device": _cpu(kwargs["device"])}
    return args, kwargs


def _to_on_cpu(original):
    def to(self, *args, **kwargs):
        args, kwargs = _map_args(args, kwargs)
        return original(self, *args, **kwargs)

    to.__wrapped__ = original
    return to


def _cuda_on_cpu(self, *args, **kwargs):
    return self.to("cpu")


class _GeneratorMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _ORIGINAL_GENERATOR)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, _ORIGINAL_GENERATOR)


_ORIGINAL_GENERATOR = torch.Generator


class _Generator(metaclass=_GeneratorMeta):
    """Stands in for ``torch.Generator``: a ``cuda`` device gives a CPU generator."""

    def __new__(cls, device: Any = "cpu"):
        return _ORIGINAL_GENERATOR(device=_cpu(device))


def _zero(*args, **kwargs) -> int:
    return 0


def _nothing(*args, **kwargs) -> None:
    return None


_ABSENT = object()


def _replace(owner: Any, name: str, value: Any) -> None:
    """Set ``owner.name``; a class attribute it only inherited is removed again by `uninstall`."""
    own = vars(owner).get(name, _ABSENT)
    _ORIGINALS.append((owner, name, own))
    setattr(owner, name, value)


def install() -> None:
    """Map the CUDA calls of xfuser's examples to the CPU in this process (idempotent)."""
    if _ORIGINALS:
        return
    from diffusers import DiffusionPipeline

    for owner in (torch.Tensor, torch.nn.Module, DiffusionPipeline):
        _replace(owner, "to", _to_on_cpu(owner.to))
    for owner in (torch.Tensor, torch.nn.Module):
        _replace(owner, "cuda", _cuda_on_cpu)
    _replace(torch, "Generator", _Generator)
    for name in ("max_memory_allocated", "memory_allocated"):
        _replace(torch.cuda, name, _zero)
    for name in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        _replace(torch.cuda, name, _nothing)


def uninstall() -> None:
    """Put back everything `install` replaced."""
    while _ORIGINALS:
        owner, name, value = _ORIGINALS.pop()
        if value is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, value)


def main(argv: list[str] | None = None) -> int:
    """Install the shim, then run `compactfusion_xdit.launch.main` with `argv`."""
    install()
    from compactfusion_xdit import launch

    return launch.main(argv)


if __name__ == "__main__":
    sys.exit(main())
