"""DVC stage `prepare-probes`: passkey prompts and per-position loss documents for the lm-eval stages.

Cut from WikiText-2 test articles with the teacher's tokenizer (`pipeline.probes`); the lm-eval tasks
`lolcats_passkey` and `lolcats_position_loss` (tasks/) read them from OUT_DIR. Which of them lie beyond
the hybrid's window is the report's reading, so a window ablation reruns neither this nor the teacher.
Usage: python -m stages.prepare_probes OUT_DIR METRICS_JSON
"""
import argparse
import statistics

from pipeline import tracking
from pipeline.config import ProbesConfig, TeacherConfig, TrackingConfig
from pipeline.io import atomic_dir
from pipeline.probes import PASSKEY_FILE, POSITION_LOSS_FILE, passkey_docs, position_docs, wikitext_articles, \
    write_jsonl
from pipeline.stage import load_blocks, run_stage
from pipeline.teacher import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="folder for passkey.jsonl and position_loss.jsonl")
    parser.add_argument("metrics", help="DVC metrics JSON")
    args = parser.parse_args()
    teacher, cfg, track = load_blocks(TeacherConfig, ProbesConfig, TrackingConfig)
    articles = wikitext_articles(cfg.source)  # a missing file fails here, before the tokenizer loads
    tokenizer = load_tokenizer(teacher.source)

    with tracking.stage_run("prepare-probes", [teacher, cfg], track) as run:
        passkeys = passkey_docs(tokenizer, articles, cfg)
        positions = position_docs(tokenizer, articles, cfg)
        with atomic_dir(args.out) as out:
            write_jsonl(out / PASSKEY_FILE, passkeys)
            write_jsonl(out / POSITION_LOSS_FILE, positions)
        run.log_metrics({
            "passkey_docs": float(len(passkeys)),
            "passkey_mean_context_tokens": statistics.fmean(d["context_tokens"] for d in passkeys),
            "position_loss_docs": float(len(positions)),
            "position_loss_tokens": float(sum(d["tokens"] for d in positions)),
        }, args.metrics)


if __name__ == "__main__":
    run_stage(main)
