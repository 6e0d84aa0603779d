"""SMTP conversations used across the tests, as (side, bytes) steps.

The first three are the transcripts of the seed document this project grew
from ("SMTP, testing via Telnet"): the plain session, AUTH PLAIN and AUTH
LOGIN with its base64 334 challenges, with CRLF line ends as telnet sends.
"""

from __future__ import annotations

from smtpproxy.events import Side

C, S = Side.CLIENT, Side.SERVER

SEED_PLAIN_SESSION = [
    (S, b"220 ESMTP\r\n"),
    (C, b"HELO justtesting\r\n"),
    (S, b"250 \r\n"),
    (C, b"MAIL FROM: me@telnettingin.com\r\n"),
    (S, b"250 ok\r\n"),
    (C, b"RCPT TO: postmaster@mail.getsdeliveredhere.net\r\n"),
    (S, b"250 ok\r\n"),
    (C, b"DATA\r\n"),
    (S, b"354 go ahead\r\n"),
    (
        C,
        b"To: postmaster@mail.getsdeliveredhere.net\r\n"
        b"From: telnetclient@mail.getsdeliveredhere.net\r\n"
        b"Subject: this is a test message\r\n"
        b"Date: Thu, 21 Jun 2007 11:11:40 -0400\r\n"
        b"\r\n"
        b"Just testing SMTP functionality by telnetting in to port 25. I'll end this\r\n"
        b"message now by entering in a line with nothing but a period in it and\r\n"
        b"hitting return.\r\n"
        b".\r\n",
    ),
    (S, b"250 ok 1103093638 qp 87827\r\n"),
    (C, b"QUIT\r\n"),
    (S, b"221 Connection closed by foreign host.\r\n"),
]

SEED_EHLO = [
    (S, b"220 mail.server.local ESMTP\r\n"),
    (C, b"ehlo test\r\n"),
    (
        S,
        b"250-mail.server.local\r\n250-AUTH LOGIN PLAIN\r\n250-AUTH LOGIN PLAIN\r\n"
        b"250-STARTTLS\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
    ),
]

SEED_AUTH_PLAIN = SEED_EHLO + [
    (C, b"AUTH PLAIN AHVzZXJAZG9tYWluLmNvbQBwYXNzd29yZA==\r\n"),
    (S, b"235 ok, go ahead (#2.0.0)\r\n"),
    (C, b"QUIT\r\n"),
    (S, b"221 bye\r\n"),
]

SEED_AUTH_LOGIN = SEED_EHLO + [
    (C, b"AUTH LOGIN\r\n"),
    (S, b"334 VXNlcm5hbWU6\r\n"),
    (C, b"dXNlckBkb21haW4uY29t\r\n"),
    (S, b"334 UGFzc3dvcmQ6\r\n"),
    (C, b"cGFzc3dvcmQ=\r\n"),
    (S, b"235 2.0.0 Authentication successful\r\n"),
    (C, b"QUIT\r\n"),
    (S, b"221 bye\r\n"),
]

PIPELINED = [
    (S, b"220 mx.example ESMTP\r\n"),
    (C, b"EHLO client.example\r\n"),
    (S, b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250 CHUNKING\r\n"),
    (
        C,
        b"MAIL FROM:<a@example.org> SIZE=40\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n",
    ),
    (
        S,
        b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 <c@example.net>: no such user\r\n354 go on\r\n",
    ),
    (C, b"Subject: pipe\r\n\r\n..leading dot\r\nline\r\n.\r\nQUIT\r\n"),
    (S, b"250 2.0.0 queued as 1234\r\n221 2.0.0 bye\r\n"),
]

BDAT_SESSION = [
    (S, b"220 mx.example ESMTP\r\n"),
    (C, b"EHLO c\r\n"),
    (S, b"250-mx.example\r\n250-CHUNKING\r\n250 PIPELINING\r\n"),
    (C, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 23\r\nSubject: b\r\n\r\nQUIT\r\n.\r\n"),
    (S, b"250 ok\r\n250 ok\r\n250 2.0.0 23 octets\r\n"),
    (C, b"BDAT 6 LAST\r\nRSET\r\n"),
    (S, b"250 2.0.0 queued\r\n"),
    (C, b"QUIT\r\n"),
    (S, b"221 bye\r\n"),
]

SCRIPTS = {
    "seed_plain": SEED_PLAIN_SESSION,
    "seed_auth_plain": SEED_AUTH_PLAIN,
    "seed_auth_login": SEED_AUTH_LOGIN,
    "pipelined": PIPELINED,
    "bdat": BDAT_SESSION,
}
