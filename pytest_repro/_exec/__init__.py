"""_exec: see the README's "Where things go"."""
