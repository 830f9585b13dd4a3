"""cachectl: every timm checkpoint, converted for the timm of each environment."""
__version__ = "0.1.0"
