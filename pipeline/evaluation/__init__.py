"""Evaluation (../shared/design/lolcats.md §5): lm-eval benchmarks and perplexities of one model.

Modules, leaf first: `benchmarks` (which task answers each benchmark), `lm_model` (the `lolcats`
lm-eval model), `lm_eval_plugin` (registers it at interpreter start), `harness` (the six
benchmarks through `lm_eval.simple_evaluate`), `perplexity` (WikiText-2 and Alpaca). This file
imports none of them: a `.pth` file imports `lm_eval_plugin` in every interpreter of the venv,
which must stay cheap (no torch, no transformers).
"""
