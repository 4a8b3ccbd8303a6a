"""Lets the stock `lm_eval` command find `--model lolcats` (../shared/design/lolcats.md §5).

lm-eval 0.4 discovers no plugins, so `make setup` writes `lolcats_lm_eval.pth` into the venv's
site-packages with a line that runs this file by its path, at every interpreter start. By path, not
as `pipeline.evaluation...`: importing the package there would bind `pipeline` to the checkout the
venv was built in, and a venv copied into another checkout would then run the other code even for
`python -m stages...`. That must stay cheap, so only lm_eval's registry is imported (measured:
`python -c pass` in the venv 28 ms without the file, 73 ms with it): the name is
registered as a lazy placeholder, and `lm_model` (torch, transformers, peft) is imported only
when lm-eval asks for the model. `lm_eval.models` is imported first because `get_model` fills
an EMPTY registry with the stock models; a registry holding only `lolcats` would hide `hf`.
"""
try:
    import lm_eval.models  # noqa: F401  (registers the stock models, lazily)
    from lm_eval.api.registry import model_registry
except ImportError:  # lm-eval not installed: nothing to register
    model_registry = None

if model_registry is not None and "lolcats" not in model_registry:
    model_registry.register("lolcats", target="pipeline.evaluation.lm_model:LolcatsLM")
