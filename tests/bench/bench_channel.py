"""Throughput of one stream over the cluster channel on loopback: the older HMAC-SHA256
frames beside the encrypted AEAD frames, measured in the same run (these machines are
noisy: the ratio is the figure to read).

The CPU seconds each end spends per GB are printed too: they hardly depend on what
else the machine runs, where MB/s does.

Target (issue 18): the AEAD channel at >= 1 GB/s for one move's stream, and faster than
the HMAC frames.

What one move does: the sender (the source daemon) writes 1 MiB chunks with
``send_data`` (the page relay's and the image sender's size), the receiver (the target
daemon) takes them with ``receive(borrow=True)``; each end a process of its own, pinned
to a CPU of its own where there are two, as two daemons would be.  The HMAC rounds are
the same code with the AEAD offer withheld, which is what an older peer gets: byte for
byte the framing of the channel before encryption.  Rounds alternate between the two.

    python tests/bench/bench_channel.py [MB_PER_ROUND] [ROUNDS]
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import statistics
import sys
import time

import trio
from common import pin  # noqa: F401  (sets sys.path to the checkout)

from omuscd import channel

KEY = os.urandom(32)
logging.getLogger("omuscd.channel").setLevel(logging.ERROR)  # "not encrypted", each round
CHUNK = (1 << 20) - 1  # omuscd.pages.CHUNK: one frame
HOST = "127.0.0.1"


def receiver(port_q: mp.Queue, total: int) -> None:
    async def main() -> None:
        (lst,) = await trio.open_tcp_listeners(0, host=HOST)
        port_q.put(lst.socket.getsockname()[1])
        while True:
            stream = await lst.accept()
            ch = await channel.accept(stream, KEY, {"node": 2, "boot": 2})
            got = 0
            cpu = time.process_time()
            while got < total:
                item = await ch.receive(borrow=True)
                assert isinstance(item, tuple)
                got += len(item[1])
            await ch.send({"op": "done", "cipher": ch.cipher,
                           "cpu": time.process_time() - cpu})
            await ch.aclose()
    _on_cpu(1)
    trio.run(main)


def _on_cpu(cpu: int) -> None:
    if os.cpu_count() and os.cpu_count() >= 2:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


async def one_round(port: int, total: int, aead: bool) -> tuple[float, float, float, str]:
    """Seconds to send ``total`` bytes and hear they arrived, the CPU seconds the sender
    and the receiver spent on them, and the receiver's cipher."""
    channel.AEADS[:] = (["aes-256-gcm", "chacha20-poly1305"] if _aes() else
                        ["chacha20-poly1305", "aes-256-gcm"]) if aead else []
    # a fresh start of the sender each round, which forgets the receiver encrypted: an
    # HMAC round after an AEAD one would otherwise be refused as a stripped offer
    channel._encrypted_before.clear()
    boot = int.from_bytes(os.urandom(7), "big")
    ch = await channel.connect((HOST, port), KEY, {"node": 1, "boot": boot})
    data = memoryview(os.urandom(CHUNK))
    sent = 0
    t, cpu = time.perf_counter(), time.process_time()
    while sent < total:
        n = min(CHUNK, total - sent)
        await ch.send_data(10, data[:n])
        sent += n
    done = await ch.receive_msg()
    elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    await ch.aclose()
    return elapsed, cpu, float(done["cpu"]), str(done["cipher"])


def _aes() -> bool:
    return channel._cpu_has_aes()


def main() -> None:
    mb = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    total = mb << 20
    q: mp.Queue = mp.Queue()
    proc = mp.Process(target=receiver, args=(q, total), daemon=True)
    proc.start()
    port = q.get(timeout=10)
    _on_cpu(0)
    rates: dict[str, list[float]] = {"hmac": [], "aead": []}
    cpus: dict[str, list[tuple[float, float]]] = {"hmac": [], "aead": []}
    ciphers = {}
    print(f"load before: {os.getloadavg()[0]:.2f}; {mb} MB per round, {rounds} rounds each; "
          f"CPU AES instructions: {'yes' if _aes() else 'no'}")
    try:
        for _ in range(rounds):
            for kind in ("hmac", "aead"):
                elapsed, sent, received, cipher = trio.run(one_round, port, total,
                                                           kind == "aead")
                rates[kind].append(total / elapsed / 1e6)
                cpus[kind].append((sent / total * 1e9, received / total * 1e9))
                ciphers[kind] = cipher
    finally:
        proc.kill()
    for kind in ("hmac", "aead"):
        r = rates[kind]
        send = statistics.median(c[0] for c in cpus[kind])
        receive = statistics.median(c[1] for c in cpus[kind])
        print(f"{kind:5} ({ciphers[kind]}): median {statistics.median(r):7.0f} MB/s "
              f"(min {min(r):.0f}, max {max(r):.0f}); CPU s per GB: sender {send:.2f}, "
              f"receiver {receive:.2f}")
    ratio = statistics.median(rates["aead"]) / statistics.median(rates["hmac"])
    print(f"ratio aead/hmac: {ratio:.2f}; target aead >= 1000 MB/s: "
          f"{'met' if statistics.median(rates['aead']) >= 1000 else 'NOT met'}")


if __name__ == "__main__":
    main()
