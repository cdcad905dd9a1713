import trio
import trio.testing

from omuscd.control.session import (
    AO,
    DO,
    DONT,
    IAC,
    IP,
    SB,
    SE,
    WILL,
    WONT,
    Interrupt,
    LineReader,
    TelnetFilter,
    TooLong,
)


def test_negotiation_is_refused_and_stripped():
    f = TelnetFilter()
    out, replies = f.feed(bytes([IAC, DO, 1, IAC, WILL, 3, IAC, WONT, 5, IAC, DONT, 6]) + b"ok")
    assert out == [b"ok"]
    assert replies == bytes([IAC, WONT, 1, IAC, DONT, 3])


def test_subnegotiation_up_to_se_and_split_across_reads():
    f = TelnetFilter()
    data = b"ab" + bytes([IAC, SB, 24, 0]) + b"xterm" + bytes([IAC, IAC, IAC, SE]) + b"cd"
    got = b""
    for i in range(len(data)):  # one byte at a time
        out, _ = f.feed(data[i:i + 1])
        got += b"".join(x for x in out if x is not None)
    assert got == b"abcd"


def test_interrupt_and_escaped_iac():
    f = TelnetFilter()
    out, _ = f.feed(b"par" + bytes([IAC, IP]) + b"x" + bytes([IAC, IAC]) + bytes([IAC, AO]))
    assert out == [b"par", None]  # IAC AO discards the pending "x\xff"


def lines_from(data: bytes, max_line=16):
    async def go():
        a, b = trio.testing.memory_stream_pair()
        reader = LineReader(b, max_line)
        await a.send_all(data)
        await a.aclose()
        got = []
        while (item := await reader.next()) is not None:
            got.append(item)
        return got
    return trio.run(go)


def test_lines_crlf_lf_and_cr_nul():
    assert lines_from(b"one\r\ntwo\nthree\r\x00\n") == ["one", "two", "three"]


def test_over_long_line_reported_once_and_discarded():
    got = lines_from(b"x" * 100 + b"\nok\n")
    assert isinstance(got[0], TooLong) and got[1:] == ["ok"]


def test_binary_is_flagged_not_decoded():
    got = lines_from(b"\x00\x01\x02\n\xc3\x28\nfine\n")
    assert got[0] == b"\x00\x01\x02" and got[1] == b"\xc3\x28" and got[2] == "fine"


def test_interrupt_marker_clears_the_partial_line():
    got = lines_from(b"hal" + bytes([IAC, IP]) + b"ok\n")
    assert isinstance(got[0], Interrupt) and got[1:] == ["ok"]


# --------------------------------------------------------------------------- who is it
def _pair(family: int, host: str, client_fd: bool = True):
    import socket

    srv = socket.socket(family)
    srv.bind((host, 0))
    srv.listen(4096)
    return srv


def test_loopback_owner_names_the_other_users_socket_never_a_closed_one():
    """The kernel names the account of the process at the other end; once that process
    is gone, its socket's remains (orphaned, TIME_WAIT: uid 0 in the kernel's answer)
    must not make the connection root's."""
    import socket
    import subprocess

    from omuscd.control.identity import loopback_owner, tcp_identity
    from tests.cluster import ordinary_user

    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        srv = _pair(family, host)
        port = srv.getsockname()[1]
        with ordinary_user(f"lo{family}") as user, srv:
            client = user.popen([user.python, "-c",
                                 "import socket, sys\n"
                                 f"s = socket.create_connection(({host!r}, {port}))\n"
                                 "print('connected', flush=True); sys.stdin.read()"],
                                stdin=subprocess.PIPE)
            assert client.stdout is not None and client.stdout.readline() == b"connected\n"
            conn, remote = srv.accept()
            with conn:
                local = conn.getsockname()
                assert loopback_owner(family, local, remote) == user.uid
                who = tcp_identity(family, local, remote, "peer")
                assert (who.uid, who.gid, who.user, who.admin) == (user.uid, user.gid,
                                                                   user.name, False)
                assert who.groups == [user.gid]
                # not our own end, nor a port nobody holds
                assert loopback_owner(family, remote, local) == 0  # the daemon's end: root
                assert loopback_owner(family, local, (remote[0], 1)) is None
                client.kill()
                client.wait()
                assert loopback_owner(family, local, remote) is None
                assert tcp_identity(family, local, remote, "peer").uid is None
            # a connection that closed before it was accepted: nobody, not root
            late = user.popen([user.python, "-c",
                               f"import socket; socket.create_connection(({host!r}, {port}))"
                               ".close()"])
            late.wait()
            conn, remote = srv.accept()
            with conn:
                assert loopback_owner(family, conn.getsockname(), remote) is None


def test_loopback_owner_is_one_lookup_not_a_scan():
    """Exact lookups: the cost does not grow with the number of open connections (a scan
    of /proc/net/tcp would take milliseconds each with thousands)."""
    import socket
    import time

    from omuscd.control.identity import loopback_owner

    srv = _pair(socket.AF_INET, "127.0.0.1")
    clients, conns = [], []
    try:
        for _ in range(3000):
            clients.append(socket.create_connection(srv.getsockname()))
            conns.append(srv.accept()[0])
        start = time.perf_counter()
        for c in conns[:1000]:
            assert loopback_owner(socket.AF_INET, c.getsockname(), c.getpeername()) == 0
        each = (time.perf_counter() - start) / 1000
        print(f"one lookup among 3000 connections: {each * 1e6:.0f} us")
        assert each < 0.002
    finally:
        for s in clients + conns:
            s.close()
        srv.close()
