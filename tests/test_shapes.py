"""The one shape parser shared by the engine, the CLI and the widgets."""

import argparse

import numpy as np
import pytest

from napari_emseg._shapes import parse_shape
from napari_emseg.cli.common import shape


@pytest.mark.parametrize("value", ["8,64,64", "8x64x64", " 8, 64 64 ", "8X64X64",
                                   (8, 64, 64), [8, 64, 64], np.array([8, 64, 64]),
                                   ("8", "64", "64"), (8.0, 64, 64)])
def test_accepted_forms(value):
    assert parse_shape(value, 3, "patch") == (8, 64, 64)


@pytest.mark.parametrize("value", [64, "64", (64,), np.int64(64)])
def test_one_value_stands_for_every_axis(value):
    assert parse_shape(value, 3) == (64, 64, 64)


def test_several_lengths_take_no_single_value():
    assert parse_shape("64,64", (2, 3)) == (64, 64)
    assert parse_shape("64", (1, 2, 3)) == (64,)
    with pytest.raises(ValueError, match=r"2 or 3 integers >= 1 .*\(1 value\)"):
        parse_shape("64", (2, 3))


def test_minimum():
    assert parse_shape("0,4,4", 3, "halo", minimum=0) == (0, 4, 4)
    with pytest.raises(ValueError, match="0 is below 1"):
        parse_shape("0,64,64", 3)


@pytest.mark.parametrize(("value", "problem"), [
    ("big", "'big' is not an integer"),
    ("8,2.5,4", "'2.5' is not an integer"),
    ((8, 2.5, 4), "2.5 is not an integer"),
    (None, "None is not an integer"),
    ("", "no values"),
    ("8,64,64,64", "4 values"),
    ((8, 64), "2 values"),
    ("-1,64,64", "-1 is below 1"),
])
def test_bad_input_gives_one_clear_message(value, problem):
    with pytest.raises(ValueError) as info:
        parse_shape(value, 3, "block_shape")
    assert str(info.value) == ("block_shape must be an integer or 3 integers >= 1 "
                               f"(e.g. '64,64,64'), got {value!r} ({problem})")


def test_cli_wrapper_raises_argparse_errors():
    parse = shape((2, 3), name="patch")
    assert parse("32x128x128") == (32, 128, 128) and parse.__name__ == "patch"
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be 2 or 3 integers >= 1"):
        parse("big")
    assert shape(3, minimum=0)("0") == (0, 0, 0)
