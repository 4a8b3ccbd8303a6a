"""Reading params.yaml into typed dataclasses, failing before any work with the dotted key at fault.

Every params block is a dataclass deriving from `ParamsBlock` with a `BLOCK` name equal to its
key in params.yaml (and to the DVC stage that owns it). `build_block` rejects unknown keys and
values of the wrong type; each block's `__post_init__` checks ranges and choices through
`require`. All errors are `ConfigError` whose text starts with the dotted key.

params.yaml is read as DVC reads it, YAML 1.2 through ruamel.yaml's safe loader, so a value means
the same to a stage as to `dvc params diff` and `dvc exp run -S` (`1e-3` is a number in YAML 1.2,
a string to PyYAML's YAML 1.1 resolver).
"""
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from ruamel.yaml import YAML, YAMLError

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A params value that cannot be used; the message starts with its dotted key."""


@dataclasses.dataclass
class ParamsBlock:
    BLOCK: ClassVar[str]

    def require(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{self.BLOCK}.{name}: {message}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


B = TypeVar("B", bound=ParamsBlock)


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    try:
        with open(path) as f:
            params = YAML(typ="safe").load(f) or {}
    except YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of params blocks")
    return params


def build_block(cls: type[B], params: dict[str, Any]) -> B:
    """The `cls.BLOCK` block of `params` as a checked dataclass (missing keys take defaults)."""
    return _build(cls, params.get(cls.BLOCK), cls.BLOCK)


def build_entry(cls: type[B], params: dict[str, Any], name: str) -> B:
    """Entry `name` of a block that maps names to `cls` items (e.g. `variants.lolcats`)."""
    entries = params.get(cls.BLOCK) or {}
    if name not in entries:
        raise ConfigError(f"{cls.BLOCK}.{name}: no such entry; defined are {sorted(entries)}")
    item = _build(cls, entries[name], f"{cls.BLOCK}.{name}")
    item.BLOCK = f"{cls.BLOCK}.{name}"  # so its own checks name the entry
    return item


def _build(cls, raw: Any, key: str):
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(raw[name], hints[name], f"{key}.{name}") for name in fields if name in raw}
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(options) == 1 else
                          f"{key}: expected one of {[_name(o) for o in options]}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(x, args[0], f"{key}[{i}]") for i, x in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{key}: expected {_name(hint)}, got {value!r}")
    return value


def _name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint)))
