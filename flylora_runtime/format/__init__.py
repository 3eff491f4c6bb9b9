"""The adapter format, torch-free: the config, the base-model spec, the checkpoint validator, its errors.

Safe for the gateway to import (a contract the test suite checks): nothing here imports torch or vLLM, and
nothing is ever unpickled.
"""
