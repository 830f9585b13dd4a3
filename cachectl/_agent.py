"""What a target timm wants, asked of that timm itself.

This module runs inside a target interpreter that has only torch and timm (any release
from 0.4.12 on), either imported in-process or as a script serving JSON lines
(`python _agent.py serve`). It must not import cachectl or anything beyond the standard
library, torch and timm, and must stay valid for the oldest Python a target may run.
"""
import contextlib
import importlib
import json
import os
import sys

import torch
from torch import nn

import timm

PROTOCOL = 1


def info():
    return {
        "protocol": PROTOCOL,
        "timm": timm.__version__,
        "torch": torch.__version__.split("+")[0],
        "python": "%d.%d.%d" % sys.version_info[:3],
        "executable": sys.executable,
        "hub": _hub_importable(),
    }


def _hub_importable():
    """Whether this timm can use its huggingface_hub: timm imports it quietly or not at all."""
    for module in ("timm.models._hub", "timm.models.hub"):
        try:
            return bool(importlib.import_module(module)._has_hf_hub)
        except (ImportError, AttributeError):
            continue
    return False


@contextlib.contextmanager
def _params_on_meta():
    # Parameters move to the meta device the moment they are registered, so building a
    # 2 GB model allocates one layer at a time, briefly; buffers stay real because some
    # of them (relative position indices, attention masks) are what a target needs filled.
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextlib.contextmanager
def _no_init():
    # Parameter values are never read here: skipping their random init keeps building fast.
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def empty_model(name, kwargs=None, pretrained_hook=None):
    """The model `name` with parameters on the meta device (real buffers), in eval mode.

    Falls back to real, uninitialised parameters for the models whose construction does
    arithmetic on parameters. `pretrained_hook`, when given, replaces timm's
    `load_pretrained` and the model is built as for `pretrained=True`.
    """
    kwargs = dict(kwargs or {})
    if pretrained_hook is not None:
        kwargs["pretrained"] = True
    with _patched_load_pretrained(pretrained_hook):
        try:
            with _params_on_meta(), _no_init():
                model = timm.create_model(name, **kwargs)
            _init_buffers(model)
        except Exception:  # any failure on meta: retry the plain way, errors surface there
            with _no_init():
                model = timm.create_model(name, **kwargs)
    return model.eval()


def _init_buffers(model):
    # timm 1.0.23 and 1.0.24 skip a module's whole init when its parameters are on meta,
    # leaving position indices and zeroed biases as whatever memory held; the method
    # timm gives such modules (from 1.0.23) computes them again from the configuration.
    # Some compute them on their parameters' device, meta: that fails, and the model is
    # built with real parameters instead, its init whole.
    for module in model.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()


@contextlib.contextmanager
def _patched_load_pretrained(hook):
    if hook is None:
        yield
        return
    modules = []
    for modname in ("timm.models._builder", "timm.models.helpers"):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        if hasattr(mod, "load_pretrained") and hasattr(mod, "build_model_with_cfg"):
            modules.append((mod, mod.load_pretrained))
            mod.load_pretrained = hook
    try:
        yield
    finally:
        for mod, original in modules:
            mod.load_pretrained = original


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _classifier(model):
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    clf = cfg.get("classifier")
    if clf is None:
        return []
    return [clf] if isinstance(clf, str) else list(clf)


def describe(name, kwargs=None):
    """Keys, shapes and dtypes of the state dict of `name` built with `kwargs`."""
    model = empty_model(name, kwargs)
    state = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return {
        "name": name,
        "kwargs": dict(kwargs or {}),
        "keys": [[k, list(v.shape), _dtype_name(v.dtype)] for k, v in state.items()],
        "buffers": sorted(k for k, _ in model.named_buffers() if k in state),
        "classifier": _classifier(model),
        "num_classes": getattr(model, "num_classes", None),
        "default_num_classes": cfg.get("num_classes"),
        "family": type(model).__module__.rsplit(".", 1)[-1],
    }


def buffers(name, kwargs, keys, out_path):
    """Write the values a fresh target model gives the buffers `keys` (safetensors)."""
    from safetensors.torch import save_file

    model = empty_model(name, kwargs)
    state = model.state_dict()
    missing = [k for k in keys if k not in state or state[k].device.type == "meta"]
    if missing:
        raise KeyError("the target model has no real value for %s" % ", ".join(missing))
    save_file({k: state[k].contiguous() for k in keys}, out_path)
    return {"written": list(keys)}


