"""NeMo-RL's response-dataset registry, reduced to the names our cluster configs use (main has about 40)."""

DATASET_REGISTRY = {"DAPOMath17K": object, "DAPOMathAIME2024": object, "AIME2024": object, "OpenMathInstruct-2": object}
