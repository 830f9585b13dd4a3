"""Fingerprint every model of one timm release: run under that release (its folder first on PYTHONPATH).

    python cachectl/_fingerprint_dump.py OUT.jsonl [FIRST.txt [--first-only]]

Appends one JSON line per model (resumable: a model already in OUT is skipped; one started
once without a result is tried again, since a build stopped from outside or a machine shut
down leaves one such model behind; one started twice without a result crashed the process
twice and is recorded so), then a last line with the release's totals. Names listed in
FIRST.txt (one a line) go first; with --first-only the dump stops after them, unfinished. Used by cachectl/fingerprint_build.py; runs on torch
and timm alone, with cachectl/_fingerprint.py (and the agent it builds models with).
"""
import json
import os
import runpy
import sys
import time

FP = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fingerprint.py"))
DONE = "__done__"


def main(out_path, first_path=None, first_only=False):
    import timm
    import torch

    starts, done = {}, set()
    if os.path.exists(out_path):
        with open(out_path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("started"):
                    starts[rec["model"]] = starts.get(rec["model"], 0) + 1
                else:
                    done.add(rec["model"])
    if DONE in done:
        return 0
    agent = FP["load_agent"]()
    t0 = time.time()
    with open(out_path, "a") as out:
        for name in sorted(n for n, count in starts.items() if count >= 2 and n not in done):
            # started twice, never finished: this model takes the process down
            out.write(json.dumps({"model": name, "error": "crashed the fingerprinting process"}) + "\n")
            done.add(name)
        names = timm.list_models()
        first = []
        if first_path:
            with open(first_path) as f:
                wanted = set(f.read().split())
            first = [n for n in names if n in wanted]
        for name in first + ([] if first_only else [n for n in names if n not in set(first)]):
            if name in done:
                continue
            out.write(json.dumps({"model": name, "started": True}) + "\n")
            out.flush()
            start, cpu = time.time(), time.process_time()
            try:
                rec = FP["fingerprint_name"](name, agent)
            except Exception as exc:  # recorded: the catalog says which models have no fingerprint, and why
                rec = {"error": "%s: %s" % (type(exc).__name__, str(exc)[:300])}
            rec = dict(rec, model=name, wall=round(time.time() - start, 3), cpu=round(time.process_time() - cpu, 3))
            out.write(json.dumps(rec) + "\n")
            out.flush()
            done.add(name)
        if first_only:
            return 0
        out.write(json.dumps({"model": DONE, "timm": timm.__version__, "torch": torch.__version__.split("+")[0],
                              "method": FP["METHOD"], "wall": round(time.time() - t0, 1)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None, "--first-only" in sys.argv))
