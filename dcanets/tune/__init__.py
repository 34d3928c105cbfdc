"""Ray Tune + Optuna searches over ``TrainConfig`` fields, logged to MLflow from the driver.

``schema`` validates the YAML, ``builders`` makes the Ray and Optuna objects of it, ``search`` runs
the Tuner (each trial one engine run), ``callbacks`` prints progress and follows the trials,
``tracking`` writes MLflow runs, ``state`` owns ``search.json`` and the frozen results, ``report``
writes best.yaml, trials.csv and curves.png, ``storage`` says where Ray keeps the search (the
search folder, or storage every node reaches). Importing this package does not import Ray;
``search``, ``callbacks`` and ``tracking`` do.
"""

__all__ = ["builders", "callbacks", "report", "schema", "search", "state", "storage", "tracking"]
