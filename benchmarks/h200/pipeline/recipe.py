"""Write params.yaml as the README's GPU command would leave it: its `-S key=value` overrides, then CUTS.

`dvc exp run -S` needs a git repository, which the device copy is not; applying the same overrides to
params.yaml and running `dvc repro` gives the same stages and params. Usage:
python benchmarks/h200/pipeline/recipe.py README.md params.yaml [key=value ...]
"""
import re
import shlex
import sys
from pathlib import Path

import yaml


def readme_overrides(readme: str) -> list[str]:
    """The -S values of the README's `dvc exp run -n smollm2-paper ...` command, in order."""
    command = re.search(r"dvc exp run -n smollm2-paper(?:[^\n]*\\\n)*[^\n]*", readme).group(0).replace("\\\n", " ")
    words = shlex.split(command)
    return [words[i + 1] for i, word in enumerate(words) if word == "-S"]


def apply(params: dict, override: str) -> None:
    """Set `a.b.c=value` (value read as YAML, as DVC reads it): the key must exist already, or, as in
    DVC's (Hydra's) `+a.b.c=value`, must not."""
    key, value = override.split("=", 1)
    append = key.startswith("+")
    *path, leaf = key.removeprefix("+").split(".")
    node = params
    for part in path:
        node = node[part]
    if append == (leaf in node):
        raise KeyError(f"{key}: {'already' if append else 'not'} a key of params.yaml")
    node[leaf] = yaml.safe_load(value)


def main() -> None:
    readme, params_file, *cuts = sys.argv[1:]
    params = yaml.safe_load(Path(params_file).read_text())
    for override in readme_overrides(Path(readme).read_text()) + cuts:
        apply(params, override)
    Path(params_file).write_text(yaml.safe_dump(params, sort_keys=False))
    print("params.yaml: README recipe +", cuts or "no cuts")


if __name__ == "__main__":
    main()
