import math

import pytest

from memplan import InvalidSize, MemplanError, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * 2**30),
        ("24 GiB", 24 * 2**30),
        ("24gib", 24 * 2**30),
        ("1.5 GB", 1_500_000_000),
        ("1.5GB", 1_500_000_000),
        ("64G", 64 * 2**30),
        ("512Mi", 512 * 2**20),
        ("2TiB", 2 * 2**40),
        ("3 KB", 3000),
        ("4KiB", 4096),
        ("100", 100),
        ("100B", 100),
        (" 7 MiB ", 7 * 2**20),
        ("1.5e9", 1_500_000_000),
        ("0", 0),
        ("0.5KiB", 512),
        ("1PiB", 2**50),
        (1024, 1024),
        (1.5e9, 1_500_000_000),
    ],
)
def test_parse_size_accepts_what_people_type(text: str | int | float, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "-1GiB",
        "-5",
        -1,
        -0.5,
        "nan",
        "inf",
        math.nan,
        math.inf,
        "12 parsecs",
        "GiB",
        "1..5G",
        "1GiBs",
        "0x10",
        "1,5GB",
        True,
        None,
        "1e400",
        2**64,
        "1 2 GB",
    ],
)
def test_parse_size_rejects_with_a_typed_error(bad: object) -> None:
    with pytest.raises(InvalidSize) as info:
        parse_size(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, MemplanError)
    assert info.value.value is bad or info.value.value == bad or math.isnan(info.value.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (24 * 2**30, "24.0 GiB"),
        (int(1.5 * 2**40), "1.5 TiB"),
        (3 * 2**50, "3.0 PiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_format_then_parse_round_trips_to_the_displayed_precision() -> None:
    for n in (2**20, 24 * 2**30, 80 * 2**30 + 123):
        assert abs(parse_size(format_size(n, precision=3)) - n) <= n * 1e-3
