"""Evaluation (../shared/design/lolcats.md §5): lm-eval benchmarks and perplexities of one model.

Modules, leaf first: `suite` (the six benchmarks, which task answers each, their averages; not the
GPU timings of the top-level `benchmarks/`), `lm_model` (the `lolcats` lm-eval model),
`lm_eval_plugin` (registers it at interpreter start), `heldout_perplexity` (WikiText-2 and Alpaca
validation perplexities; the response-token loss under them is `pipeline.perplexity`), `probes` (the
long-context probes), `harness` (all of them for one model, the six benchmarks through
`lm_eval.simple_evaluate`). This file
imports none of them: a `.pth` file imports `lm_eval_plugin` in every interpreter of the venv,
which must stay cheap (no torch, no transformers).
"""
