"""A model's math fingerprint: deterministic weights from each key and shape, a fixed input, the output.

Two (model, release) entries whose state dicts hold the same generated tensors (same
`weights` id) and whose fingerprints differ compute differently: a checkpoint carried
from one to the other as-is would load strictly and give other outputs.

This file is the one definition of the weights, the input and the numbers kept. It runs
inside any timm release from 0.4.12 on (cachectl/_fingerprint_dump.py loads it with runpy,
tests run it as a script under a release), so, like _agent.py, it imports only the
standard library, torch and timm, and never cachectl.

    python _fingerprint.py NAME            # print the fingerprint of NAME in this timm (JSON)
"""
import contextlib
import hashlib
import json
import math
import os
import runpy
import signal
import sys
import time
import zlib

if __name__ == "__main__":  # run as a script: cachectl's own module names must not shadow the target's
    sys.path = [p for p in sys.path if p not in ("", ".", os.path.dirname(os.path.abspath(__file__)))]

import torch
from torch import nn

METHOD = 1  # bump when anything below changes what a fingerprint is; old ones are then not compared
SAMPLES = 8  # output values kept, evenly spaced over the flattened output
# Float buffers a model derives from its configuration: kept as the model builds them
# (a converted file gets them filled from a fresh target model), never generated.
DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table", "attention_bias_idxs",
                   "rel_pos_idx", "k_pos_idx", "pos_embed_index")
NEAR_ONE = ("weight", "gamma", "scale")  # 1-d scales: near 1 so signals neither vanish nor blow up
MAX_PARAMS = 150_000_000  # above this a model is not fingerprinted (memory and time on a build machine)
MAX_CPU_SECONDS = 30.0  # building, filling and one forward pass, in CPU time (fair under `nice`)


class OverBudget(BaseException):
    """Not an Exception: timm's and the agent's `except Exception` fallbacks must not catch it."""


def generated_tensor(key, shape):
    """The value the fingerprint gives the state-dict entry `key` of `shape` (float32)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    shape = tuple(int(s) for s in shape)
    noise = torch.randn(shape, generator=g) if shape else torch.randn((), generator=g)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return torch.rand(shape, generator=g) + 0.5
    if len(shape) >= 2 and leaf == "weight":
        fan_in = 1
        for s in shape[1:]:  # no math.prod: a target's Python may predate it
            fan_in *= s
        fan_in = max(1, fan_in)
        return noise / math.sqrt(fan_in)
    if len(shape) <= 1 and leaf in NEAR_ONE:
        return 1.0 + 0.1 * noise
    return 0.1 * noise  # biases, running means, tokens, position embeddings, tables


def is_generated(key, tensor, is_buffer):
    """Does the fingerprint give this state-dict entry generated values (else: as built)?"""
    if not tensor.is_floating_point():
        return False
    return not (is_buffer and key.rsplit(".", 1)[-1] in DERIVED_BUFFERS)


def fill(model):
    """Give every generated entry of `model` its value, in place; the weights id of the model.

    Parameters still on the meta device (a model built without weights) are given real
    storage first, keeping tied parameters tied."""
    persistent = set(model.state_dict(keep_vars=True))
    real = {}
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                if id(p) not in real:
                    real[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
                module._parameters[pname] = real[id(p)]
    generated = []
    seen = set()
    with torch.no_grad():
        items = [(k, t, False) for k, t in model.named_parameters()]
        items += [(k, t, True) for k, t in model.named_buffers() if k in persistent]
        for key, tensor, is_buffer in items:
            if id(tensor) in seen or not is_generated(key, tensor, is_buffer):
                continue
            seen.add(id(tensor))
            tensor.copy_(generated_tensor(key, tensor.shape).to(tensor.dtype))
            generated.append("%s:%s" % (key, ",".join(str(int(s)) for s in tensor.shape)))
    for key, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise ValueError("%s has no real value (a buffer computed from parameters on the meta device)" % key)
    return weights_id(generated)


def weights_id(entries):
    """Short id of the generated (key, shape) entries: equal ids, same weights."""
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def input_size(model):
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(int(s) for s in cfg.get("input_size", (3, 224, 224)))


def fixed_input(size):
    g = torch.Generator().manual_seed(0)
    return torch.randn((1,) + tuple(size), generator=g)


def _flat(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for k in sorted(output) for t in _flat(output[k])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flat(item)]
    return []


def summarize(output):
    """The numbers kept of a model's output."""
    tensors = [t.detach().float().reshape(-1) for t in _flat(output)]
    if not tensors:
        raise ValueError("the model returned no tensor")
    flat = torch.cat(tensors).double()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("the output is not finite")
    n = flat.numel()
    picks = sorted({(i * n) // SAMPLES for i in range(SAMPLES)}) if n else []
    first = tensors[0] if isinstance(output, torch.Tensor) else None
    return {
        "shape": list(output.shape) if first is not None else [n],
        "sum": float(flat.sum()),
        "abs": float(flat.abs().sum()),
        "values": [float(flat[i]) for i in picks],
    }


@contextlib.contextmanager
def cpu_budget(seconds):
    """Raise OverBudget once this process has used `seconds` more CPU time (not wall time)."""
    def expire(signum, frame):
        raise OverBudget("over the budget of %g CPU seconds" % seconds)

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def fingerprint(model):
    """The fingerprint of a built model (its generated entries are overwritten)."""
    torch.set_num_threads(1)
    wid = fill(model)
    model.eval()
    size = input_size(model)
    with torch.no_grad():
        out = model(fixed_input(size))
    return dict(summarize(out), weights=wid, input=list(size), method=METHOD)


def count_params(model):
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def load_agent():
    """The functions of _agent.py beside this file (which builds models without weights)."""
    return runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_agent.py"))


def build(name, agent):
    """`name` with parameters on the meta device where that leaves every buffer real, else
    with real parameters (never initialised: fill() overwrites them)."""
    import timm

    model = agent["empty_model"](name)
    if any(t.device.type == "meta" for t in model.buffers()):
        with agent["_no_init"]():
            model = timm.create_model(name)
    return model.eval()


def fingerprint_name(name, agent, max_params=MAX_PARAMS, max_cpu=MAX_CPU_SECONDS):
    """{"fingerprint": ...} or {"skipped": reason} for the model `name` of this timm.

    `agent` is load_agent(); errors other than the budget propagate to the caller."""
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the few models that draw buffers at random draw the same ones
    start = time.process_time()
    try:
        with cpu_budget(max_cpu):
            model = build(name, agent)
            params = count_params(model)
            if params > max_params:
                return {"skipped": "%d parameters, above the budget of %d" % (params, max_params), "params": params}
            fp = fingerprint(model)
    except OverBudget as exc:
        return {"skipped": str(exc)}
    fp["params"] = params
    fp["cpu"] = round(time.process_time() - start, 3)
    return {"fingerprint": fp}


def main(argv):
    if len(argv) != 2:
        sys.stderr.write(__doc__)
        return 2
    result = fingerprint_name(argv[1], load_agent(), max_params=float("inf"), max_cpu=1e9)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
