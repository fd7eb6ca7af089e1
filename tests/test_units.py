import pytest

from orion_cli.errors import InvalidValue
from orion_cli.units import format_bytes, parse_keep_alive, parse_size

GiB = 1024**3


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3GB", 3 * GiB),
        ("3gb", 3 * GiB),
        ("3 GiB", 3 * GiB),
        ("1.5G", int(1.5 * GiB)),
        ("512MB", 512 * 1024**2),
        ("2048", 2048),
        ("1TB", 1024**4),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["banana", "3XB", "", "GB", "-1GB", "0", "3 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidValue) as info:
        parse_size(text, what="--ram")
    assert "--ram" in info.value.one_line()


@pytest.mark.parametrize(
    "text,expected",
    [("300", 300), (300, 300), ("5m", 300), ("1h", 3600), ("never", None), (None, None), (-1, None), ("90s", 90)],
)
def test_parse_keep_alive(text, expected):
    assert parse_keep_alive(text) == expected


def test_parse_keep_alive_rejects():
    with pytest.raises(InvalidValue):
        parse_keep_alive("soon")


def test_format_bytes():
    assert format_bytes(3 * GiB) == "3.0 GiB"
    assert format_bytes(512 * 1024**2) == "512 MiB"
    assert format_bytes(0) == "0 B"
    assert format_bytes(None) == "unknown"


@pytest.mark.parametrize("text", [10**320, "9" * 401, "8785h", 400 * 24 * 3600])
def test_a_keep_alive_past_a_year_is_refused_in_one_line(text):
    """A 321-digit keep_alive given to /api/orion/load was taken, then /api/orion/ps, /metrics and the keep-alive
    timer ended in OverflowError for every model (issue 'a server that lives on', item 4)."""
    with pytest.raises(InvalidValue, match="longer than a year") as caught:
        parse_keep_alive(text)
    assert len(caught.value.message) < 100 and "never" in caught.value.hint


def test_a_year_of_keep_alive_is_taken():
    assert parse_keep_alive("8760h") == 365 * 24 * 3600 and parse_keep_alive(3600) == 3600


@pytest.mark.parametrize("text", ["1" * 401, "1e400", "nan", "NaN", "10000000h", 1e400, float("nan"), float("-inf"),
                                  True, [1], {"s": 1}, "٣٠٠", "３００", "5 minutes", "-5", "1" * 100_000 + "h"])
def test_a_keep_alive_that_is_not_a_bounded_duration_is_refused_in_one_short_line(text):
    """What /api/orion/load hands over as it came in JSON: numbers past a year or not finite (1e400 is
    infinity once parsed, and was taken for 'inf', never), strings that are not durations, other
    types, digits of other scripts; the message quotes at most the start of the value."""
    with pytest.raises(InvalidValue) as caught:
        parse_keep_alive(text)
    assert len(caught.value.one_line()) < 200 and "\n" not in caught.value.one_line()


@pytest.mark.parametrize("text,expected", [("-1", None), ("inf", None), ("never", None), (-1.0, None), (-5, None),
                                           (1.5, 1), ("1.5", 1), (0, 0), ("0s", 0)])
def test_never_and_fractions_of_a_keep_alive(text, expected):
    """-1 and 'inf' mean never, as documented (Ollama's -1); fractions of a second are cut."""
    assert parse_keep_alive(text) == expected


@pytest.mark.parametrize("text", ["9" * 400 + "GB", "1" * 30 + "TB", "３GB"])
def test_a_size_past_any_byte_count_is_refused_not_an_overflow(text):
    with pytest.raises(InvalidValue) as caught:
        parse_size(text, what="--ram")
    assert "--ram" in caught.value.message and len(caught.value.message) < 100
