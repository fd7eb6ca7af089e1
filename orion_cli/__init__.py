"""orion: pick, fetch, fit and run the right open model for the machine you have."""

__version__ = "0.1.0"
