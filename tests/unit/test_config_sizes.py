import pytest

from lxd_daemon.util.sizes import format_byte_size, parse_bit_size, parse_byte_size


@pytest.mark.parametrize("text,expected", [
    ("0", 0), ("4096", 4096), ("10B", 10), ("10 bytes", 10),
    ("1kB", 1000), ("1KiB", 1024), ("2MB", 2_000_000), ("2MiB", 2 * 1024 ** 2),
    ("1GB", 10 ** 9), ("1GiB", 1024 ** 3), ("3TB", 3 * 10 ** 12), ("1TiB", 1024 ** 4),
    ("1PiB", 1024 ** 5), ("1EB", 10 ** 18),
])
def test_parse_byte_size_both_unit_families(text, expected):
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "1.5GB", "1 GB", "1gb", "1KB", "1Mi", "-1MB", "1XB", "10EiB", "abc"])
def test_parse_byte_size_refuses(text):
    with pytest.raises(ValueError):
        parse_byte_size(text)


@pytest.mark.parametrize("text,expected", [
    ("100", 100), ("100bit", 100), ("1kbit", 1000), ("1Kibit", 1024), ("10Mbit", 10 ** 7), ("1Gibit", 1024 ** 3),
])
def test_parse_bit_size(text, expected):
    assert parse_bit_size(text) == expected


def test_parse_bit_size_refuses_bytes_units():
    with pytest.raises(ValueError):
        parse_bit_size("1MB")


def test_format_byte_size():
    assert format_byte_size(512 * 1024 ** 2) == "512MiB"
    assert format_byte_size(1024 ** 3) == "1GiB"
    assert format_byte_size(1000) == "1000B"
