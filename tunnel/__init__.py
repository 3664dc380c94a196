"""tunnel: a mutual-TLS tunnel daemon with its own private CA."""

__version__ = "0.1.0"
