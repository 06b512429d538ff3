"""Tests of Torpor nodes on a Ray cluster (torpor.cluster): `pytest -m cluster` selects them."""

from __future__ import annotations


def pytest_configure(config):
    # registered here so the marker is known wherever these tests are collected from
    config.addinivalue_line("markers", "cluster: starts a Ray cluster on this machine (needs ray; about a minute)")
