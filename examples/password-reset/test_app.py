"""Tests of app.py with smtpproxy's pytest plugin (installed with smtpproxy).

``test_reset_mail`` passes. ``test_reset_mail_to_a_full_mailbox`` fails on
purpose, to show what pytest reports: the server refuses the recipient (a
fault rule), the application does not handle it, and the report's
"smtp sessions" section shows the session as it crossed the wire.
"""

from __future__ import annotations

import pytest
from app import send_password_reset

from smtpproxy import SyncServer
from smtpproxy.pytest_plugin import assert_session_matches

LINK = "https://example.com/reset/3f9a1c"


def test_reset_mail(smtp_sink: SyncServer) -> None:
    send_password_reset("ann@example.org", LINK, smtp_sink.host, smtp_sink.port)

    [message] = smtp_sink.wait_for_messages(1)
    assert message.sender == "no-reply@example.com"
    assert message.recipients == ("ann@example.org",)
    assert message.message["Subject"] == "Reset your password"
    assert LINK in message.message.get_content()
    # the whole session, step by step, against the one saved in golden/
    # (write it again with: pytest --smtp-update-golden)
    assert_session_matches(smtp_sink.sessions[0], "golden/reset-mail.jsonl")


@pytest.mark.smtp_faults("rcpt: 552 5.2.2 Mailbox full")
def test_reset_mail_to_a_full_mailbox(smtp_sink: SyncServer) -> None:
    # Fails on purpose: app.py lets smtplib's SMTPRecipientsRefused escape.
    send_password_reset("bob@example.org", LINK, smtp_sink.host, smtp_sink.port)

    assert smtp_sink.wait_for_messages(1)
