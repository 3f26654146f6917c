import dataclasses

import pytest

from torchslim.config import Config, register_config, registered_configs
from torchslim.errors import ConfigError


@register_config("toy-config")
@dataclasses.dataclass(frozen=True)
class ToyConfig(Config):
    bits: int = 4
    amount: float = 0.5
    scope: str = "global"
    sizes: tuple[int, ...] = (1, 32)

    def validate(self) -> None:
        self.check_int("bits", 2, 8)
        self.check_float("amount", 0.0, 1.0, hi_inclusive=False)
        self.check_choice("scope", ("global", "layer"))


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("bits", 9, "an integer in [2, 8]"),
        ("bits", 1, "an integer in [2, 8]"),
        ("bits", True, "an integer in [2, 8]"),
        ("bits", 4.0, "an integer in [2, 8]"),
        ("amount", 1.0, "a number in [0.0, 1.0)"),
        ("amount", float("nan"), "a number in [0.0, 1.0)"),
        ("amount", -0.1, "a number in [0.0, 1.0)"),
        ("scope", "neuronal", "one of 'global', 'layer'"),
    ],
)
def test_invalid_field_names_field_value_and_allowed_range(field, value, allowed):
    with pytest.raises(ValueError) as info:
        ToyConfig(**{field: value})
    assert isinstance(info.value, ConfigError)
    message = str(info.value)
    assert f"ToyConfig.{field} = {value!r}" in message
    assert allowed in message


def test_round_trip_through_dict_keeps_values_and_type():
    config = ToyConfig(bits=3, amount=0.25, scope="layer", sizes=(1, 8))
    data = config.to_dict()
    assert data == {"type": "toy-config", "bits": 3, "amount": 0.25, "scope": "layer", "sizes": [1, 8]}
    assert Config.from_dict(data) == config
    assert ToyConfig.from_dict(data) == config
    assert registered_configs()["toy-config"] is ToyConfig


def test_from_dict_rejects_unknown_field_and_type():
    with pytest.raises(ConfigError, match=r"ToyConfig.bitz is not a field: expected one of amount, bits"):
        ToyConfig.from_dict({"bitz": 3})
    with pytest.raises(ConfigError, match=r"config type = 'nope' is invalid"):
        Config.from_dict({"type": "nope"})
    with pytest.raises(ConfigError, match=r"expected 'toy-config'"):
        ToyConfig.from_dict({"type": "other"})
    with pytest.raises(ConfigError, match="bits = 12"):
        Config.from_dict({"type": "toy-config", "bits": 12})


def test_configs_are_frozen_and_replace_validates():
    config = ToyConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bits = 5  # type: ignore[misc]
    assert config.replace(bits=5).bits == 5
    with pytest.raises(ConfigError, match="bits = 0"):
        config.replace(bits=0)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_config("toy-config")(type("Other", (ToyConfig,), {}))
