"""GPU time of the sampler's parts (engine/sampler.py) per batch size and vocabulary, from torch.profiler:
which op a sampled decode step spends its sampling time on (temperature, min_p / top_k / top_p truncation,
softmax, the draw) in the eager sampler, and in the form the sampler graphs take (`truncation_floor` and the
split-row race / argmax of kernels/sampling_triton.py), against the time of reading the logits once.

Usage (GPU machine): python bench/sampler_cost.py [--vocabs 49152,128256] [--batches 1,32] [--spreads 4]
[--graph-form-only] [--search-sweep] [--against OTHER/kernels/sampling_triton.py] [--draws-against OTHER_TREE]
[--topk-against]
→ $OUT/sampler_cost.json (or bench/results/). --against: instead, the truncation floor of this tree and of another
build's module file, in turn on the same logits, each checked against the sort. --draws-against: instead, the
sampler graphs' whole draw (engine/sampler_graphs.py `_draw`: temperature only, min_p / top_p, top_k + top_p) of
this tree and of another tree (its `_draw` and kernels/sampling_triton.py loaded from its files), in turn as CUDA
graphs, each draw's tokens checked against the sort's kept set. --topk-against: instead, the top_k cut's k-th
largest scaled logit by torch.topk against the sampler's count search (row stats and the search's passes, as
race_truncated runs them), each checked equal, beside race_truncated's whole draw with and without top_k.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gemv_chain import graph_us
from hybridserve.engine.request import SamplingParams
from hybridserve.engine.sampler import Sampler
from hybridserve.kernels import sampling, sampling_triton

CASES = {"temperature": dict(temperature=0.8), "top_p": dict(temperature=0.8, top_p=0.95),
         "top_k": dict(temperature=0.8, top_k=50), "greedy": dict(temperature=0.0)}


def _kernels(fn, reps: int, warm: int) -> list:
    """The GPU kernels of `reps` calls of fn (after `warm` calls), as the profiler's events."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def profile_ops(fn, reps: int = 20) -> tuple[float, list]:
    by = defaultdict(float)
    for e in _kernels(fn, reps, 3):
        by[e.name[:70]] += e.device_time_total / reps
    ops = sorted(by.items(), key=lambda kv: -kv[1])
    return sum(by.values()), [{"kernel": k, "us": v} for k, v in ops[:8]]


def _logits(B: int, V: int, spread: float) -> torch.Tensor:
    """N(0, spread²) logits; a negative spread: |spread|, with every 100th token at −100 (as a logit bias
    sets them)."""
    x = torch.randn(B, V, device="cuda") * abs(spread)
    if spread < 0:
        x[:, ::100] = -100.0
    return x


def _knobs(B: int):
    return (torch.zeros(B, device="cuda"), torch.full((B,), 50, dtype=torch.long, device="cuda"),
            torch.full((B,), 0.95, device="cuda"))


SWEPT = ("SEARCH_C", "SEARCH_PASSES", "SEARCH_GATHER", "SEARCH_CHECK", "SEARCH_BLOCK")


def launches(fn) -> list:
    """[(kernel, µs)] of one call of fn, in launch order (after a warm-up call)."""
    ev = sorted(_kernels(fn, 1, 1), key=lambda e: e.time_range.start)
    return [(e.name[:40], round(e.time_range.elapsed_us(), 1)) for e in ev]


