from __future__ import annotations

import inspect
import random

import numpy as np
import pytest
import torch

import distckpt
from distckpt import CheckpointError, RNGState


def test_all_lists_exactly_the_public_names() -> None:
    # dir(), not vars(): the names whose modules import torch are loaded on first use (PEP 562).
    public = {n for n in dir(distckpt) if not n.startswith("_") and not inspect.ismodule(getattr(distckpt, n))}
    public.discard("annotations")
    assert set(distckpt.__all__) == public | {"__version__"}
    for name in ["SharingPattern", "ValidationLevel", "StateComponent", "CheckpointCoordinator", "ComponentManifest",
                 "CheckpointManifest", "RNGState", "LoadReport", "CheckpointError", "ManifestError", "IntegrityError",
                 "ReplicationMismatchError", "TopologyMismatchError", "ComponentMismatchError", "CrossRankError",
                 "verify_checkpoint", "VerificationReport", "VerificationProblem", "diff_checkpoints", "DiffReport"]:
        assert name in distckpt.__all__
        assert getattr(distckpt, name) is not None


def test_the_lazily_loaded_names_are_the_classes_of_their_modules() -> None:
    from distckpt.comparison import DiffReport, diff_checkpoints
    from distckpt.coordinator import CheckpointCoordinator
    from distckpt.rng import RNGState as RNGStateClass

    assert distckpt.CheckpointCoordinator is CheckpointCoordinator
    assert distckpt.RNGState is RNGStateClass
    assert distckpt.diff_checkpoints is diff_checkpoints and distckpt.DiffReport is DiffReport
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        distckpt.NoSuchName  # noqa: B018


def test_every_error_is_a_checkpoint_error_and_a_builtin() -> None:
    for name in distckpt.__all__:
        obj = getattr(distckpt, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, CheckpointError)
            if obj is not CheckpointError:
                assert any(b.__module__ == "builtins" and b is not Exception for b in obj.__mro__), name


def test_coordinator_signature_keeps_the_documented_names() -> None:
    sig = inspect.signature(distckpt.CheckpointCoordinator)
    assert list(sig.parameters)[:4] == ["state_components", "process_groups", "dist", "output_dir"]
    save = inspect.signature(distckpt.CheckpointCoordinator.save_checkpoint)
    assert list(save.parameters)[1:4] == ["checkpoint_path", "checkpoint_id", "validate"]
    load = inspect.signature(distckpt.CheckpointCoordinator.load_checkpoint)
    assert list(load.parameters)[1:3] == ["checkpoint_path", "strict"]


def test_rng_state_restores_python_numpy_and_torch_generators() -> None:
    rng = RNGState()
    saved = rng.state_dict()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(5)
    rng.load_state_dict(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_rng_state_survives_the_codec() -> None:
    from distckpt.codec import decode, encode

    rng = RNGState()
    saved = decode(bytearray(encode(rng.state_dict()).to_bytes()))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    rng.load_state_dict(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
