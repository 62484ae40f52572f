"""Shared test support for attention-edit (importable as `ae_testlib` once tests/ is on sys.path)."""
