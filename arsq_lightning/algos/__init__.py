"""One folder per algorithm, each with its critic (networks + acting), head and loss: ``arsq/`` and ``cqn/``."""
