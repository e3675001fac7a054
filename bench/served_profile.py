"""Where a served engine's processes spend their CPU time: a real `hybridserve serve` (synthetic full-size checkpoint,
engine process, async scheduling, `--api-server-count N`) under C streams at once, with py-spy sampling the engine
process and API process 0 over measured rounds (serve_latency.py's rounds, clients spread over client processes).

py-spy samples each thread's Python stack while it runs (idle threads are left out), so the counts are CPU time.
Printed and saved per process: the total, the functions with the most samples anywhere on the stack (inclusive)
and as the innermost frame (own). Raw stacks go to $OUT too.

Usage (GPU machine; py-spy from a wheel): python bench/served_profile.py --tokenizer DIR [--arch neollm]
[--concurrency 128] [--api-servers 2] [--rounds 4] [--max-tokens 380] [--py-spy PATH]
→ $OUT/served_profile.json, $OUT/served_profile_<process>.txt
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import SAMPLING, client_pool, run_round  # noqa: E402
from server_process import named_children, running_server  # noqa: E402  (serve_latency puts tests/ on the path)
from hybridserve.weights.synth import write_synthetic  # noqa: E402


def summarize(raw: str, top: int) -> dict:
    """py-spy's raw output (a stack per line, frames 'function (file:line)' joined by ';', then the count)."""
    inclusive, own, total = Counter(), Counter(), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    share = (lambda c: [[f, round(n / total, 4)] for f, n in c.most_common(top)]) if total else (lambda c: [])
    return {"samples": total, "inclusive": share(inclusive), "own": share(own)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--arch", default="neollm")
    ap.add_argument("--size", default="full")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--api-servers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=380)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples a second")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": device, "torch": torch.__version__, **vars(args), "rows": [], "processes": {}}
    pool = client_pool(args.client_procs)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic(args.arch, args.size, Path(tmp) / args.arch, seed=0, tokenizer_from=Path(args.tokenizer))
        with running_server("--model", str(path), "--max-num-seqs", str(args.concurrency), "--max-model-len",
                            str(args.max_model_len), "--log-level", "warning", "--async-scheduling", "--engine-process",
                            "--api-server-count", str(args.api_servers), timeout=600) as (url, server):
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            pids = {name[3:]: pid for name, pid in named_children(server.pid).items()}
            if args.api_servers == 1:
                pids["api-0"] = server.pid
            run_round(url, model, args.concurrency, args.prompt_len, 16, SAMPLING["greedy"], 1, "raw", warmup=True,
                      pool=pool)
            spies = {}
            for name in ("engine", "api-0"):
                raw = out_dir / f"served_profile_{name}.txt"
                spies[name] = (raw, subprocess.Popen(
                    [args.py_spy, "record", "-p", str(pids[name]), "-r", str(args.rate), "-f", "raw", "-o", str(raw),
                     "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            time.sleep(1.0)   # attached
            t0 = time.perf_counter()
            for rnd in range(args.rounds):
                row = run_round(url, model, args.concurrency, args.prompt_len, args.max_tokens, SAMPLING["greedy"],
                                2 + rnd, "raw", pool=pool, server_pid=server.pid)
                result["rows"].append(row)
                print(f"round {rnd}: TPOT {row['tpot_ms_median']:.3f} ms, {row['output_tok_per_s']:.0f} tok/s, "
                      f"CPU " + " ".join(f"{k[4:]} {v:.2f}" for k, v in row.items() if k.startswith("cpu_")),
                      flush=True)
            result["profiled_s"] = time.perf_counter() - t0
            for name, (raw, spy) in spies.items():
                spy.send_signal(signal.SIGINT)
                try:
                    _, err = spy.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    _, err = spy.communicate()
                summary = summarize(raw.read_text() if raw.exists() else "", args.top)
                summary["py_spy_stderr"] = err.decode()[-2000:]
                summary["cores"] = summary["samples"] / args.rate / result["profiled_s"]
                result["processes"][name] = summary
                print(f"\n== {name}: {summary['samples']} samples, {summary['cores']:.2f} cores while profiled")
                for kind in ("inclusive", "own"):
                    print(f"-- {kind}")
                    for frame, share in summary[kind][:args.top]:
                        print(f"{100 * share:6.1f} %  {frame}")
                if not summary["samples"]:
                    print(summary["py_spy_stderr"])
    (out_dir / "served_profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
