"""_judge: see the README's "Where things go"."""
