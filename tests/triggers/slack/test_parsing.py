"""The /agent grammar, Slack text decoding, and the CLI entry point."""

from __future__ import annotations

import argparse

import pytest

from triggers.slack_app import UserError, parse_command, register, slack_unescape, strip_mention


def test_task_with_options_keeps_the_text_verbatim() -> None:
    cmd = parse_command("repo:web base:release-1 agent:command  echo a &amp;&amp; echo b &gt; out.txt")
    assert (cmd.verb, cmd.repo, cmd.base, cmd.agent) == ("task", "web", "release-1", "command")
    assert cmd.text == "echo a && echo b > out.txt"


def test_options_only_at_the_front() -> None:
    cmd = parse_command("fix repo:web parsing")
    assert cmd.repo == "" and cmd.text == "fix repo:web parsing"


def test_verbs() -> None:
    assert parse_command("list").verb == "list"
    assert parse_command("status cv-0123456789ab").task_id == "cv-0123456789ab"
    revert = parse_command("revert cv-0123456789ab broke   prod")
    assert (revert.verb, revert.task_id, revert.reason) == ("revert", "cv-0123456789ab", "broke   prod")
    # words that merely start like a verb are tasks
    assert parse_command("list all TODOs in README").verb == "task"
    assert parse_command("revert the last css change").verb == "task"
    assert parse_command("help").verb == "help"


@pytest.mark.parametrize("raw,msg", [("", "empty"), ("   ", "empty"), ("status", "needs a task id"), ("revert", "needs a task id")])
def test_bad_input(raw: str, msg: str) -> None:
    with pytest.raises(UserError, match=msg):
        parse_command(raw)


def test_slack_entities() -> None:
    assert slack_unescape("see <https://x.test/a?b=1|x.test> and <mailto:a@b.c|a@b.c>") == "see https://x.test/a?b=1 and mailto:a@b.c"
    assert slack_unescape("ping <@U123> in <#C1|dev>") == "ping <@U123> in <#C1|dev>"
    assert slack_unescape("a &lt;b&gt; &amp;") == "a <b> &"
    assert strip_mention("<@UBOT> fix it <@UBOT>", "UBOT") == "fix it <@UBOT>"


def test_cli_registers_slack_and_refuses_without_tokens(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    for var in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="conveyor")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["slack", "--port", "4321"])
    assert args.port == 4321
    assert args.func(args) == 2
    assert "SLACK_BOT_TOKEN" in capsys.readouterr().err


async def test_http_mode_refuses_to_serve_without_a_signing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor.config import ConfigError, ConveyorConfig, Settings
    from triggers.slack_app import build_app, serve_http

    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-x")
    monkeypatch.delenv("SLACK_SIGNING_SECRET", raising=False)
    monkeypatch.delenv("SLACK_APP_TOKEN", raising=False)

    async def provider():
        raise AssertionError("not reached")

    with pytest.raises(ConfigError, match="SLACK_SIGNING_SECRET"):
        build_app(Settings(), ConveyorConfig(), provider)
    monkeypatch.setenv("SLACK_APP_TOKEN", "xapp-x")  # Socket Mode may run without it, HTTP may not
    app = build_app(Settings(), ConveyorConfig(), provider)
    with pytest.raises(ConfigError, match="never serves unsigned"):
        await serve_http(app, 0, host="127.0.0.1")
