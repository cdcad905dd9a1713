"""The cluster channel's op table (omuscd.cluster.rpc): one error reply that daemons of
before the table still understand, and a docstring that names every request.  Spoken to a
real daemon over a real channel, as another daemon would."""

import trio

from omuscd import channel
from omuscd.cluster import rpc
from omuscd.version import PROTOCOL_VERSION
from tests.cluster import start_daemon, wait_for

ADDRESS = "127.0.0.57"
PORT = 4270


def test_error_text_reads_every_shape_old_daemons_send():
    assert rpc.error_text({"op": "refused", "reason": "r"}) == "r"  # exec, drop, immigrate
    assert rpc.error_text({"op": "error", "text": "t"}) == "t"  # act
    assert rpc.error_text({"op": "failed", "reason": "f", "text": "f"}) == "f"
    assert rpc.error_text({"op": "refused"}, "nothing said") == "nothing said"
    assert rpc.refusal("why", "failed") == {"op": "failed", "reason": "why", "text": "why"}


def test_the_docstring_names_every_request_served():
    from types import SimpleNamespace

    from omuscd.jobs.node import JobControl

    served = JobControl.channel_ops(SimpleNamespace(**{
        name: None for name in dir(JobControl) if name.startswith("_serve_")})).ops
    assert len(served) == 12  # with lease (omuscd.migrate.lease)
    for op in served:
        assert f"``{op}``" in (rpc.__doc__ or ""), op


async def _ask(msgs: list[dict]) -> list[dict]:
    out = []
    for msg in msgs:
        ch = await channel.connect((ADDRESS, PORT), channel.INSECURE_KEY,
                                   {"node": 77, "boot": 1, "proto": PROTOCOL_VERSION,
                                    "name": "peer"})
        try:
            await ch.send(msg)
            with trio.fail_after(10):
                out.append(await ch.receive_msg())
        finally:
            await ch.aclose()
    return out


def test_every_refusal_has_one_shape_that_old_daemons_read(workdir, reaper):
    """Before the table a refusal came in four shapes, and each old reader reads the one
    field its request got: ``reason`` (exec, emigrate, drop, immigrate, unknown
    requests), ``text`` (act).  Every refusal now carries both, under the same op as
    before, so that old and new daemons understand each other either way."""
    d = start_daemon("rpc", ["--address", ADDRESS, "--control-bind", ADDRESS, "--port",
                             str(PORT), "--insecure"], workdir)
    reaper.append(d)
    rec = {"id": "77.1", "owner": {"uid": 0, "gid": 0, "groups": [0], "user": "root"},
           "home": 77, "node": 999, "node_name": "x", "argv": ["true"], "cwd": "/"}
    asked = [
        ({"op": "bogus"}, "refused", "unknown operation"),
        ({"op": "attach", "job": "../x"}, "refused", "not a job id"),
        ({"op": "exec", "job": rec, "env": {}}, "refused", "was meant for node 999"),
        ({"op": "act", "job": "77.5", "action": "kill", "uid": 0, "sig": 9}, "error",
         "no job 77.5"),
        ({"op": "emigrate", "job": "77.5", "to": 78}, "failed", "does not run on rpc"),
        ({"op": "drop", "job": "77.5", "to": 78}, "refused", "no such restartable job"),
        ({"op": "immigrate", "job": {"id": "77.5"}}, "refused", ""),
        ({"op": "flag", "flag": "nosuch", "on": True}, "refused", "no node flag"),
        ({"op": "checkpoint", "job": "77.5"}, "refused", "does not run on rpc"),
        ({"op": "checkpoint", "job": "../77.5", "stop": True}, "refused", "not a job id"),
    ]
    replies = trio.run(_ask, [m for m, _, _ in asked])
    for (msg, op, said), reply in zip(asked, replies, strict=True):
        assert reply["op"] == op, (msg, reply)
        assert reply["reason"] == reply["text"] and said in reply["reason"], (msg, reply)
    assert d.alive()


def test_a_request_that_cannot_be_served_is_logged_not_only_dropped(workdir, reaper):
    """A request with a field of the wrong kind (or a bug met serving it) costs only its
    connection, and the daemon says so in its log: the peer sees only the connection
    closed, and a bug of this kind once showed nowhere but there."""
    d = start_daemon("rpc", ["--address", ADDRESS, "--control-bind", ADDRESS, "--port",
                             str(PORT), "--insecure"], workdir)
    reaper.append(d)

    async def ask() -> str:
        ch = await channel.connect((ADDRESS, PORT), channel.INSECURE_KEY,
                                   {"node": 77, "boot": 1, "proto": PROTOCOL_VERSION,
                                    "name": "peer"})
        try:
            await ch.send({"op": "act", "job": "77.5", "action": "kill", "uid": 0,
                           "sig": "fifteen"})
            with trio.fail_after(10):
                try:
                    return str(await ch.receive_msg())
                except channel.ChannelError as e:
                    return f"closed: {e}"
        finally:
            await ch.aclose()

    assert trio.run(ask).startswith("closed")
    wait_for(lambda: "node 77's 'act' request failed: ValueError" in d.log(), 5,
             "the failed request in the log")
    assert d.alive() and d.ctl("version").code == 200
