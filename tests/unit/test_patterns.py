from __future__ import annotations

import pytest
import torch

from distckpt import SharingPattern, StateComponent, ValidationLevel


class Box:
    def __init__(self, state: object = None) -> None:
        self.state = state

    def state_dict(self) -> object:
        return self.state

    def load_state_dict(self, state: object) -> None:
        self.state = state


def test_patterns_and_levels_accept_their_string_values_in_any_case() -> None:
    assert SharingPattern.coerce("PER_GROUP") is SharingPattern.PER_GROUP
    assert ValidationLevel.coerce("Full") is ValidationLevel.FULL
    assert SharingPattern.GLOBAL == "global"


def test_a_declaration_normalises_strings_to_enums() -> None:
    c = StateComponent("model", Box(), "replicated", validate_replication=True, validation_level="quick")
    assert c.sharing_pattern is SharingPattern.REPLICATED
    assert c.validation_level is ValidationLevel.QUICK
    assert dict(c.metadata or {}) == {}


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/abs", "", ".", "..", "a\x00b", "a\\b", "x" * 129, "-lead", "a b"])
def test_unsafe_keys_are_rejected_at_declaration_naming_the_field(key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        StateComponent(key, Box(), SharingPattern.GLOBAL)


def test_per_group_needs_a_group_name_and_other_patterns_refuse_one() -> None:
    with pytest.raises(ValueError, match="process_group_name"):
        StateComponent("m", Box(), SharingPattern.PER_GROUP)
    with pytest.raises(ValueError, match="process_group_name"):
        StateComponent("m", Box(), SharingPattern.REPLICATED, process_group_name="dp")
    with pytest.raises(ValueError, match="process_group_name"):
        StateComponent("m", Box(), SharingPattern.PER_GROUP, process_group_name="../dp")


@pytest.mark.parametrize("pattern", [SharingPattern.GLOBAL, SharingPattern.PER_RANK])
def test_validation_is_refused_on_patterns_without_replicas(pattern: SharingPattern) -> None:
    with pytest.raises(ValueError, match="validate_replication"):
        StateComponent("m", Box(), pattern, validate_replication=True)


def test_unknown_levels_and_patterns_name_the_field() -> None:
    with pytest.raises(ValueError, match="validation_level"):
        StateComponent("m", Box(), "replicated", validation_level="paranoid")
    with pytest.raises(ValueError, match="sharing_pattern"):
        StateComponent("m", Box(), "sometimes")


def test_a_stateful_without_state_dict_is_rejected() -> None:
    with pytest.raises(ValueError, match="stateful"):
        StateComponent("m", object(), "global")  # type: ignore[arg-type]


def test_declarations_are_frozen() -> None:
    c = StateComponent("m", torch.nn.Linear(1, 1), "global")
    with pytest.raises(AttributeError):
        c.key = "other"  # type: ignore[misc]


def test_metadata_must_be_plain_json_because_it_goes_into_the_manifest() -> None:
    assert dict(StateComponent("m", Box(), "global", metadata={"note": [1, "x"]}).metadata or {}) == {"note": [1, "x"]}
    with pytest.raises(ValueError, match="metadata"):
        StateComponent("m", Box(), "global", metadata={"t": torch.zeros(1)})
