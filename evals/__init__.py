"""Evaluations of trained models; each module is also a command (python evals/<name>.py --help)."""