def apply_filter(name, kwargs, in_path, out_path, order=None):
    """Run the target timm's own pretrained-checkpoint filter for `name` on a file.

    The filter is whatever `build_model_with_cfg` would hand `load_pretrained`, captured
    by building the model as for `pretrained=True` with `load_pretrained` replaced, so
    filters are found however a family names or wraps them.
    """
    from safetensors.torch import load_file, save_file

    captured = {}

    def hook(model, *args, **kw):
        captured["filter_fn"] = kw.get("filter_fn")
        captured["found"] = True

    model = empty_model(name, kwargs, pretrained_hook=hook)
    if not captured.get("found"):
        return {"applied": False, "reason": "timm builds %s without its pretrained path" % name}
    filter_fn = captured.get("filter_fn")
    if filter_fn is None:
        return {"applied": False, "reason": "timm has no checkpoint filter for %s" % name}
    state = load_file(in_path)
    if order:  # as a torch file hands it over: some filters zip keys with the model's, by position
        state = dict([(k, state[k]) for k in order if k in state] + [(k, v) for k, v in state.items() if k not in order])
    try:
        out = filter_fn(state, model)
    except TypeError:
        out = filter_fn(state)
    except RuntimeError:
        # a filter that does arithmetic with parameters cannot run on meta ones
        out = filter_fn(state, empty_model(name, kwargs))
    tensors = {k: v.contiguous() for k, v in out.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, out_path)
    return {"applied": True, "filter": getattr(filter_fn, "__qualname__", repr(filter_fn))}


def run_fixed(name, kwargs, in_path, input_size):
    """What `name` built with `kwargs` computes on the fingerprint's fixed input with the
    weights in `in_path`, loaded strictly: the numbers a fingerprint keeps.

    Proves a conversion's math by running it: the file's source release, given the same
    generated weights, gave the catalog's fingerprint (see _fingerprint.py)."""
    import runpy

    from safetensors.torch import load_file

    fp = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fingerprint.py"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fingerprints are taken: the same order of additions
    try:
        with _no_init():
            model = timm.create_model(name, **dict(kwargs or {}))
        model.load_state_dict(load_file(in_path), strict=True)
        model.eval()
        with torch.no_grad():
            out = model(fp["fixed_input"](input_size))
        return fp["summarize"](out)
    finally:
        torch.set_num_threads(threads)


def deprecated_models():
    try:
        from timm.models import _registry
    except ImportError:
        return {}
    table = getattr(_registry, "_deprecated_models", {})
    return {old: new for old, new in table.items() if new}


def resolve_name(name):
    """The name this timm knows `name` by: itself, or its deprecation's target; else None."""
    renamed = deprecated_models()
    if name in renamed:  # is_model also answers yes for deprecated names
        return renamed[name]
    base = name.split(".")[0]
    if timm.is_model(base):
        # releases before 0.9 know no pretrained tags
        return name if "." in name and _has_tags() else base
    return None


def pretrained_cfg(name):
    """The pretrained config this timm uses for `name` (tag included from 0.9 on), as JSON.

    What a hub view's config.json is made of, so the environment's own timm reads back
    exactly what it would have written itself."""
    if _has_tags():
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(name)
        except (RuntimeError, KeyError):  # a tag or model this release does not have
            return None
        cfg = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else cfg
    else:
        from timm.models import registry

        table = getattr(registry, "_model_pretrained_cfgs", None) or getattr(registry, "_model_default_cfgs", {})
        cfg = table.get(name)
    if cfg is None:
        return None
    return json.loads(json.dumps(cfg, default=lambda v: list(v) if isinstance(v, (tuple, set)) else str(v)))


def _has_tags():
    try:
        from timm.models import _registry  # noqa: F401  (0.9+: names may carry a tag)
    except ImportError:
        return False
    return True


OPS = {
    "resolve_name": resolve_name,
    "info": info,
    "describe": describe,
    "buffers": buffers,
    "apply_filter": apply_filter,
    "deprecated_models": deprecated_models,
    "pretrained_cfg": pretrained_cfg,
    "run_fixed": run_fixed,
}


def serve(stdin, stdout):
    """Answer one JSON request per line with one JSON line: {"ok": ..., "result"|"error"}."""
    for line in stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            result = OPS[request["op"]](**request.get("args", {}))
            reply = {"ok": True, "result": result}
        except Exception as exc:  # every failure goes back to the caller, who decides
            reply = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


def main(argv):
    if argv[-1:] != ["serve"]:
        sys.stderr.write("usage: python _agent.py serve\n")
        return 2
    # timm and torch may print; only replies may reach the protocol stream
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    serve(sys.stdin, protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
