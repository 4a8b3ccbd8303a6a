"""DVC stage `check-params`: every block of params.yaml checked once, before any stage does work.

DVC removes a stage's outputs before running its command, and each stage checks only the blocks it
reads, so a bad `lm-eval` value used to surface only after the training upstream had rerun, and an
lm-eval stage's metrics were gone by then. Every other stage depends on this stage's output, the names
of the blocks checked: it stays byte-identical while params are valid, so a valid change still reruns
only the stages it affects, and an invalid one stops here, with one line naming the dotted key.
It also writes, per model that builds a hybrid, the attention config that model reads
(`scoped_attention`): those stages depend on their file, not on the whole `attention` block.
Usage: python -m stages.check_params OUT_JSON ATTENTION_DIR
"""
import argparse

from pipeline.config import check_params, scoped_attention
from pipeline.io import atomic_dir, atomic_write_json
from pipeline.params import read_params
from pipeline.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="JSON naming the blocks checked (the other stages' dependency)")
    parser.add_argument("attention", help="folder of <model>.json: the attention config each model builds")
    args = parser.parse_args()
    params = read_params()
    blocks = check_params(params)
    with atomic_dir(args.attention) as folder:
        for name, attention in scoped_attention(params).items():
            atomic_write_json(folder / f"{name}.json", attention.to_dict())
    atomic_write_json(args.out, {"blocks": blocks})


if __name__ == "__main__":
    run_stage(main)
