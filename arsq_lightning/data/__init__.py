"""Data: the online and offline-to-online data modules, dataset readers / writers, the D4RL demo protocol and the
RLBench demo converter."""
