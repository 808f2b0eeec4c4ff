"""YAML run configs: one file holds what the ``xfuser`` command's flags say, in sections.

    xfuser --config configs/tiny-flux-cpu.yaml                       # run it
    xfuser --config configs/tiny-flux-cpu.yaml --num_inference_steps 4 --dry-run   # flags override the file

    model: tiny-flux                  # a built-in name or a local diffusers folder
    parallel: {ulysses_degree: 2}     # xfuser's parallel flags and ours; world_size: checked, optional
    input: {height: 64, width: 64, num_inference_steps: 8, prompt: a cat, seed: 42}
    runtime: {dtype: float32, output_dir: out}
    compression: {codec: residual-int4, warmup: 1, stats: true,
                  schedule: [{steps: 0-1, codec: none}, {layers: 4-, codec: residual-1bit}]}
    launcher: {master_port: 29600}    # torchrun placement

Every flag of the command (`flag_table.fast_parser`: xfuser's and ours) is a key of one section, named
like the flag without dashes; the section is the flag's argument group (``Model Options`` -> model,
groups about parallelism -> parallel, ``Input Options`` -> input, ``launcher`` -> launcher, the rest
-> runtime; ``seed`` and ``prompt_file`` sit in input). In ``compression:`` the ``--compression-*``
flags drop their prefix, ``--compression`` is ``codec`` and ``--compression-no-ef`` is
``error_feedback: false``. New flags become keys without changes here. Schema: docs/yaml_configs.md.

`expand_argv` turns ``--config F`` into explicit flags placed before the command line's own, leaving
out every file setting the command line gives again, so the ranks parse one plain flag list.
Mistakes raise `ConfigError` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from typing import Any

from compactfusion_xdit.cli import flag_table

SECTIONS = ("model", "parallel", "input", "runtime", "compression", "launcher")
#: Flags that belong elsewhere than their argument group says.
SECTION_OF_DEST = {"seed": "input", "prompt_file": "input"}
#: Our own flags no file may set (they are about reading the file).
NOT_IN_FILES = ("config", "dry_run")
#: Keys that are not flags: parallel.world_size is checked against the degrees of the file.
WORLD_SIZE_KEY = "world_size"
_COMPRESSION_PREFIX = "compression_"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One YAML key: the flag it stands for. ``invert``: the flag is given when the value is false."""

    section: str
    name: str
    action: argparse.Action
    invert: bool = False

    @property
    def option(self) -> str:
        """The flag's underscore spelling where it has one (what xfuser's parser matches)."""
        return self.action.option_strings[-1]


def _section_of(title: str, dest: str) -> str | None:
    if dest in NOT_IN_FILES:
        return None
    if dest in SECTION_OF_DEST:
        return SECTION_OF_DEST[dest]
    if dest.startswith("compression"):
        return "compression"
    lowered = title.lower()
    for word in ("model", "launcher", "input", "parallel"):
        if word in lowered:
            return word
    return "runtime"


def _key_name(section: str, dest: str) -> tuple[str, bool]:
    if section == "model" and dest == "model":
        return "path", False
    if section == "compression":
        if dest == "compression":
            return "codec", False
        if dest == "compression_no_ef":
            return "error_feedback", True
        return dest[len(_COMPRESSION_PREFIX):], False
    return dest, False


def schema(parser: argparse.ArgumentParser | None = None) -> dict[str, dict[str, Key]]:
    """``{section: {key: Key}}`` for every flag of the command (default: `flag_table.fast_parser`)."""
    parser = parser or flag_table.fast_parser()
    out: dict[str, dict[str, Key]] = {s: {} for s in SECTIONS}
    for title, action in flag_table.grouped_actions(parser):
        section = _section_of(title, action.dest)
        if section is not None:
            name, invert = _key_name(section, action.dest)
            out[section][name] = Key(section, name, action, invert)
    return out


# ----- reading ------------------------------------------------------------------------------------
def load(path: str) -> dict:
    """The file's top-level mapping; ConfigError for a missing, unreadable or malformed file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read config {path!r}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the file holds no settings; start with e.g. 'model: tiny-flux'")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected sections ({', '.join(SECTIONS)}) at the top level, got a {type(data).__name__}")
    return data


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _type_name(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "true or false"
    base = {int: "an integer", float: "a number"}.get(action.type, "text")
    if action.nargs in ("*", "+"):
        return f"{base} or a list of them"
    return base


def _scalar_text(value: Any, action: argparse.Action, where: str) -> str:
    """`value` as the flag's text, after checking its YAML type and the flag's own rules."""
    wanted = action.type
    if isinstance(value, bool) or isinstance(value, (list, dict)) or value is None:
        ok = False
    elif wanted is int:
        ok = isinstance(value, int)
    elif wanted is float:
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, (str, int, float))
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(action)}, got {value!r}")
    text = str(value)
    if action.choices is not None and value not in action.choices and text not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(str, action.choices))}")
    if callable(wanted) and wanted not in (int, float, str):
        try:
            wanted(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise ConfigError(f"{where}: {err}") from None
    return text


def _composite_text(key: Key, value: Any, where: str) -> Any:
    """Values whose YAML form is richer than the flag's text: path lists and schedules."""
    if key.section == "compression" and key.name == "paths" and isinstance(value, list):
        if not all(isinstance(p, str) for p in value):
            raise ConfigError(f"{where}: expected path names such as [ulysses, ring], got {value!r}")
        return ",".join(value)
    if key.section == "compression" and key.name == "schedule":
        from compactfusion_xdit.core.config import CompressionConfig
        from compactfusion_xdit.core.schedule import format_schedule

        try:
            return format_schedule(CompressionConfig.parse("none", schedule=value).schedule)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
    return value


