"""Build script: the pure-Python package (the CUDA extension joins in its own step)."""

from setuptools import setup

setup()
