"""`python -m cachectld`: the same as the `cachectld` command."""
from .main import main

# spawned workers re-import this module as __mp_main__: they must not start a daemon
if __name__ == "__main__":
    main()
