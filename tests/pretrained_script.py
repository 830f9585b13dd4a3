"""Run under one real timm release as unmodified user code would: `pretrained=True`, nothing else.

    python pretrained_script.py NAME OUT_LOGITS.pt [KWARGS_JSON]

NAME is what the user writes (`arch.tag`, an old untagged name, or `hf-hub:org/name`).
The caches it reads come from the environment only (what `cachectl env activate` prints).
Saves the outputs on release_script.py's fixed input.
"""
import json
import sys

import torch

import timm
from release_script import fixed_input


def main(argv):
    name, out = argv[1], argv[2]
    kwargs = json.loads(argv[3]) if len(argv) > 3 else {}
    model = timm.create_model(name, pretrained=True, **kwargs).eval()
    with torch.no_grad():
        torch.save({"timm": timm.__version__, "logits": model(fixed_input(model))}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