def _unlike_sort(x: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> int:
    """Tokens kept under one floor and not the other (rounding of the mass sums at the top_p cut can differ)."""
    return int(((x >= got[:, None]) != (x >= want[:, None])).sum())


def _in_turn(row: dict, prefix: str, fns: dict, rounds: int) -> None:
    """row[f"{prefix}_{name}_graph_us"]: each fn's graph µs, `rounds` times, the order swapped every round."""
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            row.setdefault(f"{prefix}_{name}_graph_us", []).append(graph_us(fns[name]))


def _other(path: str):
    spec = importlib.util.spec_from_file_location("other_sampling_triton", path)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    return other


def search_sweep(spreads, shapes, other_path=None) -> list:
    """The sort-free truncation floor's settings (SWEPT: candidates per pass, passes, buffer slots per row,
    elements tested at once for any inside the range, row elements per program), and the default's launches
    one by one; with other_path, another build's module (its defaults) on the same logits."""
    rows = []
    st = sampling_triton
    keep = {k: getattr(st, k) for k in SWEPT}
    settings = [dict(keep, SEARCH_PASSES=n, SEARCH_GATHER=m) for n in (3, 4, 5) for m in (2048, 4096, 8192)]
    settings += [dict(keep, SEARCH_C=8, SEARCH_PASSES=n, SEARCH_GATHER=m) for n in (4, 5) for m in (2048, 4096)]
    other = _other(other_path) if other_path else None
    for V, B, spread in [(V, B, s) for V, B in shapes for s in spreads]:
        x = _logits(B, V, spread)
        min_p, top_k, top_p = _knobs(B)
        want = sampling.truncation_floor(x, min_p, top_k, top_p)
        here = []
        for setting in settings:
            for k, v in setting.items():
                setattr(st, k, v)
            differ = _unlike_sort(x, st.truncation_floor(x, min_p, top_k, top_p), want)
            p_us = graph_us(lambda: st.truncation_floor(x, min_p, None, top_p))
            kp_us = graph_us(lambda: st.truncation_floor(x, min_p, top_k, top_p))
            here.append({"vocab": V, "batch": B, "spread": spread, **setting, "top_p_graph_us": p_us,
                         "top_k_top_p_graph_us": kp_us, "tokens_unlike_sort": differ})
        for k, v in keep.items():
            setattr(st, k, v)
        if other is not None:
            here.append({"vocab": V, "batch": B, "spread": spread, "other": other_path,
                         "top_p_graph_us": graph_us(lambda: other.truncation_floor(x, min_p, None, top_p)),
                         "top_k_top_p_graph_us": graph_us(lambda: other.truncation_floor(x, min_p, top_k, top_p))})
            print(f"  other build: {here[-1]['top_p_graph_us']:.1f} / {here[-1]['top_k_top_p_graph_us']:.1f} us",
                  flush=True)
        steps = launches(lambda: st.truncation_floor(x, min_p, None, top_p))
        default = next(r for r in here if all(r.get(k) == v for k, v in keep.items()))
        best = min((r for r in here if "other" not in r), key=lambda r: r["top_p_graph_us"])
        rows += here + [{"vocab": V, "batch": B, "spread": spread, "default_top_p_launches": steps}]
        print(f"search sweep V={V} B={B} spread={spread}: default top_p {default['top_p_graph_us']:.1f} us "
              f"({steps}); best {best['top_p_graph_us']:.1f} us at "
              f"{ {k: best[k] for k in SWEPT} } (top_k+top_p {best['top_k_top_p_graph_us']:.1f}); tokens unlike "
              f"the sort {sorted({r['tokens_unlike_sort'] for r in here if 'other' not in r})}", flush=True)
    return rows


def against(path: str, shapes, spreads, rounds: int = 3) -> list:
    """This tree's truncation floor and another build's (its kernels/sampling_triton.py), in turn on the same
    logits (top_p 0.95, and top_k 50 + top_p), each first checked against the sort."""
    other = _other(path)
    rows = []
    for V, B, spread in [(V, B, s) for V, B in shapes for s in spreads]:
        x = _logits(B, V, spread)
        min_p, top_k, top_p = _knobs(B)
        row = {"vocab": V, "batch": B, "spread": spread, "read_once_us": B * V * 4 / 3.0e6}
        for k, kname in ((None, "top_p"), (top_k, "top_k_top_p")):
            want = sampling.truncation_floor(x, min_p, k, top_p)
            for name, mod in (("this", sampling_triton), ("other", other)):
                row[f"{kname}_{name}_same_as_sort"] = _unlike_sort(x, mod.truncation_floor(x, min_p, k, top_p),
                                                                   want) == 0
            _in_turn(row, kname, {name: (lambda mod=mod: mod.truncation_floor(x, min_p, k, top_p))
                                  for name, mod in (("this", sampling_triton), ("other", other))}, rounds)
        rows.append(row)
        print(f"V={V:6} B={B:3} spread={spread}: top_p this {min(row['top_p_this_graph_us']):7.1f} other "
              f"{min(row['top_p_other_graph_us']):7.1f} us; top_k+top_p this "
              f"{min(row['top_k_top_p_this_graph_us']):7.1f} other {min(row['top_k_top_p_other_graph_us']):7.1f}"
              f"; same as sort {[v for kk, v in row.items() if kk.endswith('sort')]}", flush=True)
    return rows


def _tree_draw(tree: str | None):
    """(the `_draw` function, its sampling kernels) of this tree (None) or of another tree's files."""
    from hybridserve.engine import sampler_graphs
    if tree is None:
        return sampler_graphs._draw, sampling_triton
    kernels = _other(str(Path(tree) / "kernels" / "sampling_triton.py"))
    spec = importlib.util.spec_from_file_location("other_sampler_graphs", Path(tree) / "engine" / "sampler_graphs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.pick = lambda name, device: kernels
    return mod._draw, kernels


def draws_against(tree: str, shapes, spreads, rounds: int = 3, checks: int = 10) -> list:
    """The sampler graphs' draw of this tree and of `tree`, in turn on the same logits: temperature 0.8 alone,
    with top_p 0.95 (cut "p"), and with top_k 50 too ("kp"); graph µs per draw, and the tokens drawn outside
    the sort's kept set over `checks` draws (none expected but at a rounding tie at the top_p cut)."""
    this, other = _tree_draw(None), _tree_draw(tree)
    builds = {"this": this[0], "other": other[0]}
    kernels = {"this": this[1], "other": other[1]}
    rows = []
    for V, B, spread in [(V, B, s) for V, B in shapes for s in spreads]:
        logits = _logits(B, V, spread)
        temperature = torch.full((B,), 0.8, device="cuda")
        min_p, top_k, top_p = _knobs(B)
        argmax, greedy = logits.argmax(-1), torch.zeros(B, dtype=torch.long, device="cuda")
        seed = torch.zeros(1, dtype=torch.long, device="cuda")
        x = logits / temperature[:, None]
        row = {"vocab": V, "batch": B, "spread": spread, "read_once_us": B * V * 4 / 3.0e6}
        for cut in ("", "p", "kp"):
            k = top_k if "k" in cut else torch.full((B,), V, dtype=torch.long, device="cuda")
            p = top_p if cut else torch.ones(B, device="cuda")
            floor = sampling.truncation_floor(x, min_p, k, p)
            for name, draw in builds.items():
                outside = 0
                for _ in range(checks):
                    ids = draw(logits, argmax, temperature, k, p, min_p, greedy, seed, cut)
                    outside += int((x.gather(1, ids[:, None])[:, 0] < floor).sum())
                row[f"{cut or 't'}_{name}_outside_kept"] = outside
            fns = {name: (lambda d=d: d(logits, argmax, temperature, k, p, min_p, greedy, seed, cut))
                   for name, d in builds.items()}
            _in_turn(row, cut or "t", fns, rounds)
        # the decode graph's greedy argmax, same kernels
        _in_turn(row, "argmax", {name: (lambda m=m: m.argmax(logits)) for name, m in kernels.items()}, rounds)
        for cut in ("p", "kp"):
            row[f"{cut}_this_launches"] = launches(lambda: builds["this"](logits, argmax, temperature, top_k, top_p,
                                                                          min_p, greedy, seed, cut))
        rows.append(row)
        print(f"V={V:6} B={B:3} spread={spread}: " + "; ".join(
            f"{c} this {min(row[c + '_this_graph_us']):7.1f} other {min(row[c + '_other_graph_us']):7.1f}"
            for c in ("t", "p", "kp")) +
            f"; argmax this {min(row['argmax_this_graph_us']):6.1f} other {min(row['argmax_other_graph_us']):6.1f}" +
            f"; outside {[v for kk, v in row.items() if kk.endswith('outside_kept')]}", flush=True)
    return rows


def _kth_search(x: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The k-th largest of each row of x · scale as race_truncated finds it: row stats, then the count search."""
    st = sampling_triton
    block, _, bmax, bmin, cnt, buf = st._search_state(*x.shape, x.device)
    kth = torch.empty(x.shape[0], device=x.device)
    lb = st._row_stats(x, scale, bmax, bmin, cnt, block, k)
    st._search(x, bmax, bmin, min_p, k, kth, kth, cnt[0], buf, block, mass=False, has_k=False, scale=scale, lb=lb)
    return kth


def topk_against(shapes, spreads, ks=(50, 1024), rounds: int = 3) -> list:
    """torch.topk (sorted and not, K = the cut's k and a 1024 cap) against the count search for the k-th largest
    scaled logit (top_k 50), on the same logits in turn; race_truncated with top_k + top_p and top_p alone beside."""
    rows = []
    for V, B in shapes:
        for spread in spreads:
            x = _logits(B, V, spread)
            scale = torch.full((B,), 1 / 0.8, device="cuda")
            min_p, k, top_p = _knobs(B)
            seed = torch.zeros(1, dtype=torch.long, device="cuda")
            race = sampling_triton.race_truncated
            want = (x * scale[:, None]).topk(50, dim=-1).values[:, -1]
            row = {"vocab": V, "batch": B, "spread": spread, "search_equal": bool(torch.equal(
                _kth_search(x, k, scale, min_p), want))}
            fns = {"search": lambda: _kth_search(x, k, scale, min_p),
                   **{f"topk{K}{'' if srt else '_unsorted'}": (lambda K=K, srt=srt: x.topk(K, dim=-1, sorted=srt))
                      for K in ks for srt in (True, False)},
                   "race_truncated_top_k_top_p": lambda: race(x, scale, min_p, k, top_p, seed),
                   "race_truncated_top_p": lambda: race(x, scale, min_p, None, top_p, seed)}
            _in_turn(row, "kth", fns, rounds)
            rows.append(row)
            print(f"V={V:6} B={B:3} spread {spread:4}: search equal {row['search_equal']}  " + "  ".join(
                f"{n} {min(row[f'kth_{n}_graph_us']):.1f}" for n in fns), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", default="49152,128256")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--graph-form-only", action="store_true", help="only the sampler graphs' form of the draws")
    ap.add_argument("--spreads", default="4", help="logits ~ N(0, spread²) (the graph form scales by 1.25); "
                    "negative: every 100th token at -100 too")
    ap.add_argument("--search-sweep", action="store_true", help="instead: the truncation search's settings")
    ap.add_argument("--against", help="instead: this tree's truncation floor against this module file's "
                    "(with --search-sweep: that module timed beside the sweep)")
    ap.add_argument("--draws-against", help="instead: the sampler graphs' whole draw, this tree against another "
                    "tree's")
    ap.add_argument("--topk-against", action="store_true", help="instead: the top_k cut's k-th value by torch.topk "
                    "against the count search")
    args = ap.parse_args()
    spreads = [float(s) for s in args.spreads.split(",")]
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    if args.search_sweep or args.against or args.draws_against or args.topk_against:
        shapes = [(V, B) for V in map(int, args.vocabs.split(",")) for B in map(int, args.batches.split(","))]
        if args.topk_against:
            rows, name = topk_against(shapes, spreads), "sampler_topk_against.json"
        elif args.draws_against:
            rows, name = draws_against(args.draws_against, shapes, spreads), "sampler_draws_against.json"
        elif args.search_sweep:
            rows, name = search_sweep(spreads, shapes, args.against), "sampler_search_sweep.json"
        else:
            rows, name = against(args.against, shapes, spreads), "sampler_search_against.json"
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
        (out_dir / name).write_text(json.dumps(out, indent=1))
        return
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    sampler = Sampler()
    for V, spread in [(V, s) for V in map(int, args.vocabs.split(",")) for s in spreads]:
        for B in map(int, args.batches.split(",")):
            logits = torch.randn(B, V, device="cuda") * spread
            for case, kw in (CASES.items() if not args.graph_form_only else ()):
                params = [SamplingParams(**kw)] * B
                total, ops = profile_ops(lambda: sampler(logits, params, [[]] * B, [[]] * B, [None] * B))
                row = {"vocab": V, "batch": B, "spread": spread, "case": case, "gpu_us": total,
                       "read_once_us": B * V * 4 / 3.0e6,
                       "top": ops}
                out["rows"].append(row)
                print(f"V={V:6} B={B:3} {case:11} {total:8.1f} us  " + ", ".join(
                    f"{o['kernel'][:28]} {o['us']:.0f}" for o in ops[:4]), flush=True)
            # the sampler graphs' form of the same draws (engine/sampler_graphs.py): GPU time by op, and the
            # wall time of the same calls replayed as a CUDA graph (the search is ~16 small launches)
            seed = torch.zeros(1, dtype=torch.long, device="cuda")
            inv_t, ones = torch.full((B,), 1 / 0.8, device="cuda"), torch.ones(B, device="cuda")
            min_p, top_p = torch.zeros(B, device="cuda"), torch.full((B,), 0.95, device="cuda")
            top_k = torch.full((B,), 50, dtype=torch.long, device="cuda")
            x = logits * 1.25

            def top_p_with(mod, k=None):
                return lambda: sampling_triton.race(x, ones, seed, mod.truncation_floor(x, min_p, k, top_p))
            search_c = sampling_triton.SEARCH_C
            for case, fn in (("graph_form_temperature", lambda: sampling_triton.race(logits, inv_t, seed)),
                             ("graph_form_top_p_sort", top_p_with(sampling)),
                             ("graph_form_top_p", top_p_with(sampling_triton)),
                             ("graph_form_top_p_c04", top_p_with(sampling_triton)),
                             ("graph_form_top_p_c08", top_p_with(sampling_triton)),
                             ("graph_form_top_p_c16", top_p_with(sampling_triton)),
                             ("graph_form_top_p_c64", top_p_with(sampling_triton)),
                             ("graph_form_top_k_top_p", top_p_with(sampling_triton, top_k)),
                             ("graph_form_greedy", lambda: sampling_triton.argmax(logits))):
                sampling_triton.SEARCH_C = int(case[-2:]) if case[-3:-2] == "c" else search_c
                total, ops = profile_ops(fn)
                wall = graph_us(fn)
                sampling_triton.SEARCH_C = search_c
                out["rows"].append({"vocab": V, "batch": B, "spread": spread, "case": case, "gpu_us": total,
                                    "graph_us": wall, "read_once_us": B * V * 4 / 3.0e6, "top": ops})
                print(f"V={V:6} B={B:3} {case:11} {total:8.1f} us GPU, {wall:8.1f} us graph  " + ", ".join(
                    f"{o['kernel'][:28]} {o['us']:.0f}" for o in ops[:4]), flush=True)
    (out_dir / "sampler_cost.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
