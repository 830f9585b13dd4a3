"""Swin v2 "cr": timm 0.9 put the classifier under `head.fc` (a ClassifierHead). Nothing
else moved; the `tau` -> `logit_scale` change predates every release we convert (timm's
own filter still maps original `tau` files, which no timm release ever wrote)."""
import re

from . import Migration, register, rename


def _is_old(keys):
    return "head.weight" in keys


def _upgrade(state):
    return rename(state, lambda k: re.sub(r"^head\.", "head.fc.", k))


def _downgrade(state):
    return rename(state, lambda k: re.sub(r"^head\.fc\.", "head.", k))


register(Migration(("swin_transformer_v2_cr",), "head-fc", _is_old, _upgrade, _downgrade))
