"""cachectl: every timm checkpoint, converted for the timm of each environment."""
__version__ = "0.1.0"


def load_state_dict(name: str, env: str | None = None, root: str | None = None):
    """The state dict NAME resolves to in ENV (its pin, else the newest), strictly loadable.

    ENV defaults to the registered environment this interpreter and its timm are."""
    from safetensors.torch import load_file

    from .cache import Cache

    with Cache(root, create=root is None) as cache:  # a root named must exist: a typo is no store
        return load_file(cache.resolve(name, env or cache.env_here().name).path)


def create_model(name: str, env: str | None = None, root: str | None = None, **kwargs):
    """A timm model built as the converted entry says, with NAME's weights loaded strictly.

    ENV defaults to the registered environment this interpreter and its timm are."""
    import timm
    from safetensors.torch import load_file

    from .cache import Cache

    with Cache(root, create=root is None) as cache:  # a root named must exist: a typo is no store
        resolved = cache.resolve(name, env or cache.env_here().name)
    model = timm.create_model(resolved.converted.model, **{**resolved.converted.model_kwargs, **kwargs})
    model.load_state_dict(load_file(resolved.path), strict=True)
    return model
