"""sandboxd: runs each Claude Managed Agents session of a self-hosted environment in its own hardened container."""

__version__ = "0.1.0"
