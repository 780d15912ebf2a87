"""The CQN baseline: coarse-to-fine Q-network with a C51 head per (level, dim) (critic, head, loss)."""
