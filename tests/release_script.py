"""Run under one real timm release (its folder first on PYTHONPATH): make or load a model.

    python release_script.py make NAME OUT.pth OUT_LOGITS.pt [KWARGS_JSON] [--format pth|safetensors|legacy]
    python release_script.py run NAME KWARGS_JSON WEIGHTS OUT_LOGITS.pt

`make` builds NAME with random weights and random batch-norm statistics (so a wrongly
mapped buffer shows in the outputs), saves its state dict and its outputs on a fixed
input. `run` builds NAME, loads WEIGHTS with strict=True and saves its outputs.
Only torch, timm and safetensors are imported: this runs under any release.
"""
import json
import sys

import torch

import timm


def fixed_input(model):
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    g = torch.Generator().manual_seed(0)
    return torch.randn((2,) + size, generator=g)


def randomize(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if name.endswith("weight") and p.ndim == 1 else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def main(argv):
    torch.manual_seed(0)
    if argv[1] == "make":
        name, out, logits = argv[2], argv[3], argv[4]
        kwargs = json.loads(argv[5]) if len(argv) > 5 and not argv[5].startswith("--") else {}
        fmt = argv[argv.index("--format") + 1] if "--format" in argv else "pth"
        model = timm.create_model(name, **kwargs).eval()
        randomize(model)
        state = model.state_dict()
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, out)
        elif fmt == "legacy":
            torch.save(state, out, _use_new_zipfile_serialization=False)
        else:
            torch.save(state, out)
    elif argv[1] == "run":
        name, kwargs, weights, logits = argv[2], json.loads(argv[3]), argv[4], argv[5]
        model = timm.create_model(name, **kwargs).eval()
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    else:
        raise SystemExit(__doc__)
    with torch.no_grad():
        torch.save({"timm": timm.__version__, "logits": model(fixed_input(model))}, logits)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
