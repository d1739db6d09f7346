"""Experiments: methods x seeds as one job (harness, jobs), their statistics, tables, plots and the
run-to-run comparison."""
