from __future__ import annotations

import pytest

from cxrelay.core.errors import PermanentError
from cxrelay.core.urls import path_segment, redact_url


@pytest.mark.parametrize("value", ["", ".", "..", "...."])
def test_dot_segments_and_empty_are_refused(value: str) -> None:
    with pytest.raises(PermanentError):
        path_segment(value)


def test_segments_are_percent_encoded_whole() -> None:
    assert path_segment("a/b?c#d e") == "a%2Fb%3Fc%23d%20e"
    assert path_segment("..a") == "..a"  # not a dot-segment: stays one segment


def test_redact_url_removes_user_info_and_credential_parameters() -> None:
    url = "https://bob:s3cret@hooks.example.com:8443/in?api_key=k1&token=t1&team=a"
    redacted = redact_url(url)
    assert "bob" not in redacted and "s3cret" not in redacted
    assert "k1" not in redacted and "t1" not in redacted
    assert redacted == "https://***@hooks.example.com:8443/in?api_key=***&token=***&team=a"
    assert redact_url("https://hooks.example.com/in") == "https://hooks.example.com/in"
