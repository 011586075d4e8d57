"""Stop strings on streamed text and the context-length policy."""

import pytest

from custom_llm.errors import UserError
from custom_llm.generation.streaming import StopStrings, fit_to_context


def stream(pieces, stops):
    filt = StopStrings(stops)
    shown = []
    for piece in pieces:
        shown.append(filt.push(piece))
        if filt.stopped:
            break
    shown.append(filt.flush())
    return shown, filt.stopped


def test_stop_string_split_across_pieces_is_never_shown():
    shown, stopped = stream(["Hello, wo", "rld", "\n\nUs", "er: hi"], ["\n\nUser:"])
    assert stopped and "".join(shown) == "Hello, world"
    assert shown[:3] == ["Hello, wo", "rld", ""]  # "\n\nUs" held back: it may start the stop string


def test_false_alarm_is_released():
    shown, stopped = stream(["ab", "c", "d"], ["cx"])
    assert not stopped and shown == ["ab", "", "cd", ""]


def test_earliest_of_several_stops_wins():
    shown, stopped = stream(["one END two STOP"], ["STOP", "END"])
    assert stopped and "".join(shown) == "one "


def test_no_stops_passes_through():
    assert stream(["a", "b"], []) == (["a", "b", ""], False)


def test_context_policy():
    assert fit_to_context(10, 20, 64, True) == (20, None)
    room, notice = fit_to_context(60, 20, 64, True)
    assert room == 4 and "at most 4" in notice
    assert fit_to_context(60, 20, 64, False) == (20, None)  # all sliding-window layers: bounded memory
    with pytest.raises(UserError, match="longer than the model's context"):
        fit_to_context(65, 1, 64, False)
    with pytest.raises(UserError, match="no room"):
        fit_to_context(64, 1, 64, True)
