"""The project's command-line tools, installed as entry points (``scripts/<module>.py`` runs the same in a checkout):

* ``arsq-demos`` (:mod:`.make_demos`): Meta-World scripted-expert and mixed-quality datasets;
* ``arsq-dataset`` (:mod:`.make_dataset`): D4RL-layout datasets from policies this project trains;
* ``arsq-compare`` (:mod:`.compare`): configs x seeds, trained and tabulated from MLflow;
* ``arsq-benchmark`` (:mod:`.benchmark`): the Meta-World ARSQ-vs-CQN learning benchmark of docs/benchmark.md;
* ``arsq-bench`` (:mod:`.bench`): update and acting speed against :mod:`.reference`, the slow per-position
  implementation the tests also check against.
"""
