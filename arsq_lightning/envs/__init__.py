"""Environments: ``core`` builds any env id as a TorchRL env (gymnasium ids directly, ``<suite>:<task>`` through the
suite's own module: ``metaworld``, ``dmc``, ``rlbench``, each imported only when used)."""
