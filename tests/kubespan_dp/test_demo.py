"""The in-memory demo runs and shows a clean handshake, rekey and no drops."""

from __future__ import annotations

from kubespan_dp import demo


def test_demo_runs(capsys) -> None:
    assert demo.main(["--packets", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("handshake complete") == 4  # first handshake and the rekey
    assert "tunnel packet b'after rekey'" in out and "tunnel packet b'ack'" in out
    assert out.count("drops none") == 2
