"""Fault counts are per process (``session#K``, ``times=``, ``greylist=``,
``rate=``, ``p=``): with rules, ``record`` runs one worker unless told, and
warns when told more. Real ``record`` processes, smtplib, aiosmtpd."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
from conftest import run_aiosmtpd, smtpproxy_process


@pytest.mark.parametrize("workers, warned", [((), False), (("--workers", "2"), True)])
def test_rules_run_one_worker_unless_told(
    tmp_path: Path, workers: tuple[str, ...], warned: bool
) -> None:
    with run_aiosmtpd() as upstream:
        args = [
            "record", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream.port}",
            "--recordings", str(tmp_path / "r"), "--fault", "mail: 451 4.3.0 once, times=1",
            *workers,
        ]  # fmt: skip
        with smtpproxy_process(*args, cwd=tmp_path) as proxy:
            codes = []
            for _ in range(4):
                with smtplib.SMTP(*proxy.address, timeout=10) as client:
                    client.ehlo("client.example")
                    codes.append(client.docmd("MAIL", "FROM:<ann@example.org>")[0])
            finished = proxy.finish()
    assert ("fault rules count per worker process" in finished.stderr) is warned
    if not warned:
        # one process: "times=1" fired once in all, then the server answered
        assert codes == [451, 250, 250, 250]
        assert "worker processes" not in finished.stderr
