"""The report's headline: gap closure where teacher and baseline differ, and why not where they do not."""
from pipeline.comparison import Score, gap_closure
from pipeline.report import PipelineResults, _protocol, headline, undetermined_gaps
from tests.helpers import scored


def results(lm_eval: dict[str, dict[str, float]]) -> PipelineResults:
    return PipelineResults(prepare={"train_tokens": 2048, "train_chunks": 2},
                           cache={"teacher_val_ppl": 9.0, "wall_time_s": 1.0}, transfer={}, lora={}, lm_eval=lm_eval,
                           window_size=64)


def test_gap_and_its_stderr_are_always_there_and_closure_only_where_determined():
    # MMLU: teacher 0.250 vs baseline 0.245, within their stderr; every other task 0.60 vs 0.40
    metrics = headline(results({"teacher": scored(0.60, mmlu=0.250), "no_transfer": scored(0.40, mmlu=0.245),
                                "lolcats": scored(0.55, mmlu=0.249)}))
    assert metrics["gap_mmlu"] == 0.250 - 0.245
    assert metrics["gap_mmlu_stderr"] > metrics["gap_mmlu"]
    assert "lolcats_mmlu_gap_closure" not in metrics
    assert abs(metrics["lolcats_piqa_gap_closure"] - 0.75) < 1e-12
    assert undetermined_gaps(metrics) == ["mmlu"]


def test_without_the_baseline_there_is_no_gap_to_report():
    metrics = headline(results({"teacher": scored(0.6), "lolcats": scored(0.5)}))
    assert not [k for k in metrics if k.startswith("gap_") or k.endswith("_gap_closure")]
    assert undetermined_gaps(metrics) == []


def test_gap_closure_is_the_fraction_of_the_gap_closed():
    assert abs(gap_closure(Score(0.5, 0.0), Score(0.4, 0.0), Score(0.6, 0.0)) - 0.5) < 1e-12
    assert gap_closure(Score(0.5, 0.1), Score(0.4, 0.1), Score(0.45, 0.1)) is None


def test_a_gap_under_two_stderrs_leaves_gap_closure_undetermined():
    # gap 0.02 against a combined stderr of 0.01 * sqrt(2) = 0.0141: 1.4 stderrs, too close to zero
    metrics = headline(results({"teacher": scored(0.60, arc_easy=0.52), "no_transfer": scored(0.40, arc_easy=0.50),
                                "lolcats": scored(0.55, arc_easy=0.51)}))
    assert "lolcats_arc_easy_gap_closure" not in metrics and "arc_easy" in undetermined_gaps(metrics)
    assert abs(gap_closure(Score(0.51, 0.0), Score(0.50, 0.005), Score(0.52, 0.005)) - 0.5) < 1e-12  # 2.8 stderrs


def test_transfer_tokens_are_what_attention_transfer_counted_per_block():
    """Per block: attention-transfer's `tokens` (every block) over the cache's blocks; a variant on joined
    sequences (transfer_seq_len 256 over 128-token chunks) reads 3 sequences as 768 tokens, not 3 chunks."""
    lm_eval = {"teacher": scored(0.6), "lolcats": scored(0.5)}
    per_layer = PipelineResults(prepare={"train_tokens": 768, "train_chunks": 6}, cache={"blocks": 5},
                                transfer={"lolcats": {"tokens": 5 * 768.0}}, lora={}, lm_eval=lm_eval, window_size=64)
    joined = PipelineResults(prepare={"train_tokens": 768, "train_chunks": 6}, cache={"blocks": 1},
                             transfer={"lolcats_long": {"tokens": 768.0, "train_chunks_per_block": 3}}, lora={},
                             lm_eval=lm_eval, window_size=64)
    assert per_layer.transfer_tokens("lolcats") == joined.transfer_tokens("lolcats_long") == 768
    assert isinstance(joined.transfer_tokens("lolcats_long"), int)


def test_the_protocol_line_names_the_subsets_and_the_whole_tasks():
    assert _protocol({"piqa": None, "mmlu": None}).startswith("the paper's full")
    line = _protocol({"piqa": None, "arc_easy": None, "hellaswag": 2000, "mmlu": 40})
    assert "hellaswag 2000, mmlu 40 per subject" in line and "every document of piqa, arc_easy" in line
    assert "None" not in line
