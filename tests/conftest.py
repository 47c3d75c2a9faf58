"""Shared by every test file. Under pytest-xdist (./test.sh runs one worker per core), each worker keeps to one
thread, so that the workers do not fight over the cores; subprocesses inherit it unless a test sets its own."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
