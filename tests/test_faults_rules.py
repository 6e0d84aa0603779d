"""The fault rule language and its matcher (smtpproxy/faults.py), without I/O:
each grammar mistake refused with the rule quoted, the column and an example;
the matcher's occurrences, selectors and options on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpproxy.faults import (
    ActionKind,
    Fault,
    FaultPlan,
    FaultSource,
    FaultSyntaxError,
    load_rules,
    parse_rule,
)

# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("rule", "fault"),
    [
        (
            "rcpt#2: 452 4.5.3 Too many recipients",
            Fault("rcpt#2: 452 4.5.3 Too many recipients", ActionKind.REPLY, 452, "4.5.3 Too many recipients"),
        ),
        ("dot: replace 451 4.3.0 Lost", Fault("dot: replace 451 4.3.0 Lost", ActionKind.REPLACE, 451, "4.3.0 Lost")),
        ("greeting: delay 500ms", Fault("greeting: delay 500ms", ActionKind.DELAY, seconds=0.5)),
        ("mail: delay 2m", Fault("mail: delay 2m", ActionKind.DELAY, seconds=120.0)),
        ("quit: stall", Fault("quit: stall", ActionKind.STALL)),
        ("data: close", Fault("data: close", ActionKind.CLOSE)),
        ("any#5: reset", Fault("any#5: reset", ActionKind.RESET)),
        ("body: throttle 10KiB/s", Fault("body: throttle 10KiB/s", ActionKind.THROTTLE, rate=10240)),
        (
            "ehlo: remove pipelining CHUNKING",
            Fault("ehlo: remove pipelining CHUNKING", ActionKind.REMOVE, capabilities=("PIPELINING", "CHUNKING")),
        ),
        ("ehlo: add SMTPUTF8", Fault("ehlo: add SMTPUTF8", ActionKind.ADD, capabilities=("SMTPUTF8",))),
        ("tls: abort", Fault("tls: abort", ActionKind.TLS_ABORT)),
        ("tls: cert wrong-name", Fault("tls: cert wrong-name", ActionKind.TLS_CERT, cert="wrong-name")),
        ("connect: 421", Fault("connect: 421", ActionKind.REPLY, 421, "")),
    ],
)  # fmt: skip
def test_actions_parse(rule: str, fault: Fault) -> None:
    assert parse_rule(rule).fault == fault


def test_a_rule_with_every_part() -> None:
    rule = parse_rule(
        "session#3 message#2 to=*@Example.org from=ann@* client=127.0.0.2 "
        "rcpt#2: 451 4.7.1 Greylisted, come back later, times=2, greylist=60s"
    )
    assert (rule.step, rule.nth, rule.session, rule.message) == ("rcpt", 2, 3, 2)
    assert rule.match == (("to", "*@example.org"), ("from", "ann@*"), ("client", "127.0.0.2"))
    # the reply's text keeps its comma: options start at the first ", name=value"
    assert rule.fault.text == "4.7.1 Greylisted, come back later"
    assert (rule.times, rule.greylist) == (2, 60.0)
    assert parse_rule("body@64KiB: close").body_at == 65536
    assert parse_rule("mail: 421 4.7.0 Slow down, rate=100/min").rate == (100, 60.0)
    chance = parse_rule("rcpt: 452 4.5.3 No, p=0.05, seed=7")
    assert (chance.p, chance.seed) == (0.05, 7)
    assert parse_rule("client=::1 rcpt : 452 x").match == (("client", "::1"),)
    assert parse_rule("Rcpt#2:452 x").fault.code == 452


EXAMPLE = "rcpt#2: 452 4.5.3 Too many recipients"


@pytest.mark.parametrize(
    ("rule", "column", "problem"),
    [
        ("rcp: 452 4.5.3 Too many", 1, "unknown step 'rcp'"),
        ("rcpt#x: 452 4.5.3 Too many", 6, "the occurrence after '#' must be a number"),
        ("rcpt#0: 452 4.5.3 Too many", 6, "the occurrence after '#' must be a number"),
        ("rcpt#: 452 4.5.3 Too many", 6, "the occurrence after '#' must be a number"),
        ("rcpt: 700 4.5.3 Too many", 7, "reply code 700 is outside 200-599"),
        ("rcpt: 199 Too early", 7, "reply code 199 is outside 200-599"),
        ("rcpt: 45 Too short", 7, "'45' is not a three-digit reply code"),
        ("rcpt#2 452 4.5.3 Too many", 7, "a ':' must follow the step"),
        ("rcpt", 5, "a ':' must follow the step"),
        ("rcpt:", 6, "an action must follow the ':'"),
        ("rcpt: remove PIPELINING", 7, "step 'rcpt' cannot take 'remove'"),
        ("mail: cert expired", 7, "step 'mail' cannot take 'cert'"),
        ("dot: abort", 6, "step 'dot' cannot take 'abort'"),
        ("connect: replace 421 x", 10, "step 'connect' cannot take 'replace'"),
        ("body: 552 too big", 7, "step 'body' cannot take 'reply'"),
        ("rcpt: explode", 7, "unknown action 'explode'"),
        ("rcpt: replace", 14, "a reply code must follow"),
        ("greeting: delay 5", 17, "'5' is not a duration"),
        ("greeting: delay", 16, "'delay' takes one duration"),
        ("dot: throttle fast", 15, "'fast' is not a rate like 10KiB/s"),
        ("ehlo: remove", 13, "'remove' needs EHLO keywords"),
        ("ehlo: add SMTP_UTF8", 11, "'SMTP_UTF8' is not an EHLO keyword"),
        ("tls: cert old", 11, "'old' is not one of expired, wrong-name, self-signed"),
        ("quit: stall now", 13, "'stall' takes nothing after it"),
        ("rcpt: 452 x, often=3", 14, "unknown option 'often'"),
        ("rcpt: 452 x, times=two", 20, "times= wants a whole number"),
        ("rcpt: 452 x, times=1, times=2", 23, "option times= is given twice"),
        ("rcpt: 452 x, p=1.5", 16, "p= wants a chance from 0 to 1"),
        ("rcpt: 452 x, seed=7", 14, "seed= goes with p="),
        ("rcpt: 452 x, greylist=soon", 23, "greylist= wants a duration"),
        ("rcpt: delay 1s, greylist=60s", 17, "greylist= goes with a reply"),
        ("mail: 421 x, rate=100", 19, "rate= wants a count per time"),
        ("rcpt@5: 452 x", 5, "only 'body' takes '@SIZE'"),
        ("body@lots: close", 6, "'lots' is not a size like 64KiB"),
        ("rcpt#2x: 452 x", 6, "the occurrence after '#' must be a number"),
        ("color=red rcpt: 452 x", 1, "unknown selector 'color'"),
        ("to= rcpt: 452 x", 4, "selector to= needs a value"),
        ("session#two rcpt: 452 x", 9, "the occurrence after '#' must be a number"),
        ("to=*@example.org", 17, "a step is missing"),
        ("", 1, "the rule is empty"),
    ],
)
def test_grammar_mistakes_are_refused_with_the_column(rule: str, column: int, problem: str) -> None:
    with pytest.raises(FaultSyntaxError) as caught:
        parse_rule(rule)
    exc = caught.value
    message = str(exc)
    assert "\n" not in message
    assert message.startswith(f"bad fault rule {rule!r}: column {column}: ")
    assert problem in message
    assert exc.column == column
    # the example offered is itself a valid rule
    assert "(example: '" in message
    parse_rule(exc.example)


def test_rules_file(tmp_path: Path) -> None:
    path = tmp_path / "faults.toml"
    path.write_text(
        '[[fault]]\nrule = "ehlo: remove CHUNKING"\n\n[[fault]]\nrule = "dot: replace 451 4.3.0 Lost"\n'
    )
    rules = load_rules(["rcpt#2: 452 4.5.3 Too many recipients"], path)
    assert [r.step for r in rules] == ["rcpt", "ehlo", "dot"]
    assert FaultSource(("quit: close",), path).load()[0].step == "quit"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[[fault]]\nrule = 'rcpt#x: 452 x'\n", "bad fault rule 'rcpt#x: 452 x': column 6"),
        ("[[fault]]\nrule = \n", "not valid TOML"),
        ("[[fault]]\nstep = 'rcpt'\n", "[[fault]] number 1 needs a rule"),
        ("[[fault]]\nrule = 'quit: close'\nwhy = 'x'\n", "unknown key 'why'"),
        ("rule = 'quit: close'\n", "unknown top-level key 'rule'"),
        ("fault = 'quit: close'\n", "write [[fault]]"),
    ],
)
def test_bad_rules_files(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "faults.toml"
    path.write_text(text)
    with pytest.raises(FaultSyntaxError) as caught:
        load_rules(file=path)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_missing_rules_file(tmp_path: Path) -> None:
    with pytest.raises(FaultSyntaxError, match="cannot read it"):
        load_rules(file=tmp_path / "absent.toml")


# ------------------------------------------------------------------ matching


def plan(*rules: str, clock: list[float] | None = None) -> FaultPlan:
    now = clock if clock is not None else [0.0]
    return FaultPlan([parse_rule(r) for r in rules], clock=lambda: now[0])


def kinds(session_plan: FaultPlan, steps: list[str]) -> list[int | None]:
    """The reply codes a session of ``steps`` gets (None: nothing fired)."""
    session = session_plan.session("127.0.0.1:40000")
    seen: dict[str, int] = {}
    out: list[int | None] = []
    for step in steps:
        seen[step] = seen.get(step, 0) + 1
        fault = session.step(step, nth=seen[step], transaction=seen.get("mail", 0))
        out.append(fault.code if fault else None)
    return out


def test_nth_occurrence() -> None:
    p = plan("rcpt#2: 452 4.5.3 Too many recipients")
    assert kinds(p, ["ehlo", "mail", "rcpt", "rcpt", "rcpt", "data"]) == [
        None,
        None,
        None,
        452,
        None,
        None,
    ]
    assert (
        p.session("127.0.0.1:1").step("rcpt", nth=2).reply_bytes()
        == b"452 4.5.3 Too many recipients\r\n"
    )  # type: ignore[union-attr]


def test_first_matching_rule_wins_and_unnamed_steps_cost_a_lookup() -> None:
    p = plan("rcpt#2: 452 first", "rcpt: 451 second")
    assert kinds(p, ["rcpt", "rcpt", "rcpt"]) == [451, 452, 451]
    assert p.session("127.0.0.1:1").step("noop") is None


def test_any_counts_every_command() -> None:
    p = plan("any#3: 421 4.3.0 Bye")
    assert kinds(p, ["ehlo", "mail", "rcpt", "data"]) == [None, None, 421, None]


def test_ehlo_rule_also_matches_helo() -> None:
    session = plan("ehlo: remove CHUNKING").session("127.0.0.1:1")
    assert session.step("helo") is not None


def test_session_and_message_selectors() -> None:
    p = plan("session#2 message#2 mail: 451 4.3.0 Later")
    assert kinds(p, ["mail", "mail"]) == [None, None]
    assert kinds(p, ["mail", "mail", "mail"]) == [None, 451, None]
    assert kinds(p, ["mail", "mail"]) == [None, None]


def test_selectors_on_what_was_said() -> None:
    p = plan(
        "to=*@example.org rcpt: 550 5.1.1 No such user", "from=ann@* helo=client.example dot: 451 x"
    )
    s = p.session("127.0.0.1:1")
    s.learn(helo="Client.Example")
    s.learn(mail_from="ann@example.net")
    s.learn(rcpt="bob@example.net")
    assert s.step("rcpt") is None
    s.learn(rcpt="Carol@Example.ORG")
    assert s.step("rcpt").code == 550  # type: ignore[union-attr]
    # to= on a later step: any recipient of the transaction
    assert s.step("dot").code == 451  # type: ignore[union-attr]
    s.learn(mail_from="dan@example.net")
    assert s.step("dot") is None


def test_user_and_client_selectors() -> None:
    p = plan("user=ann mail: 554 5.7.1 No", "client=127.0.0.2 mail: 421 x")
    s = p.session("127.0.0.1:1")
    assert s.step("mail") is None
    s.learn(user="ANN")
    assert s.step("mail").code == 554  # type: ignore[union-attr]
    assert p.session("127.0.0.2:5").step("mail").code == 421  # type: ignore[union-attr]
    assert p.session("[::1]:5").client == "::1"


def test_times_fail_twice_then_succeed() -> None:
    p = plan("mail: 451 4.3.0 Try again, times=2")
    codes = [kinds(p, ["mail"])[0] for _ in range(4)]
    assert codes == [451, 451, None, None]


def test_body_fires_once_per_message_once_enough_has_passed() -> None:
    s = plan("body@64KiB: close").session("127.0.0.1:1")
    assert s.step("body", nth=1, octets=60_000) is None
    assert s.step("body", nth=1, octets=70_000).kind is ActionKind.CLOSE  # type: ignore[union-attr]
    assert s.step("body", nth=1, octets=80_000) is None
    assert s.step("body", nth=2, octets=65_536) is not None


def test_chance_with_a_seed_picks_the_same_sessions_every_run() -> None:
    def picked() -> list[int]:
        p = plan("rcpt: 452 4.5.3 Busy, p=0.05, seed=7")
        return [k for k in range(1000) if p.session(f"127.0.0.1:{k}").step("rcpt") is not None]

    first = picked()
    assert first == picked()
    assert 20 <= len(first) <= 90  # about 5% of 1,000
    other = plan("rcpt: 452 4.5.3 Busy, p=0.05, seed=8")
    assert [k for k in range(1000) if other.session("127.0.0.1:1").step("rcpt")] != first
    # within a picked session the rule acts on every matching step
    p = plan("rcpt: 452 x, p=1")
    s = p.session("127.0.0.1:1")
    assert s.step("rcpt") and s.step("rcpt", nth=2)
    assert plan("rcpt: 452 x, p=0").session("127.0.0.1:1").step("rcpt") is None


def test_greylist_window_on_a_fake_clock() -> None:
    clock = [100.0]
    p = plan("rcpt: 451 4.7.1 Greylisted, greylist=60s", clock=clock)

    def attempt(client: str, sender: str, rcpt: str) -> int | None:
        s = p.session(client)
        s.learn(mail_from=sender)
        s.learn(rcpt=rcpt)
        fault = s.step("rcpt")
        return fault.code if fault else None

    assert attempt("127.0.0.1:1", "ann@x", "bob@y") == 451  # first seen: deferred
    clock[0] += 30
    assert attempt("127.0.0.1:2", "ann@x", "bob@y") == 451  # retried too soon
    assert attempt("127.0.0.2:2", "ann@x", "bob@y") == 451  # another client: its own triple
    clock[0] += 30
    assert attempt("127.0.0.1:3", "ann@x", "bob@y") is None  # the window has passed
    assert attempt("127.0.0.1:4", "ann@x", "carol@y") == 451  # a new recipient
    clock[0] += 1000
    assert attempt("127.0.0.1:5", "ann@x", "bob@y") is None  # passed triples stay passed


def test_rate_window_on_a_fake_clock() -> None:
    clock = [0.0]
    p = plan("mail: 421 4.7.0 Slow down, rate=3/min", clock=clock)
    codes = []
    for _ in range(5):
        codes += kinds(p, ["mail"])
        clock[0] += 1
    assert codes == [None, None, None, 421, 421]
    clock[0] += 60  # the window moves on: the old ones no longer count
    assert kinds(p, ["mail"]) == [None]


def test_replace_starts_new_sessions_afresh() -> None:
    p = plan("mail: 451 x, times=1")
    running = p.session("127.0.0.1:1")
    p.replace([parse_rule("rcpt: 452 y")])
    assert running.step("mail").code == 451  # type: ignore[union-attr]
    fresh = p.session("127.0.0.1:2")
    assert fresh.step("mail") is None and fresh.step("rcpt").code == 452  # type: ignore[union-attr]
    assert fresh.number == 2


def test_descriptions() -> None:
    assert (
        parse_rule("dot: replace 451 4.3.0 Lost").fault.describe()
        == "replaced the reply with 451 4.3.0 Lost"
    )
    assert parse_rule("greeting: delay 5s").fault.describe() == "delayed 5s"
    with pytest.raises(ValueError):
        parse_rule("quit: close").fault.reply_bytes()
