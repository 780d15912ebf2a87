"""ARSQ: auto-regressive soft Q-learning over coarse-to-fine action codes (critic, head, loss)."""
