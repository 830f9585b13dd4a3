"""Run under one real timm release (its folder first on PYTHONPATH): make or load a model.

    python release_script.py make NAME OUT.pth OUT_LOGITS.pt [KWARGS_JSON] [--format pth|safetensors|legacy|training]
    python release_script.py run NAME KWARGS_JSON WEIGHTS OUT_LOGITS.pt

`make` builds NAME with random weights and random batch-norm statistics (so a wrongly
mapped buffer shows in the outputs), saves its state dict and its outputs on a fixed
input. `--format training` saves what timm's train.py saves (`state_dict`, a different
`state_dict_ema`, `arch`, `args`, ...) and the outputs of the model timm's own
`load_checkpoint` loads from it. `run` builds NAME, loads WEIGHTS with strict=True and
saves its outputs.
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


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if name.endswith("weight") and p.ndim == 1 else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def save_training_checkpoint(model, name, kwargs, out):
    """Save as timm's CheckpointSaver does, with an EMA copy unlike the model; return the
    model timm's own load_checkpoint (its defaults) makes of the file."""
    import argparse
    import copy

    from timm.models import load_checkpoint

    ema = copy.deepcopy(model)
    randomize(ema, seed=2)
    torch.save({
        "epoch": 3, "arch": name, "state_dict": model.state_dict(), "state_dict_ema": ema.state_dict(),
        "optimizer": {"state": {}, "param_groups": []}, "version": 2, "metric": 0.5,
        "args": argparse.Namespace(model=name, lr=0.1, epochs=3),
    }, out)
    loaded = timm.create_model(name, **kwargs).eval()
    # torch >= 2.6 loads weights_only by default; a training run's args are a Namespace
    allow = getattr(torch.serialization, "safe_globals", None)
    if allow is None:
        load_checkpoint(loaded, out)
    else:
        with allow([argparse.Namespace]):
            load_checkpoint(loaded, out)
    return loaded


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
        elif fmt == "training":
            model = save_training_checkpoint(model, name, kwargs, out)
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
