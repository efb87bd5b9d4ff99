"""Django companion of knoxgate: trust the identity knoxgate's forward auth vouched for."""

__version__ = "0.1.0"
