"""Decode speed of the embedded default (SmolLM2-135M) on this CPU, against transformers in the same run.

Ours: the engine (scheduler + paged KV + sampler + detokenizer) greedy-decoding N tokens at batch 1 and 8.
Baseline: transformers' LlamaForCausalLM holding the same dequantized weights, `generate` with its KV cache.
Decode rate excludes prefill on both sides. Prints a table and writes bench/results/cpu_decode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.config import EngineConfig
from hybridserve.engine.request import SamplingParams
from hybridserve.weights.loader import load_checkpoint

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def ours(dtype: str, batch: int, new_tokens: int) -> dict:
    eng, _ = build_llm_engine(EngineConfig(model="embedded", dtype=dtype, device="cpu"))
    ids = eng.tokenizer.apply_chat_template(PROMPT)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for b in range(batch):
        eng.add_request(f"r{b}", ids, params)
    eng.step()  # prefill of every request (one step: the prompt fits the token budget)
    steps, t0 = 0, time.perf_counter()
    while eng.has_work():
        eng.step()
        steps += 1
    dt = time.perf_counter() - t0
    return {"impl": "hybridserve", "dtype": dtype, "batch": batch, "decode_steps": steps,
            "ms_per_step": 1e3 * dt / steps, "tok_per_s": batch * steps / dt}


def baseline(dtype: str, new_tokens: int) -> dict:
    """transformers' LlamaForCausalLM holding the same dequantized GGUF weights, greedy `generate`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ckpt = load_checkpoint("embedded", progress=False)
    c = ckpt.config
    cfg = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                      intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                      num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
                      max_position_embeddings=c["max_position_embeddings"], rope_theta=c["rope_theta"],
                      rms_norm_eps=c["rms_norm_eps"], tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(ckpt.tensors, strict=False)
    model.tie_weights()
    model = model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]).eval()
    ids = torch.tensor([ckpt.tokenizer.apply_chat_template(PROMPT)])

    def gen(n):
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    gen(2)
    dt = gen(new_tokens) - gen(1)
    return {"impl": "transformers.generate", "dtype": dtype, "batch": 1, "decode_steps": new_tokens - 1,
            "ms_per_step": 1e3 * dt / (new_tokens - 1), "tok_per_s": (new_tokens - 1) / dt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_decode.json"))
    args = ap.parse_args()
    rows = []
    for dtype in ("float32", "bfloat16"):
        base = baseline(dtype, args.tokens)
        rows.append(base)
        for batch in (1, 8):
            r = ours(dtype, batch, args.tokens)
            r["speedup_vs_baseline_batch1"] = r["tok_per_s"] / base["tok_per_s"]
            rows.append(r)
    result = {"bench": "cpu_decode", "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized)",
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "new_tokens": args.tokens, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'impl':24} {'dtype':9} {'batch':>5} {'ms/step':>9} {'tok/s':>8} {'x base':>7}")
    for r in rows:
        print(f"{r['impl']:24} {r['dtype']:9} {r['batch']:>5} {r['ms_per_step']:>9.1f} {r['tok_per_s']:>8.1f} "
              f"{r.get('speedup_vs_baseline_batch1', 1.0):>7.2f}")


if __name__ == "__main__":
    main()
