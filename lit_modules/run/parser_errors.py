"""jsonargparse's nested error reports reduced to one line: where (file:line or the command line), which key,
what was expected."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def key_source(argv: list[str], key: str, cwd: str = ".") -> str:
    """Where the value of ``key`` came from: the last ``--config`` file setting it (file:line) or the command line.

    ``cwd`` is the directory the arguments were given in (jsonargparse changes directory while it parses).
    """
    flags = {f"--{key}", f"--{key.replace('.init_args', '')}"}
    source = f"{DEFAULT_CONFIG.relative_to(ROOT)}:{_yaml_line(DEFAULT_CONFIG, key)}" if _yaml_line(DEFAULT_CONFIG, key) else None
    for i, arg in enumerate(argv):
        path = None
        if arg in ("-c", "--config") and i + 1 < len(argv):
            path = Path(argv[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        if path is not None:
            full = path if path.is_absolute() else Path(cwd) / path
            line = _yaml_line(full, key) if full.is_file() else None
            source = f"{path}:{line}" if line else source
        elif arg.split("=", 1)[0] in flags:
            source = "command line"
    return source or "command line"


def _yaml_line(path: Path, key: str) -> Optional[int]:
    """1-based line of dotted ``key`` in a YAML file (``init_args`` levels optional), or None."""
    import yaml

    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    parts = [p for p in key.split(".") if p != "init_args"]

    def find(node: Any, parts: list[str]) -> Optional[int]:
        if not parts or not isinstance(node, yaml.MappingNode):
            return None
        for k, v in node.value:
            if k.value == parts[0]:
                if len(parts) == 1:
                    return k.start_mark.line + 1
                return find(v, parts[1:])
            if k.value == "init_args":
                found = find(v, parts)
                if found:
                    return found
        return None

    return find(node, parts)


def summarize_parser_error(message: str, argv: list[str], cwd: str = ".") -> str:
    """Reduce jsonargparse's nested error report to one line: where, which key, what was expected."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    key_parts: list[str] = []
    unknown = expected = got = None
    for ln in lines:
        if m := re.match(r'Parser key "([^"]+)"', ln):
            key_parts.append(m.group(1))
        elif m := re.search(r"Problem with given class_path '([^']+)'", ln):
            key_parts.append("init_args")
        elif m := re.search(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)|does not accept option '([^']+)'", ln):
            unknown = m.group(1) or m.group(2)
        elif m := re.search(r"unrecognized arguments: (.*)", ln):
            return f"unknown option(s) {m.group(1)} (options are never abbreviated; see --help)"
        elif (m := re.search(r"Expected a typing\.Literal\[(.*)\]", ln)) and expected is None:
            expected = f"one of {m.group(1)}"
        elif (m := re.search(r"Expected a <class '([^']+)'>", ln)) and m.group(1) != "NoneType" and expected is None:
            expected = m.group(1)
        elif (m := re.search(r"(?:Expected a|Expected an) ([^.<]+?)\.? Got value", ln)) and expected is None:
            expected = m.group(1)
        if m := re.search(r"(?:Got value|Given value): (.*)", ln):
            got = got or m.group(1)
        if m := re.search(r"Import path (\S+) does not correspond to a subclass of (\S+)", ln):
            return f"{'.'.join(key_parts) or 'class_path'}: '{m.group(1)}' is not a subclass of {m.group(2)}"
    key = re.sub(r"(^|\.)init_args\.init_args", r"\1init_args", ".".join(key_parts))
    if unknown is not None:
        key = f"{key}.{unknown}" if key and not unknown.startswith(key) else unknown
        what = "unknown key"
    elif expected is not None:
        key = key[: -len(".init_args")] if key.endswith(".init_args") else key
        what = f"expected {expected}" + (f", got {got!r}" if got is not None else "")
    else:
        return lines[-1] if len(lines) == 1 else " ".join(lines[:3])
    where = key_source(argv, key, cwd)
    return f"{where}: {key}: {what}"
