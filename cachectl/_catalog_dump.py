"""Dump one timm release's registry: run under that release (its folder first on PYTHONPATH).

    python cachectl/_catalog_dump.py OUT.jsonl

Appends one JSON line per model (resumable: models already in OUT are skipped), then a
last line with the release's tables. Used by cachectl/catalog_build.py; runs on torch and
timm alone, like the agent it borrows from.
"""
import json
import os
import runpy
import sys

AGENT = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_agent.py"))


def _cfg_dict(cfg):
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return cfg
    return {k: getattr(cfg, k, None) for k in ("hf_hub_id", "url", "num_classes", "classifier", "file")}


def pretrained_tags(name):
    """{tag: {hf_hub_id, url, num_classes}} for `name`; tag "" for releases before tags."""
    from timm.models import _registry as reg_new  # noqa: F401  (0.9+)

    default = reg_new._model_default_cfgs.get(name)
    if default is None:
        return {}
    out = {}
    for tag, cfg in default.cfgs.items():
        c = _cfg_dict(cfg)
        out[tag] = {"hf_hub_id": c.get("hf_hub_id"), "url": c.get("url"), "num_classes": c.get("num_classes")}
    return out


def pretrained_tags_old(name):
    from timm.models import registry

    table = getattr(registry, "_model_pretrained_cfgs", None) or getattr(registry, "_model_default_cfgs", {})
    c = _cfg_dict(table.get(name))
    if not c:
        return {}
    return {"": {"hf_hub_id": c.get("hf_hub_id"), "url": c.get("url"), "num_classes": c.get("num_classes")}}


def main(out_path):
    import timm

    try:
        import timm.models._registry  # noqa: F401

        tags_of = pretrained_tags
    except ImportError:
        tags_of = pretrained_tags_old
    done = set()
    if os.path.exists(out_path):
        with open(out_path) as f:
            for line in f:
                rec = json.loads(line)
                done.add(rec.get("model"))
    if "__tables__" in done:
        return 0
    names = timm.list_models()
    with open(out_path, "a") as out:
        for name in names:
            if name in done:
                continue
            # a marker first, so a crash inside this model is skipped on resume
            out.write(json.dumps({"model": name, "started": True}) + "\n")
            out.flush()
            try:
                rec = AGENT["describe"](name)
                rec = {"model": name, **{k: rec[k] for k in ("keys", "classifier", "default_num_classes", "family")}}
            except Exception as exc:  # recorded: the catalog says which models a release cannot build
                rec = {"model": name, "error": "%s: %s" % (type(exc).__name__, exc)}
            rec["tags"] = tags_of(name)
            out.write(json.dumps(rec) + "\n")
            out.flush()
        out.write(json.dumps({
            "model": "__tables__",
            "timm": timm.__version__,
            "deprecated": AGENT["deprecated_models"](),
        }) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
