"""Configuration: Hydra composition (driver only) and the typed specs workers receive."""
