"""Workstation side: data loading, few-shot splits, generators, detectors and evaluation.

Importing this package imports nothing heavy; the torch modules are imported by the
submodules that need them.
"""
