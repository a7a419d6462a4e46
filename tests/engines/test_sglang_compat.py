"""The SGLang version gate (engines/sglang/compat.py): an SGLang outside the tested range is refused
with a typed error before an engine is built, unless ROLLWIRE_SGLANG_ANY_VERSION=1 (then a warning).
Needs no SGLang: the check takes the version string."""

from __future__ import annotations

import logging

import pytest

from rollwire.engines.sglang import compat


@pytest.mark.parametrize("found", ["0.5.15", "0.5.15.post1", "0.5.16rc0", "0.5.99"])
def test_versions_in_the_tested_range_are_accepted(found: str) -> None:
    compat.check_version(found, environ={})


@pytest.mark.parametrize("found", ["0.5.14", "0.5.6", "0.6.0", "1.0", "unknown", ""])
def test_versions_outside_the_tested_range_raise_a_typed_error_naming_the_range_and_the_override(found: str) -> None:
    with pytest.raises(compat.UnsupportedSGLangVersion) as err:
        compat.check_version(found, environ={})
    assert err.value.found == found
    assert ">=0.5.15,<0.6" in str(err.value) and compat.ANY_VERSION_ENV in str(err.value)


def test_the_override_lets_an_untested_version_run_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rollwire.engines.sglang"):
        compat.check_version("0.6.1", environ={compat.ANY_VERSION_ENV: "1"})
    assert "outside the tested range" in caplog.text
    with pytest.raises(compat.UnsupportedSGLangVersion):
        compat.check_version("0.6.1", environ={compat.ANY_VERSION_ENV: "0"})
