"""DVC stage `resolve-source`: what `prepare-data.source` names, pinned in data/source.json.

A local file by its sha256, a hub dataset by its current revision (pipeline/source.py). dvc.yaml runs
it every time (`always_changed`); prepare-data depends on its output, which stays byte-identical
while the data is, so an unchanged source reruns nothing and a changed one reruns prepare-data.
Usage: python -m stages.resolve_source OUT_JSON
"""
import argparse

from pipeline.config import PrepareDataConfig
from pipeline.io import atomic_write_json
from pipeline.source import source_identity
from pipeline.stage import load_blocks, run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="JSON pinning the source (prepare-data's dependency)")
    args = parser.parse_args()
    (cfg,) = load_blocks(PrepareDataConfig)
    atomic_write_json(args.out, source_identity(cfg.source))


if __name__ == "__main__":
    run_stage(main)
