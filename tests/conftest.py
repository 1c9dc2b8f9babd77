"""Fixtures shared by every test module."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real public reference files live beside the checkout (../shared/real), never inside it.
SHARED_REAL = REPO.parent / "shared" / "real"


# Where the stages write by default; a test writes under its tmp_path instead, so that
# nothing it leaves behind is reused (or tripped over) by a later run in the same checkout.
OUTPUT_ROOTS = (REPO / "data/processed", REPO / "runs")


def _outputs() -> set[Path]:
    return {p for root in OUTPUT_ROOTS if root.is_dir() for p in root.glob("*/*")}


@pytest.fixture(scope="session", autouse=True)
def tests_write_nothing_into_the_checkout():
    before = _outputs()
    yield
    new = sorted(str(p.relative_to(REPO)) for p in _outputs() - before)
    assert not new, f"tests wrote into the checkout's output directories: {new}"


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a shared CPU they spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_real() -> Path:
    """``../shared/real``; tests that read it are skipped, with a message, when it is absent."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real reference files not found at {SHARED_REAL}")
    return SHARED_REAL


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The sample preset's tiny RoBERTa (built once from data/sample, then reused)."""
    from kadapter.tiny import ensure_tiny_model

    return ensure_tiny_model(REPO / "data/models/tiny-roberta", REPO / "data/sample")
