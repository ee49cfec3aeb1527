"""vermeer: pixel-space text-to-image diffusion trained by greedy growing (arXiv 2405.16759)."""

from vermeer_core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
