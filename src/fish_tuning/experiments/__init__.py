"""Experiments: tasks (GLUE-6, GSM8K), metrics, the compare runner and its report."""
