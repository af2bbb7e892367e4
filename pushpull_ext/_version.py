"""The package version, in one place: read by pyproject.toml (setuptools) and re-exported as
pushpull_ext.__version__."""

__version__ = "0.1.0"
