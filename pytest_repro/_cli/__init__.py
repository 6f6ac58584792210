"""_cli: see the README's "Where things go"."""
