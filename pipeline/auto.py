"""A saved linearized model loads through transformers' Auto classes: `import pipeline` registers them.

As flash-linear-attention does for its models, importing the package registers `LolcatsConfig` with
`AutoConfig` and `LolcatsForCausalLM` with `AutoModelForCausalLM`, so no `trust_remote_code` is needed:

    import pipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("models/lolcats/student")   # from any folder
    tokenizer = AutoTokenizer.from_pretrained("models/lolcats/student")

A saved folder (`pipeline.hybrid.save_linearized`, `pipeline.student.save_student`) holds `config.json`
with model_type `lolcats` (the teacher by a stable id, the hybrid attention's config), the new weights,
the teacher's tokenizer and, for a student, its LoRA adapter in `adapter/`. The teacher's weights are
not copied: they come from the id (`pipeline.teacher.teacher_reference`). Without the import
transformers does not know model_type `lolcats` and refuses the folder: it never loads the teacher alone.

What comes back is the teacher's own model class with the hybrid attention swapped in and the LoRA
merged into its weights (`merge_lora=False`: the peft model, to train further); `generate()` uses the
constant-memory `HybridCache` unless given another cache.
"""
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from .hybrid.convert import MODEL_TYPE

# `from_pretrained` keywords that only say where or how to download: a local folder needs none of them
HUB_KWARGS = {"cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder",
              "code_revision", "trust_remote_code", "adapter_kwargs", "_from_auto", "_commit_hash"}


class LolcatsConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    teacher_source: str | None = None  # an embedded name, a hub id, or an absolute folder
    teacher_sha256: str | None = None  # of a folder teacher's config and weights (`teacher_reference`)
    attention: dict | None = None  # the HybridConfig the model was linearized with


class LolcatsForCausalLM:
    """The loader `AutoModelForCausalLM` dispatches model_type `lolcats` to; it builds no model of its own."""

    config_class = LolcatsConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args, config: LolcatsConfig | None = None,
                        dtype=None, torch_dtype=None, device_map=None, merge_lora: bool = True,
                        teacher: str | None = None, **kwargs):
        """The saved model in `pretrained_model_name_or_path` (a folder, or a hub repo holding one).

        `dtype` is the teacher's (default fp32; the new weights stay fp32); `device_map` one device (a str,
        torch.device or int); `teacher` a source to use instead of the recorded one."""
        if model_args:
            raise TypeError(f"LolcatsForCausalLM.from_pretrained takes no positional model args; got {model_args}")
        unknown = sorted(k for k, v in kwargs.items() if k not in HUB_KWARGS and v is not None)
        if unknown:
            raise TypeError(f"LolcatsForCausalLM.from_pretrained does not take {unknown}")
        if kwargs.get("subfolder"):
            raise ValueError("LolcatsForCausalLM.from_pretrained: subfolder is not supported; name the folder itself")
        folder = _local_folder(pretrained_model_name_or_path, kwargs)
        device = _one_device(device_map)
        dtype = dtype if dtype is not None else torch_dtype
        # imported here, not by every `import pipeline` (the kernels and GPU benchmarks run it on a bare image)
        from peft import PeftModel

        from .student import load_saved
        model, _ = load_saved(folder, teacher, dtype, device)
        if not isinstance(model, PeftModel) or not merge_lora:
            return model
        merged = model.merge_and_unload()
        merged.lolcats_lora_merged = True  # save_linearized refuses it: the folder would lose the LoRA
        return merged

    @classmethod
    def from_config(cls, config, **kwargs):
        raise TypeError("a lolcats model is a teacher with new attention weights: build it with "
                        "pipeline.hybrid.linearize(teacher, HybridConfig(...)), or load a saved one with from_pretrained")


def _local_folder(name: str | Path, hub_kwargs: dict) -> Path:
    """A local folder as it is; a hub repo id downloaded whole (its teacher is named inside it)."""
    if Path(name).is_dir():
        return Path(name)
    import huggingface_hub

    keep = {"cache_dir", "force_download", "proxies", "token", "revision", "local_files_only"}
    return Path(huggingface_hub.snapshot_download(str(name), **{k: v for k, v in hub_kwargs.items()
                                                                 if k in keep and v is not None}))


def _one_device(device_map):
    """The single device a `device_map` names; dispatching layers across devices is not supported."""
    if isinstance(device_map, dict) and set(device_map) == {""}:  # the whole model on one device (HFLM's way)
        device_map = device_map[""]
    if device_map is None or isinstance(device_map, int):
        return "cpu" if device_map is None else f"cuda:{device_map}"
    if isinstance(device_map, dict) or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"LolcatsForCausalLM.from_pretrained: device_map={device_map!r} would split the model; "
                         "pass one device ('cuda', 'cuda:1', 'cpu')")
    return device_map


AutoConfig.register(MODEL_TYPE, LolcatsConfig, exist_ok=True)
AutoModelForCausalLM.register(LolcatsConfig, LolcatsForCausalLM, exist_ok=True)
