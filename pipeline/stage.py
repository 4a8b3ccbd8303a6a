"""What every `stages/<name>.py` shares: reading its params blocks and running its `main()`.

`run_stage` sets up logging and turns a `ConfigError` (a bad params value, raised before any model or
data loads) or a `DataFileError` (an input file that is missing, empty or corrupt) into one line
`error: <dotted key or file>: ...` on stderr and exit code 2, without a traceback.
"""
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io import DataFileError
from .params import PARAMS_FILE, ConfigError, ParamsBlock, build_block, build_entry, read_params

EXIT_CONFIG = 2  # the usual exit code of a command-line usage error


def load_blocks(*classes: type[ParamsBlock], path: str | Path = PARAMS_FILE) -> tuple[Any, ...]:
    """The checked dataclass of each named block of params.yaml, in the order asked."""
    params = read_params(path)
    return tuple(build_block(cls, params) for cls in classes)


def load_entry(cls: type[ParamsBlock], name: str, path: str | Path = PARAMS_FILE) -> Any:
    """Entry `name` of a block of named entries (e.g. `variants.lolcats`), checked."""
    return build_entry(cls, read_params(path), name)


def run_stage(main: Callable[[], None]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ConfigError, DataFileError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(EXIT_CONFIG)
