"""The report: teacher / students / baselines per task, gap closure, perplexities, cost, figures.

../shared/design/lolcats.md §5-§6. Reads only what earlier stages wrote (metrics JSONs, plot CSVs) and
renders one document model twice: Markdown for the repo, and a self-contained HTML page (figures
inlined as base64 PNG) for a browser or an MLflow artifact view.
"""
import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import cost, figures
from .config import TEACHER, WINDOW_ONLY
from .evaluation.suite import AVERAGES
from .comparison import GAP_Z, LINEAR_BRANCH_GAINS, PASSKEY_BIN, POSITION_BIN, TASK_METRICS, Score, beyond_window, \
    compare, determined, gaps, linear_branch_gains, probe_bins, reach

REFERENCE_MODELS = (TEACHER, WINDOW_ONLY)  # evaluated without training; the rest are variants
ROWS = list(TASK_METRICS) + list(AVERAGES)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _per_name(folder: Path) -> dict[str, dict]:
    return {p.stem: _read_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


@dataclass
class PipelineResults:
    """Everything the stages recorded, by stage and by model or variant name."""
    prepare: dict
    cache: dict
    transfer: dict[str, dict]
    lora: dict[str, dict]
    lm_eval: dict[str, dict]
    window_size: int  # attention.window_size: which probes lie beyond the window

    @classmethod
    def read(cls, metrics: Path, window_size: int) -> "PipelineResults":
        return cls(_read_json(metrics / "prepare_data.json"), _read_json(metrics / "cache_teacher_attn.json"),
                   _per_name(metrics / "attention_transfer"), _per_name(metrics / "lora_recover"),
                   _per_name(metrics / "lm_eval"), window_size)

    def ordered_models(self) -> list[str]:
        students = [m for m in self.lm_eval if m not in REFERENCE_MODELS]
        return [m for m in REFERENCE_MODELS if m in self.lm_eval] + students

    def beyond(self) -> dict[str, dict[str, Score]]:
        """Per model, its probe scores beyond the window (`comparison.beyond_window`)."""
        return {m: beyond_window(self.lm_eval[m], self.window_size) for m in self.ordered_models()}

    def transfer_tokens(self, variant: str) -> int:
        """Train tokens through each transfer block of `variant`: attention-transfer's `tokens` (through every
        block) over the cache's blocks, since every block trains on the same sequences (transfer_seq_len long
        where set, which the prepared chunks' length would miss)."""
        return int(self.transfer[variant]["tokens"]) // int(self.cache["blocks"])

    def gains(self) -> dict[str, dict[str, Score]]:
        """Per model but window_only, its linear-branch gains over window_only; {} without window_only."""
        if WINDOW_ONLY not in self.lm_eval:
            return {}
        beyond = self.beyond()
        return {m: linear_branch_gains(beyond[m], beyond[WINDOW_ONLY]) for m in beyond if m != WINDOW_ONLY}


def headline(results: PipelineResults) -> dict[str, float]:
    """Flat metrics for DVC and the MLflow parent run: scores, gap closure, perplexities, cost.

    The gap itself (teacher − no_transfer) and its stderr are always there, so a missing
    `*_gap_closure` reads as "undetermined" (|gap| within GAP_Z stderrs), never as "not computed".
    """
    scored = {m: results.lm_eval[m] for m in results.ordered_models()}
    table = compare(scored)
    out: dict[str, float] = {}
    for task, gap in gaps(scored).items():
        out |= {f"gap_{task}": gap.value, f"gap_{task}_stderr": gap.stderr}
    for model, rows in table.items():
        for task in ROWS:
            out[f"{model}_{task}"] = rows[task]["value"]
            closure = rows[task]["gap_closure"]
            if closure is not None and model not in REFERENCE_MODELS + ("no_transfer",):
                out[f"{model}_{task}_gap_closure"] = closure
        for key in ("wikitext2_ppl", "alpaca_val_ppl"):
            if key in results.lm_eval[model]:
                out[f"{model}_{key}"] = results.lm_eval[model][key]
    for model, per_gain in results.gains().items():
        for name, gain in per_gain.items():
            out |= {f"{model}_{name}": gain.value, f"{model}_{name}_stderr": gain.stderr}
    for model, scores in (results.beyond() if WINDOW_ONLY in results.lm_eval else {}).items():  # as the gains
        for key, score in scores.items():
            out |= {f"{model}_{key}": score.value, f"{model}_{key}_stderr": score.stderr}
    for variant in results.transfer:
        out[f"{variant}_transfer_tokens"] = results.transfer_tokens(variant)
    for variant, metrics in results.lora.items():
        out[f"{variant}_ppl_at_0"] = metrics["val_ppl_start"]
        out[f"{variant}_lora_tokens"] = metrics["train_tokens"]
    out["teacher_alpaca_val_ppl_cache"] = results.cache["teacher_val_ppl"]
    out["wall_time_s_total"] = (results.cache["wall_time_s"] + sum(m["wall_time_s"] for m in results.transfer.values())
                                + sum(m["wall_time_s"] for m in results.lora.values())
                                + sum(m.get("wall_time_s", 0.0) for m in results.lm_eval.values()))
    return out


# --- a tiny document model, rendered to Markdown and to HTML ---------------------------------------

Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", path, caption)


def undetermined_gaps(metrics: dict[str, float]) -> list[str]:
    """The benchmarks whose gap closure the headline `metrics` leave undetermined (gap within GAP_Z stderrs)."""
    return [task for task in ROWS if f"gap_{task}" in metrics
            and not determined(Score(metrics[f"gap_{task}"], metrics[f"gap_{task}_stderr"]))]


def undetermined_linear_branch_gains(metrics: dict[str, float]) -> list[str]:
    """`<model>_<gain>` of the headline `metrics` whose gain lies within GAP_Z stderrs of zero."""
    return [key for key in metrics if key.endswith(tuple(LINEAR_BRANCH_GAINS))
            and not determined(Score(metrics[key], metrics[f"{key}_stderr"]))]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "undetermined"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _protocol(limits: dict[str, int | None]) -> str:
    """Which tasks were scored on every document and which on a seeded subset (lm-eval.limit)."""
    subset = {task: n for task, n in limits.items() if n is not None}
    if not subset:
        return "the paper's full lm-eval protocol (limit: null on every task)."
    whole = [task for task, n in limits.items() if n is None]
    return ("a seeded subset of documents: " + ", ".join(
        f"{task} {n}" + (" per subject" if task == "mmlu" else "") for task, n in subset.items())
        + (f"; every document of {', '.join(whole)}" if whole else "")
        + ". The standard errors say what that costs; `lm-eval.limit.<task>: null` scores every document.")


def document(results: PipelineResults, figure_paths: dict[str, Path], limits: dict[str, int | None],
             gpu_steps: dict | None = None) -> list[Block]:
    models = results.ordered_models()
    table = compare({m: results.lm_eval[m] for m in models})
    doc: list[Block] = [
        ("h", 1, "LoLCATs linearization report"),
        ("p", "Protocol: " + _protocol(limits)),
        ("h", 2, "Scores (value ± stderr)"),
        ("table", ["benchmark (metric)"] + models,
         [[f"{t} ({TASK_METRICS.get(t, 'mean')})"] + [f"{table[m][t]['value']:.3f} ± {table[m][t]['stderr']:.3f}"
                                                      for m in models] for t in ROWS]),
        ("h", 2, "Gap closure vs the no-transfer baseline, and recovery"),
        ("p", "gap closure = (student − no_transfer) / (teacher − no_transfer) (§5); recovery = student / teacher. "
              f"`undetermined`: teacher and baseline differ by less than {GAP_Z:g} × their combined stderr."),
    ]
    students = [m for m in models if m not in REFERENCE_MODELS + ("no_transfer",)]
    doc.append(("table", ["benchmark"] + [f"{m} gap closure" for m in students] + [f"{m} recovery" for m in students],
                [[t] + [_fmt(table[m][t]["gap_closure"]) for m in students] + [_fmt(table[m][t]["recovery"]) for m in students]
                 for t in ROWS]))
    scored = {m: results.lm_eval[m] for m in models}
    wikitext, alpaca = (max((m.get(f"{k}_tokens", 0) for m in scored.values()), default=0)
                        for k in ("wikitext2", "alpaca_val"))
    doc += [("h", 2, "Perplexity"),
            ("p", f"lm-eval stages: WikiText-2 test ({wikitext:.0f} tokens) and Alpaca validation "
                  f"({alpaca:.0f} response tokens: the chunks that hold `lm-eval.ppl_max_tokens`)."),
            ("table", ["model", "WikiText-2 test", "Alpaca validation (lm-eval)"],
             [[m, _fmt(r.get("wikitext2_ppl"), 2), _fmt(r.get("alpaca_val_ppl"), 2)] for m, r in scored.items()]),
            ("p", f"Paper Table 1 'PPL@0': Alpaca validation perplexity after the swap, before LoRA, and after it, "
                  f"as lora-recover measures it: all {results.prepare['val_chunks']} validation chunks, so it can "
                  "differ from the lm-eval column above, which scores fewer."),
            ("table", ["variant", "PPL@0 (before LoRA)", "after LoRA"],
             [[v, _fmt(m["val_ppl_start"], 2), _fmt(m["val_ppl"], 2)] for v, m in results.lora.items()])]
    doc += probe_section(results)

    def speed(m: dict) -> list[str]:  # pipeline.throughput's figures of one stage
        memory = _fmt(m["peak_gpu_memory_gib"], 2) if "peak_gpu_memory_gib" in m else "— (CPU)"
        return [_fmt(m["tokens_per_s"], 0) if "tokens_per_s" in m else "—", memory, _fmt(m.get("wall_time_s"), 1)]

    doc += [("h", 2, "Cost"),
            ("table", ["stage", "variant", "train tokens (per block)", "updates", "trainable params", "tokens/s",
                       "peak GPU memory (GiB)", "wall time (s)"],
             [["cache-teacher-attn", "—", results.cache["cache_tokens"], "—", 0, *speed(results.cache)]]
             + [["attention-transfer", v, results.transfer_tokens(v), m["updates_per_block"], m["trainable_params"],
                 *speed(m)] for v, m in results.transfer.items()]
             + [["lora-recover", v, m["train_tokens"], m["updates"], m["trainable_params"], *speed(m)]
                for v, m in results.lora.items()]
             + [["lm-eval", m, "—", "—", "—", *speed(results.lm_eval[m])] for m in models])]
    doc += cost_at_scale(gpu_steps)
    doc.append(("h", 2, "Figures"))
    doc += [("img", path, caption) for caption, path in figure_paths.items()]
    return doc


def cost_at_scale(gpu_steps: dict | None) -> list[Block]:
    """GPU-hours and memory of Llama 3 8B / 70B / 405B at the paper's budgets (`pipeline.cost`), beside LoLCATs'."""
    doc: list[Block] = [("h", 2, "Cost at scale (projected)")]
    if gpu_steps is None:
        return doc + [("p", "No GPU step timing to project from: `python -m benchmarks.gpu_stage_steps` on a GPU "
                            "writes one (benchmarks/<gpu>/gpu_stage_steps.json).")]
    env = gpu_steps["environment"]
    doc.append(("p", f"From one attention-transfer step and one LoRA step of a Llama-3-8B-shaped model measured on "
                     f"{env.get('device')} ({env.get('memory_gib')} GiB; `{gpu_steps['command']}`, "
                     f"{gpu_steps['tokens_per_step']} tokens per step), scaled by parameters per token (time) and by "
                     f"width x depth (activations), at {cost.TOKENS_PER_STAGE / 1e6:.0f}M tokens per stage. "
                     "GPUs: how many of that GPU hold the step with FSDP-sharded weights; `—` where the "
                     "activations alone exceed one (activation checkpointing, a smaller batch or block-wise "
                     "transfer). LoLCATs' figures come from other GPUs and, at 70B and 405B, other data."))

    def gpus(value) -> str:
        return "—" if value is None else str(value)
    rows = [[r["model"], _fmt(r["params_b"], 1)]
            + [cell for stage in cost.STAGES for cell in (_fmt(r[f"{stage}_gpu_hours"], 2),
                                                          _fmt(r[f"{stage}_peak_gib"], 0), gpus(r[f"{stage}_gpus"]))]
            + [_fmt(r["gpu_hours"], 2), _fmt(r["reported_gpu_hours"], 1), r["reported"]]
            for r in cost.project(gpu_steps)]
    header = ["model", "params (B)"] + [f"{stage} {what}" for stage in cost.STAGES
                                        for what in ("GPU-h", "peak GiB", "GPUs")]
    return doc + [("table", header + ["GPU-h in all", "LoLCATs GPU-h", "LoLCATs reported"], rows)]


def probe_section(results: PipelineResults) -> list[Block]:
    """Passkey accuracy by distance, loss by position, and the linear-branch gains over window_only."""
    models = results.ordered_models()
    scored, beyond = {m: results.lm_eval[m] for m in models}, results.beyond()
    first, far = scored[models[0]], reach(results.window_size)

    def row(label: str, docs: float, scores: list[Score]) -> list[str]:
        return [label, f"{docs:.0f}"] + [f"{x.value:.3f} ± {x.stderr:.3f}" for x in scores]

    def rows(pattern: re.Pattern, beyond_key: str, label) -> list[list[str]]:
        keys = probe_bins(first, pattern)
        out = [row(label(pattern.fullmatch(k).groups()), first[f"{k}_docs"],
                   [Score(scored[m][k], scored[m][f"{k}_stderr"]) for m in models]) for k in keys]
        docs = sum(first[f"{k}_docs"] for k in keys if int(pattern.fullmatch(k)[1]) >= far)
        return out + [row(f"beyond ({far}+ back)", docs, [beyond[m][beyond_key] for m in models])]

    blocks: list[Block] = [
        ("h", 2, "Beyond the window: long-context probes"),
        ("p", "The benchmarks above fit mostly inside the softmax window, so they cannot see the linear branch. "
              "Passkey: a random number stated in WikiText-2 filler `d` tokens before the question, scored by "
              "whether the greedy continuation is the number. Position loss: loss per token of WikiText-2 test "
              f"articles by token position. `beyond`: {far} tokens back or more (2 x attention.window_size), "
              "outside the window of either kind. The document counts set the stderrs: the CPU default's are "
              "few on purpose (`prepare-probes` sizes them), so its probe figures show the mechanism only."),
        ("table", ["passkey accuracy at distance", "documents"] + models,
         rows(PASSKEY_BIN, "passkey_acc_beyond", lambda g: f"d {g[0]}")),
        ("table", ["loss per token at positions", "documents"] + models,
         rows(POSITION_BIN, "position_loss_beyond", lambda g: f"{g[0]}–{g[1]}")),
    ]
    gains = results.gains()
    if gains:
        blocks += [("p", "Linear-branch gain = model − window_only beyond the window (retrieval accuracy; for the "
                         "loss, window_only − model, so positive is better either way). `undetermined`: within "
                         f"{GAP_Z:g} stderrs of zero."),
                   ("table", ["model"] + list(LINEAR_BRANCH_GAINS),
                    [[m] + [f"{g.value:.3f} ± {g.stderr:.3f}" if determined(g) else
                            f"undetermined ({g.value:.3f} ± {g.stderr:.3f})" for g in per.values()]
                     for m, per in gains.items()])]
    return blocks


def _frame(block: Block) -> pd.DataFrame:
    return pd.DataFrame(block[2], columns=block[1]).astype(str)


def to_markdown(doc: list[Block], root: Path) -> str:
    lines = []
    for block in doc:
        if block[0] == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif block[0] == "p":
            lines += [block[1], ""]
        elif block[0] == "table":
            lines += [_frame(block).to_markdown(index=False, disable_numparse=True), ""]
        else:
            lines += [f"![{block[2]}]({block[1].relative_to(root).as_posix()})", ""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code> (the paragraphs are written for both)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def to_html(doc: list[Block]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>LoLCATs report</title><style>"
             "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style></head><body>"]
    for block in doc:
        if block[0] == "h":
            parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif block[0] == "p":
            parts.append(f"<p>{_inline_html(block[1])}</p>")
        elif block[0] == "table":
            parts.append(_frame(block).to_html(index=False, border=0))
        else:
            data = base64.b64encode(block[1].read_bytes()).decode()
            parts.append(f"<figure><img src='data:image/png;base64,{data}'><figcaption>{html.escape(block[2])}</figcaption></figure>")
    return "".join(parts) + "</body></html>\n"


def draw_figures(results: PipelineResults, plots: Path, out: Path) -> dict[str, Path]:
    """The report's PNGs from the stages' plot CSVs: {caption: path}."""
    def frames(pattern: str) -> dict[str, pd.DataFrame]:
        return {p.parent.name: pd.read_csv(p) for p in sorted(plots.glob(pattern))}
    models = results.ordered_models()
    return {
        "Per-layer validation MSE before and after attention transfer":
            figures.per_layer_mse({v: f for v, f in frames("attention_transfer/*/per_layer_mse.csv").items()
                                   if results.transfer.get(v, {}).get("updates_per_block")}, out / "per_layer_mse.png"),
        "Attention-transfer loss (1000 x MSE, mean over blocks)":
            figures.loss_curves(frames("attention_transfer/*/loss.csv"), "Attention transfer", "loss",
                                out / "transfer_loss.png"),
        "LoRA recovery loss (response tokens)":
            figures.loss_curves(frames("lora_recover/*/loss.csv"), "LoRA recovery", "next-token loss",
                                out / "lora_loss.png"),
        "Scores per task with standard errors":
            figures.task_bars(compare({m: results.lm_eval[m] for m in models}), out / "task_scores.png"),
        "Passkey retrieval accuracy against the key's distance":
            figures.probe_lines({m: _probe_points(results.lm_eval[m], PASSKEY_BIN) for m in models},
                                "distance from the key to the question (tokens)", "passkey accuracy",
                                out / "passkey_accuracy.png"),
        "Loss per token against position":
            figures.probe_lines({m: _probe_points(results.lm_eval[m], POSITION_BIN) for m in models},
                                "token position (bin middle)", "loss per token", out / "position_loss.png"),
    }


def _probe_points(metrics: dict[str, float], pattern: re.Pattern) -> list[tuple[float, float, float]]:
    """(x, value, stderr) per probe bin: the target distance, or a position bin's middle."""
    points = []
    for key in probe_bins(metrics, pattern):
        edges = list(map(int, pattern.fullmatch(key).groups()))
        points.append((sum(edges) / len(edges), metrics[key], metrics[f"{key}_stderr"]))
    return points


def write_report(metrics: Path, plots: Path, out: Path, limits: dict[str, int | None],
                 window_size: int, gpu_steps: Path | None = None) -> tuple[dict[str, float], list[Path]]:
    """reports/report.md, reports/report.html and reports/figures/*.png; returns (headline metrics, files).
    `gpu_steps`: a benchmarks.gpu_stage_steps result the cost-at-scale table projects from."""
    from .io import atomic_write

    results = PipelineResults.read(metrics, window_size)
    figure_paths = draw_figures(results, plots, out / "figures")
    doc = document(results, figure_paths, limits, cost.read_steps(gpu_steps) if gpu_steps else None)
    markdown, page = out / "report.md", out / "report.html"
    atomic_write(markdown, lambda tmp: Path(tmp).write_text(to_markdown(doc, out)))
    atomic_write(page, lambda tmp: Path(tmp).write_text(to_html(doc)))
    return headline(results), [markdown, page, *figure_paths.values()]
