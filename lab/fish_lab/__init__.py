"""The paper's lab, outside the `fish_tuning` package (not in the wheel): GLUE-6 / GSM8K task loaders, the study
runner of ``configs/*.yaml``, paper-style tables and plots. Run from a source checkout: ``python -m fish_lab``."""
