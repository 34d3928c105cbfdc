"""Ray Tune + Optuna searches over ``TrainConfig`` fields, logged to MLflow from the driver.

``schema`` validates the YAML, ``search`` runs the Tuner (each trial one engine run),
``tracking`` writes MLflow runs, ``report`` writes best.yaml, trials.csv and curves.png,
``storage`` says where Ray keeps the search (the search folder, or storage every node reaches).
Importing this package does not import Ray; ``search`` does.
"""
