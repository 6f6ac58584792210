"""_publish: see the README's "Where things go"."""
