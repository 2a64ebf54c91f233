"""pyproject.toml as setuptools reads it when `make` installs the package."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_uses_no_deprecated_setuptools_form():
    """setuptools announces a date after which deprecated forms (a `license` table, for one)
    stop building; as errors here, such a form fails this test instead of a later install."""
    pytest.importorskip("setuptools", minversion="77")
    from setuptools.config import pyprojecttoml
    from setuptools.dist import Distribution

    dist = Distribution()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyprojecttoml.apply_configuration(dist, str(REPO / "pyproject.toml"))
    assert dist.metadata.license_expression == "Apache-2.0"
    assert dist.metadata.name == "avsa"
