import json
from dataclasses import dataclass

import pytest
import trio

from omuscd.control import commands, protocol
from omuscd.control.commands import COMMANDS, ParseError, parse
from tests.cluster import inprocess_daemon as make


def test_every_command_has_syntax_and_help():
    for name, cmd in COMMANDS.items():
        assert cmd.name == name and cmd.help and cmd.syntax.startswith(name)


@pytest.mark.parametrize("line,code", [
    ("frobnicate", protocol.UNKNOWN),
    ("node", protocol.BAD_ARGS),
    ("node a b", protocol.BAD_ARGS),
    ("log loud", protocol.BAD_ARGS),
    ("status --jsn", protocol.BAD_ARGS),
    ("quit --json", protocol.BAD_ARGS),  # not a listing
    ("get 'unclosed", protocol.BAD_ARGS),
    ("node " + "x" * 100, protocol.BAD_ARGS),
])
def test_bad_lines_get_4xx(line, code):
    with pytest.raises(ParseError) as e:
        parse(line)
    assert e.value.code == code


def test_parse_accepts_case_quotes_and_json():
    p = parse("NODES --json")
    assert p.command.name == "nodes" and p.json
    p = parse("log DEBUG")
    assert p.args == {"level": "debug"}
    p = parse("node 'my-node'")
    assert p.args == {"node": "my-node"}
    with pytest.raises(ParseError) as e:  # not a node name (omuscd.ids)
        parse("node 'my node'")
    assert e.value.code == 401
    assert parse("   ") is None


def test_completion_comes_from_the_table():
    assert commands.completions("s") == ["set", "shutdown", "status", "stay"]


@dataclass
class Ctx:
    services: object
    admin: bool = True
    authenticated: bool = True
    user: str = "test"
    uid: int | None = 0
    gid: int | None = 0
    groups: tuple = ()


@pytest.fixture
def ctx(workdir):
    return Ctx(make(workdir, "127.0.0.31", 14280).control.services)


def run(ctx, line):
    async def go():
        return await commands.execute(ctx, line)
    return trio.run(go)


def test_help_lists_every_command(ctx):
    reply = run(ctx, "help")
    assert reply.code == 200
    for name in COMMANDS:
        assert any(line.startswith(name) for line in reply.lines)
    assert run(ctx, "help node").lines[0] == "node node [--json]"
    assert run(ctx, "help nope").code == protocol.NOT_FOUND


def test_listings_answer_one_json_line(ctx):
    for name, cmd in COMMANDS.items():
        if cmd.json and name not in ("watch", "node", "job", "run"):
            reply = run(ctx, f"{name} --json")
            assert reply.code == 200 and len(reply.lines) == 1, name
            assert reply.render().startswith(b"200 {")
            json.loads(reply.lines[0])


def test_set_get_and_bounds(ctx):
    assert run(ctx, "set dead_timeout 9").lines == ["dead_timeout = 9.0"]
    assert run(ctx, "get dead-timeout --json").json
    assert json.loads(run(ctx, "get --json").lines[0])["dead_timeout"] == 9.0
    assert run(ctx, "set dead_timeout 0").code == protocol.BAD_ARGS
    assert run(ctx, "set port 1").code == protocol.NOT_FOUND  # not a runtime tunable
    assert run(ctx, "get nope").code == protocol.NOT_FOUND
    assert ctx.services.cfg.dead_timeout == 9.0


def test_admin_and_auth_gates(ctx):
    ctx.admin = False
    assert run(ctx, "shutdown").code == protocol.NOT_PERMITTED
    assert run(ctx, "set dead_timeout 8").code == protocol.NOT_PERMITTED
    assert run(ctx, "status").code == 200
    ctx.authenticated = False
    assert run(ctx, "status").code == protocol.AUTH_REQUIRED
    assert run(ctx, "help").code == 200


def test_node_lookup(ctx):
    assert run(ctx, "node 127.0.0.31").code == 200
    assert run(ctx, f"node {ctx.services.status.node_id} --json").json
    assert run(ctx, "node ghost").code == protocol.NOT_FOUND


def test_line_breaks_inside_a_line_are_escaped():
    assert protocol.Reply(200, ["a\nb", "c\r\nd"]).render() == b"200-a\\nb\r\n200 c\\r\\nd\r\n"


def test_multiline_framing():
    r = protocol.Reply(200, ["a", "b", "c"])
    assert r.render() == b"200-a\r\n200-b\r\n200 c\r\n"
    assert protocol.Reply(210, ["x"], stream=True).render() == b"210-x\r\n"