def key_argv(key: Key, value: Any, where: str) -> list[str]:
    """The flags one key stands for (empty for a switch that is off)."""
    action = key.action
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return [key.option] if value != key.invert else []
    value = _composite_text(key, value, where)
    if action.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise ConfigError(f"{where}: expected at least one value")
        texts = [_scalar_text(v, action, where) for v in items]
        if len(texts) == 1:
            return [f"{key.option}={texts[0]}"]
        if any(t.startswith("-") for t in texts):
            raise ConfigError(f"{where}: list items may not start with '-' ({texts}); give a single text instead")
        return [key.option, *texts]
    return [f"{key.option}={_scalar_text(value, action, where)}"]


@dataclasses.dataclass
class FileSettings:
    """A config file turned into flags: ``flags[dest]`` is the argv of one setting."""

    path: str
    flags: dict[str, list[str]]
    world_size: int | None = None

    def argv(self, skip: set[str] = frozenset()) -> list[str]:
        return [arg for dest, args in self.flags.items() if dest not in skip for arg in args]


def read(path: str, parser: argparse.ArgumentParser | None = None) -> FileSettings:
    """Load and check `path`: every key known and well typed, the file's degrees consistent."""
    parser = parser or flag_table.fast_parser()
    known = schema(parser)
    data = load(path)
    flags: dict[str, list[str]] = {}
    world = None
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r}{_closest(section, SECTIONS)} "
                              f"(sections: {', '.join(SECTIONS)})")
        if section == "model" and not isinstance(body, dict):
            body = {"path": body}
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {section}: expected a mapping of settings (key: value), got {body!r}")
        for name, value in body.items():
            where = f"{path}: {section}.{name}"
            if section == "parallel" and name == WORLD_SIZE_KEY:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"{where}: expected an integer >= 1 (the number of ranks), got {value!r}")
                world = value
                continue
            key = known[section].get(name)
            if key is None:
                raise ConfigError(f"{where}: unknown key{_elsewhere(known, section, name)}")
            flags[key.action.dest] = key_argv(key, value, where)
    settings = FileSettings(path, flags, world)
    _check_file(settings, parser)
    return settings


def _elsewhere(known: dict[str, dict[str, Key]], section: str, name: Any) -> str:
    for other, keys in known.items():
        if name in keys and other != section:
            return f"; it belongs in the {other} section"
    valid = sorted(known[section]) + ([WORLD_SIZE_KEY] if section == "parallel" else [])
    hint = _closest(name, valid)
    return hint or f" (valid keys: {', '.join(valid)})"


def _check_file(settings: FileSettings, parser: argparse.ArgumentParser) -> None:
    """Checks across keys: the flags parse together, the compression settings combine, and the
    degrees give parallel.world_size when the file states it."""
    from compactfusion_xdit.cli import flags as cli_args
    from compactfusion_xdit.cli import plan

    try:
        ns = parser.parse_args(settings.argv())
    except ValueError as err:
        raise ConfigError(f"{settings.path}: {err}") from None
    try:
        cli_args.compression_config(ns)
    except ValueError as err:
        raise ConfigError(f"{settings.path}: compression: {err}") from None
    if settings.world_size is not None:
        try:
            world = plan.world_size(ns)
        except ValueError as err:
            raise ConfigError(f"{settings.path}: parallel: {err}") from None
        if world != settings.world_size:
            raise ConfigError(
                f"{settings.path}: parallel.world_size: {settings.world_size} ranks do not fit the degrees, "
                f"which multiply to {world} ({_degrees(ns)}); change world_size or the degrees")


def _degrees(ns: argparse.Namespace) -> str:
    from compactfusion_xdit.cli import plan
    from compactfusion_xdit.modes import layout

    parts = [f"{flag[2:]} {getattr(ns, flag[2:])}" for flag in plan.DEGREE_FLAGS if getattr(ns, flag[2:]) != 1]
    parts += ["use_cfg_parallel 2"] if ns.use_cfg_parallel else []
    parts += [f"{layout.MODES[m].degree_attr} {layout.degree(ns, m)}" for m in layout.MODES if layout.degree(ns, m) != 1]
    return " x ".join(parts) or "every degree 1"


# ----- the command line ---------------------------------------------------------------------------
def _config_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """The ``--config`` value and argv without it."""
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError("--config needs a file: --config FILE.yaml")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    return path, rest


def given_dests(argv: list[str], parser: argparse.ArgumentParser) -> set[str]:
    """The settings (dests) a command line gives, whatever spelling it uses."""
    options = {opt.replace("-", "_"): action.dest for opt, action in parser._option_string_actions.items()}
    dests = set()
    for arg in argv:
        if arg.startswith("--"):
            dest = options.get(arg.partition("=")[0].replace("-", "_"))
            if dest is not None:
                dests.add(dest)
    return dests


def expand_argv(argv: list[str]) -> list[str]:
    """argv with ``--config FILE`` replaced by the file's flags; the command line's own flags come
    after them and replace the file's settings they give again. Unchanged without ``--config``."""
    path, rest = _config_path(argv)
    if path is None:
        return list(argv)
    parser = flag_table.fast_parser()
    settings = read(path, parser)
    return settings.argv(skip=given_dests(rest, parser)) + rest


def main() -> None:
    """``python -m compactfusion_xdit.cli.yaml_config FILE...``: check files, print their flags."""
    import sys

    status = 0
    for path in sys.argv[1:]:
        try:
            print(f"{path}: " + " ".join(read(path).argv()))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
    sys.exit(status)


if __name__ == "__main__":
    main()
