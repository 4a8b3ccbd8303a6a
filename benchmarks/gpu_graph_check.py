"""Graph-replayed decoding (`HybridCache(cuda_graph=True)`) against eager decoding, token for token.

Usage (repo root): python -m benchmarks.gpu_graph_check [--model ../shared/models/stories260K] [--out DIR] [--smoke]
On a real-weight model (stories260K, bf16 on the GPU, linearized with sharp random feature maps so the
linear branch matters, both window kinds), each case generates with `HybridCache()` and with
`HybridCache(cuda_graph=True)` and compares the tokens:
  greedy       batch 1 and batch 4, 48 new tokens (past the window of 8: keys leave the ring into S);
  left-padded  batch 2, rows of 21 and 9 tokens;
  sampling     seeded top-k sampling, the same seed for both;
  continued    a returned cache given a second turn (its prefill of several tokens runs eagerly);
  beam search  3 beams: reorder_cache reallocates the state, so the graph is captured again.
Each case also gives the graph run's captures and replays (a case with no replay would compare
eager with eager; beam search captures more than once). Writes <out>/gpu_graph_check.json.
"""
import argparse
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from pipeline.hybrid import HybridCache, HybridConfig, linearize

from .gpu_common import environment, results_dir, write_result

WINDOW = 8


def swapped(path: str, window: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    linearize(model, HybridConfig(window_size=WINDOW, window=window, feature_init="kaiming", init_gamma=0.5))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 3:
                p.mul_(4.0)
    return model


def cases(model, device: torch.device) -> dict[str, dict[str, Any]]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    one, four = torch.randint(3, 512, (1, 13), generator=gen), torch.randint(3, 512, (4, 13), generator=gen)
    long, short = torch.randint(3, 512, (1, 21), generator=gen), torch.randint(3, 512, (1, 9), generator=gen)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 12, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(padded)
    mask[1, :12] = 0
    runs = {
        "greedy_batch_1": (one, dict(max_new_tokens=48, do_sample=False)),
        "greedy_batch_4": (four, dict(max_new_tokens=48, do_sample=False)),
        "left_padded_batch_2": (padded, dict(attention_mask=mask.to(device), max_new_tokens=32, do_sample=False,
                                             pad_token_id=0)),
        "sampling_top_k": (four, dict(max_new_tokens=32, do_sample=True, top_k=20, temperature=1.0)),
        "beam_search_3": (one, dict(max_new_tokens=16, num_beams=3, do_sample=False)),
    }
    results = {}
    for name, (ids, kwargs) in runs.items():
        outputs = []
        for graph in (False, True):
            torch.manual_seed(1)
            cache = HybridCache(cuda_graph=graph)
            outputs.append(model.generate(ids.to(device), past_key_values=cache, **kwargs))
        results[name] = {"equal": torch.equal(*outputs), "tokens": outputs[1].shape[1] - ids.shape[1],
                         "warm_ups": cache.graphs.warm_ups, "captures": cache.graphs.captures,
                         "replays": cache.graphs.replays,
                         "failure": cache.graphs.failure}
    # a returned cache continues: the second turn's several tokens prefill eagerly, then steps replay
    turns = []
    for graph in (False, True):
        out = model.generate(one.to(device), max_new_tokens=12, do_sample=False, past_key_values=HybridCache(graph),
                             return_dict_in_generate=True)
        turn = torch.cat([out.sequences, torch.randint(3, 512, (1, 5), generator=gen.manual_seed(2)).to(device)], 1)
        turns.append(model.generate(turn, max_new_tokens=12, do_sample=False, past_key_values=out.past_key_values))
    graphs = out.past_key_values.graphs
    results["continued_cache"] = {"equal": torch.equal(*turns), "tokens": 24, "captures": graphs.captures,
                                  "replays": graphs.replays, "failure": graphs.failure}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="../shared/models/stories260K", help="a local Llama folder")
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true",
                        help="fp32 on the CPU, where the graph path is off (eager against eager: the script's logic only)")
    args = parser.parse_args()
    device, dtype = (torch.device("cpu"), torch.float32) if args.smoke else (torch.device("cuda"), torch.bfloat16)
    result: dict[str, Any] = {"environment": environment(device), "model": args.model, "dtype": str(dtype),
                              "window_size": WINDOW, "windows": {}}
    for window in ("sliding", "terrace"):
        result["windows"][window] = cases(swapped(args.model, window, device, dtype), device)
        print(window, result["windows"][window], flush=True)
    result["all_equal"] = all(case["equal"] for w in result["windows"].values() for case in w.values())
    # equal tokens prove nothing where no graph replayed (a failed capture decodes eagerly)
    result["all_replayed"] = all(case["replays"] > 0 for w in result["windows"].values() for case in w.values())
    print("wrote", write_result(results_dir(args.out, device), "gpu_graph_check", result))


if __name__ == "__main__":
    main()
