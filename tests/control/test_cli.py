"""The `kubespan` command line (the parts that need no running agent)."""

from __future__ import annotations

import pytest

from control.cli import get_main


def test_get_refuses_a_bad_link_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        get_main(["kubespanpeerstatuses", "--link", "bad/name"])
    assert exit_.value.code == 2
    assert "invalid interface name 'bad/name': contains '/'" in capsys.readouterr().err
