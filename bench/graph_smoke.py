"""Quick GPU check: decode step time of a Kotodama-108M-shaped random model, CUDA graph vs eager."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from harness import Harness  # noqa: E402
from hybridserve.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from hybridserve.engine.model_runner import SeqChunk, build_meta  # noqa: E402
from hybridserve.models.llama import LlamaConfig, LlamaModel  # noqa: E402
from test_llama_engine import tiny_weights  # noqa: E402

c = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1408, num_layers=28, num_heads=4, num_kv_heads=2,
                head_dim=128, rope_theta=5e5, max_position_embeddings=4096, qk_norm=True, attn_res=True,
                attn_res_boundaries=[0, 3, 7, 12, 21, 25])
model = LlamaModel(c, tiny_weights(c), torch.bfloat16, "cuda")
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
for B in (1, 8, 32):
    h = Harness(model, page_size=16, num_pages=4096, num_slots=1)
    seqs = [h.new_seq() for _ in range(B)]
    h.step([(s, list(range(1, 513))) for s in seqs])
    graphs = DecodeGraphs(model, h.pools.view, max_bs=32, max_blocks=256)
    graphs.capture()
    for s in seqs:
        s.tokens.append(7)
        need = h.pools.pages.pages_for(len(s.tokens)) - len(s.pages)
        if need > 0:
            s.pages.extend(h.pools.pages.allocate(need))
    meta = build_meta([SeqChunk([7], len(s.tokens) - 1, s.pages, s.slot, True) for s in seqs], 16, model.device)
    for name, fn in (("eager", lambda: model.forward(meta, h.pools.view)), ("graph", lambda: graphs.run(meta))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        res[f"{name}_B{B}_ms"] = 1e3 * (time.perf_counter() - t) / 50
print(json.dumps(res, indent=1))
