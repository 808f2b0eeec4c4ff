"""Many requests in one launch: ``--prompt_file`` and repeated ``--prompt``.

    reqs = requests.collect(argv, prompt_file, defaults)   # [Request(prompt="a cat", height=64, ...), ...]
    reqs = requests.listed_requests(argv, prompt_file)     # the same, None when one request is all

A prompt file holds one request per line: a plain line is a prompt; a line starting with ``{`` is
a JSON object with ``prompt`` and optionally ``height``, ``width``, ``num_inference_steps``
(alias ``steps``), ``seed`` and ``negative_prompt``. Blank lines and lines starting with ``#``
are skipped. Repeating ``--prompt`` on the command line gives one request per occurrence (a single
``--prompt`` keeps xfuser's meaning: its words are one prompt or a batch). Unset fields take the
run's values (``defaults``). Requests are served one after another through one process group;
outputs are numbered by request.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

#: JSON keys a request line may carry -> Request field.
_KEYS = {"prompt": "prompt", "height": "height", "width": "width", "num_inference_steps": "num_inference_steps",
         "steps": "num_inference_steps", "seed": "seed", "negative_prompt": "negative_prompt"}
_INT_FIELDS = ("height", "width", "num_inference_steps", "seed")


class RequestError(ValueError):
    """A request the user can fix; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One pipeline call. None: take the run's value."""

    prompt: str
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    seed: int | None = None
    negative_prompt: str | None = None

    def with_defaults(self, defaults: dict[str, Any]) -> "Request":
        """Unset fields filled from `defaults` (keys: this class's field names)."""
        filled = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in filled.items():
            if value is None and defaults.get(name) is not None:
                filled[name] = defaults[name]
        return Request(**filled)

    def overrides(self) -> dict[str, Any]:
        """The set fields, as pipeline call arguments (seed excluded: it seeds the generator)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "seed" and getattr(self, f.name) is not None}


def _parse_line(text: str, where: str) -> Request:
    if not text.startswith("{"):
        return Request(prompt=text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"{where}: not valid JSON ({err.msg}); write one JSON object or a plain prompt per line") from None
    if not isinstance(obj, dict):
        raise RequestError(f"{where}: expected a JSON object")
    unknown = sorted(set(obj) - set(_KEYS))
    if unknown:
        raise RequestError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(_KEYS)}")
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise RequestError(f"{where}: 'prompt' must be a non-empty string")
    fields: dict[str, Any] = {}
    for key, value in obj.items():
        name = _KEYS[key]
        if name in _INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                low = 0 if name == "seed" else 1
                raise RequestError(f"{where}: {key!r} must be an integer >= {low}, got {value!r}")
        elif not isinstance(value, str):
            raise RequestError(f"{where}: {key!r} must be a string, got {value!r}")
        fields[name] = value
    return Request(**fields)


def load_prompt_file(path: str) -> list[Request]:
    """The requests of a prompt file (see the module docstring); RequestError on a bad line."""
    if not os.path.isfile(path):
        raise RequestError(f"--prompt_file {path!r} does not exist; pass a text file with one prompt per line")
    requests = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                requests.append(_parse_line(text, f"{path}:{number}"))
    if not requests:
        raise RequestError(f"--prompt_file {path!r} holds no request; write one prompt per line")
    return requests


def repeated_prompts(argv: list[str]) -> list[str]:
    """The prompts of each ``--prompt`` occurrence when there are two or more; else []."""
    prompts, current = [], None
    for arg in argv:
        if arg == "--prompt" or arg.startswith("--prompt="):
            if current is not None:
                prompts.append(" ".join(current))
            current = [arg.partition("=")[2]] if "=" in arg else []
        elif current is not None:
            if arg.startswith("--"):
                prompts.append(" ".join(current))
                current = None
            else:
                current.append(arg)
    if current is not None:
        prompts.append(" ".join(current))
    return prompts if len(prompts) > 1 else []


def collect(argv: list[str], prompt_file: str | None, defaults: dict[str, Any]) -> list[Request]:
    """The launch's requests with defaults applied: the prompt file's, else one per repeated
    ``--prompt``, else one request of the run's own settings."""
    repeated = repeated_prompts(argv)
    if prompt_file and repeated:
        raise RequestError("--prompt_file and repeated --prompt both list requests; use one of them")
    if prompt_file:
        requests = load_prompt_file(prompt_file)
    elif repeated:
        requests = [Request(prompt=p) for p in repeated]
    else:
        requests = [Request(prompt=defaults.get("prompt"))]
    return [r.with_defaults(defaults) for r in requests]


def listed_requests(argv: list[str], prompt_file: str | None) -> list[Request] | None:
    """The requests the command line lists (a prompt file or repeated ``--prompt``); None when it
    lists none and the run's own settings make the one request."""
    if not (prompt_file or repeated_prompts(argv)):
        return None
    return collect(argv, prompt_file, {})
