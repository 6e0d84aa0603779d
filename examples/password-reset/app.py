"""A tiny application that sends a password-reset mail with smtplib.

The SMTP server comes from the arguments or the environment (SMTP_HOST,
SMTP_PORT), as an application's settings would: the tests point it at the
smtp_sink fixture.

    python app.py ann@example.org https://example.com/reset/abc --host 127.0.0.1 --port 2525
"""

from __future__ import annotations

import argparse
import os
import smtplib
from email.message import EmailMessage

SENDER = "no-reply@example.com"


def reset_mail(to: str, link: str) -> EmailMessage:
    """The password-reset message for ``to``."""
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = "Reset your password"
    msg.set_content(
        f"Someone asked to reset your password.\n\nFollow {link} to choose a new one.\n"
    )
    return msg


def send_password_reset(
    to: str, link: str, host: str | None = None, port: int | None = None
) -> None:
    """Send the reset mail through the SMTP server at ``host:port``
    (default: $SMTP_HOST and $SMTP_PORT, else localhost:25)."""
    host = host or os.environ.get("SMTP_HOST", "localhost")
    port = port or int(os.environ.get("SMTP_PORT", "25"))
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.send_message(reset_mail(to, link))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Send a password-reset mail.")
    parser.add_argument("to")
    parser.add_argument("link")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    send_password_reset(args.to, args.link, args.host, args.port)


if __name__ == "__main__":
    main()
