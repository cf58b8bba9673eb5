"""Shared fixtures: the synthetic tiny checkpoint is written once per test session."""
import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from omni2.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from omni2.model.bundle import load_model

    return load_model(tiny_checkpoint)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped, with the reason, on machines without it (CI)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
