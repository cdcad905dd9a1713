import trio
import trio.testing

from omuscd.control import (
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
