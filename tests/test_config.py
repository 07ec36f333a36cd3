import pytest

from bitfuse import ConfigError, QuantConfig


def test_defaults_are_valid():
    c = QuantConfig()
    assert (c.bits, c.group_size, c.residual, c.rank, c.outliers, c.target) == (4, 128, False, 0, 0.0, "auto")


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(bits=5), "bits", "(2, 3, 4)"),
        (dict(bits=True), "bits", "(2, 3, 4)"),
        (dict(group_size=48), "group_size", "(32, 64, 128)"),
        (dict(residual=1.5), "residual", "(0, 1]"),
        (dict(residual="yes"), "residual", "(0, 1]"),
        (dict(mixed_bits=(4, 8)), "mixed_bits", "(2, 3, 4)"),
        (dict(mixed_bits=(4,)), "mixed_bits", "at least two"),
        (dict(bits=4, mixed_bits=(2, 3)), "mixed_bits", "must contain bits=4"),
        (dict(avg_bits=3.5), "avg_bits", "[4, 4]"),
        (dict(bits=3, mixed_bits=(2, 3, 4), avg_bits=4.5), "avg_bits", "[2, 4]"),
        (dict(rank=-1), "rank", ">= 0"),
        (dict(rank=2.0), "rank", ">= 0"),
        (dict(outliers=0.2), "outliers", "[0, 0.05]"),
        (dict(outliers=float("nan")), "outliers", "[0, 0.05]"),
        (dict(target="a100"), "target", "'orin'"),
        (dict(convs=1), "convs", "True or False"),
    ],
)
def test_validation_names_field_and_allowed_values(kwargs, field, allowed):
    with pytest.raises(ConfigError) as e:
        QuantConfig(**kwargs)
    msg = str(e.value)
    assert f"QuantConfig.{field}" in msg and allowed in msg


def test_dict_round_trip():
    c = QuantConfig(bits=3, group_size=64, residual=0.25, mixed_bits=[4, 2, 3], avg_bits=3,
                    rank=16, outliers=0.005, target="orin")
    assert c.mixed_bits == (2, 3, 4)
    assert QuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown fields"):
        QuantConfig.from_dict({**c.to_dict(), "bogus": 1})
