"""engine/gc_pauses.py: the collections' watch counts and times what runs, and freezing the heap takes the
objects alive at that point out of later collections (in a child interpreter: a freeze in the test process would
keep every cycle alive now for the rest of the run)."""
from __future__ import annotations

import gc
import json
import subprocess
import sys

from hybridserve.engine.gc_pauses import GcSummary, GcWatch


def test_watch_counts_collections_by_generation():
    watch = GcWatch()
    try:
        before = watch.summary()
        assert before.collections == (0, 0, 0) and before.longest == 0.0
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        s = watch.summary()
        # the interpreter may run young collections of its own meanwhile, never fewer than asked for
        assert s.collections[0] >= 1 and s.collections[2] >= 2
        assert all(t >= 0 for t in s.seconds) and s.seconds[2] > 0
        assert 0 < s.longest <= sum(s.seconds)
    finally:
        watch.close()
    gc.collect(2)
    assert watch.summary().collections[2] == s.collections[2]   # closed: no longer counting
    watch.close()                                               # twice is harmless
    assert GcSummary().collections == (0, 0, 0)


CHILD = r"""
import gc, json, weakref
from hybridserve.engine.gc_pauses import GcWatch, freeze_heap

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, weakref.ref(a)

keep = [[i] for i in range(50_000)]          # long-lived start-up state
held, early = cycle()                        # a cycle alive at the freeze, dropped after it
before = len(gc.get_objects())
frozen = freeze_heap()
after = len(gc.get_objects())
del held
late = cycle()[1]                          # a cycle made after the freeze, dropped at once
watch = GcWatch()
gc.collect()
print(json.dumps({"before": before, "frozen": frozen, "after": after, "early_alive": early() is not None,
                  "late_alive": late() is not None, "summary_frozen": watch.summary().frozen,
                  "full": watch.summary().collections[2]}))
"""


def test_freeze_heap_takes_the_live_heap_out_of_collections():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["frozen"] >= 50_000 and r["summary_frozen"] == r["frozen"]
    assert r["after"] < r["before"] // 10        # a full collection now walks a small fraction
    assert r["full"] == 1
    assert not r["late_alive"]                   # cycles made after the freeze are collected as before
    assert r["early_alive"]                      # the documented cost: a frozen cycle is never collected
