"""Optuna studies over training configs: search spaces, objective, storage, workers, MLflow parent runs."""
