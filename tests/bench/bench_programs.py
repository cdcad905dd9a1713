"""The 20-program bar of issue 18, as a benchmark: real programs, each run plain and as an
omuscd job on a two-node namespace cluster moved several times (default 3: to b, home,
to b) while it runs, compared byte for byte: stdout, stderr, exit status and every file
it leaves in its directory.  Prints a table: program, moves done, identical, times.

Programs: bc (digits of pi), xz -9, a pure-Python sieve, Python threads, C threads
(pthreads), OpenMP, make -j2 of 200 generated C files, a shell pipeline, gcc -O2 of a
large generated file, a log writer appending every 100 ms, sha256sum of a big file, perl,
sqlite3 (the CLI, or Python's module), and ruby and a JVM when installed.  A program
whose tools are missing is skipped with a line saying so.

Needs root, network namespaces and a working CRIU (tests/install-criu).  Each program
lasts ~8-20 s plain on a quiet machine; a move every MOVE_EVERY seconds.

    python tests/bench/bench_programs.py [--user] [--moves N] [--only NAME,...]

``--user`` runs the jobs (and their plain runs) as an ordinary user too
(tests/cluster.py ordinary_user).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import workdir  # noqa: F401  (sets sys.path to the checkout)

from omuscd.client import ControlClient
from tests.cluster import User, namespace_cluster, ordinary_user, wait_for

PY3 = "/usr/bin/python3"  # the jobs' interpreter: one every user can run
MOVE_EVERY = 1.0  # seconds between the end of a move and the next
TAG = "omuscd-bench-programs"

SIEVE = """
n = 25_000_000
flags = bytearray([1]) * (n + 1)
flags[0] = flags[1] = 0
i = 2
while i * i <= n:
    if flags[i]:
        j = i * i
        while j <= n:
            flags[j] = 0
            j += i
    i += 1
count = total = 0
for k in range(n + 1):
    if flags[k]:
        count += 1
        total += k
print(count, total)
"""
PY_THREADS = """
import hashlib, threading
out = {}
def chain(k):
    h = str(k).encode()
    for _ in range(3_500_000):
        h = hashlib.sha256(h).digest()
    out[k] = h.hex()
ts = [threading.Thread(target=chain, args=(k,)) for k in range(4)]
for t in ts: t.start()
for t in ts: t.join()
for k in sorted(out): print(k, out[k])
"""
C_THREADS = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdint.h>
static uint64_t res[4];
static void *work(void *arg) {
    uint64_t k = (uint64_t)(uintptr_t)arg, x = k + 1;
    for (uint64_t i = 0; i < 1200000000ULL; i++)
        x = x * 6364136223846793005ULL + 1442695040888963407ULL + (x >> 29);
    res[k] = x;
    return 0;
}
int main(void) {
    pthread_t t[4];
    for (uintptr_t k = 0; k < 4; k++) pthread_create(&t[k], 0, work, (void *)k);
    for (int k = 0; k < 4; k++) pthread_join(t[k], 0);
    for (int k = 0; k < 4; k++) printf("%d %llu\n", k, (unsigned long long)res[k]);
    return 0;
}
"""
OPENMP = r"""
#include <stdio.h>
#include <stdint.h>
int main(void) {
    uint64_t s = 0;
    #pragma omp parallel for reduction(+:s) schedule(static)
    for (int64_t i = 0; i < 6000000000LL; i++) s += (uint64_t)(i * i) % 7;
    printf("%llu\n", (unsigned long long)s);
    return 0;
}
"""
SQL = """
create table t (i integer primary key, v text, w integer);
begin;
with recursive c(x) as (select 1 union all select x + 1 from c where x < 1500000)
insert into t select x, printf('%08x', (x * 2654435761) % 4294967296), x % 97 from c;
commit;
create index t_v on t(v);
create index t_w on t(w, v);
select count(*), sum(w), min(v), max(v) from t;
select w, count(*), max(v) from t group by w order by w limit 5;
select count(*) from t a join t b on b.i = a.i + 1 where a.w < b.w;
pragma integrity_check;
"""
JAVA = """
public class Prog {
    public static void main(String[] a) {
        long[] heap = new long[24 << 20];  // 192 MB
        long s = 0;
        for (int round = 0; round < 250; round++) {
            for (int i = 0; i < heap.length; i++) { heap[i] = heap[i] * 31 + i + round; }
            s ^= heap[round * 1000];
            System.out.println(round + " " + s);
        }
    }
}
"""


def gen_text(path: Path, mb: int) -> None:
    """Text that compresses like a log: words from a small vocabulary, seeded."""
    import random

    r = random.Random(7)
    words = [("".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 9))))
             for _ in range(3000)]
    with open(path, "w") as f:
        size = 0
        while size < mb << 20:
            line = " ".join(r.choice(words) for _ in range(12)) + f" {r.random():.6f}\n"
            f.write(line)
            size += len(line)


def gen_bytes(path: Path, mb: int) -> None:
    import random

    r = random.Random(11)
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(r.randbytes(1 << 20))


def gen_make(d: Path) -> None:
    objs = []
    for k in range(200):
        body = "\n".join(f"int f{k}_{j}(int x) {{ return x * {j + 3} + {k} ^ (x >> {j % 7}); }}"
                         for j in range(60))
        (d / f"m{k}.c").write_text(f"{body}\nint g{k}(int x) {{ return f{k}_0(x) + "
                                   f"f{k}_59(x); }}\n")
        objs.append(f"m{k}.o")
    calls = " + ".join(f"g{k}(i)" for k in range(200))
    decls = "".join(f"int g{k}(int);\n" for k in range(200))
    (d / "main.c").write_text(f'#include <stdio.h>\n{decls}int main(void) {{ long s = 0; '
                              f'for (int i = 0; i < 1000; i++) s += {calls}; '
                              f'printf("%ld\\n", s); return 0; }}\n')
    (d / "Makefile").write_text(f"prog: main.o {' '.join(objs)}\n\tcc -o prog $^\n"
                                "%.o: %.c\n\tcc -O2 -c $< -o $@\n")


def gen_big_c(path: Path, lines: int) -> None:
    with open(path, "w") as f:
        f.write("#include <stdio.h>\n")
        n = lines // 6
        for k in range(n):
            f.write(f"int h{k}(int x) {{\n  int y = x * {k % 97 + 1};\n  for (int i = 0; i < "
                    f"{k % 13 + 1}; i++)\n    y ^= (y << 3) + i + {k};\n  return y;\n}}\n")
        f.write("int main(void) { int s = 0;\n")
        for k in range(0, n, 50):
            f.write(f"  s += h{k}({k});\n")
        f.write('  printf("%d\\n", s); return 0; }\n')


@dataclass
class Program:
    name: str
    cmd: str  # run by sh -c in the program's directory
    needs: tuple[str, ...] = ()
    setup: object = None  # a function of the template directory (not timed)


def _setup_c(source: str, out: str, *flags: str):
    def setup(d: Path) -> None:
        (d / f"{out}.c").write_text(source)
        subprocess.run(["gcc", "-O2", *flags, "-o", str(d / out), str(d / f"{out}.c")],
                       check=True)
    return setup


def _setup_java(d: Path) -> None:
    (d / "Prog.java").write_text(JAVA)
    subprocess.run(["javac", "-d", str(d), str(d / "Prog.java")], check=True)


PROGRAMS = [
    Program("bc", "echo 'scale=3300; 4*a(1)' | bc -l", ("bc",)),
    Program("xz -9", "xz -9 -T1 -k data.txt && ls -l data.txt.xz | cut -d' ' -f5", ("xz",),
            lambda d: gen_text(d / "data.txt", 10)),
    Program("python sieve", f"{PY3} sieve.py", (), lambda d: (d / "sieve.py").write_text(SIEVE)),
    Program("python threads", f"{PY3} threads.py", (),
            lambda d: (d / "threads.py").write_text(PY_THREADS)),
    Program("C threads", "./cthreads", ("gcc",), _setup_c(C_THREADS, "cthreads", "-pthread")),
    Program("OpenMP", "OMP_NUM_THREADS=2 ./omp", ("gcc",), _setup_c(OPENMP, "omp", "-fopenmp")),
    Program("make -j2", "make -s -j2 && ./prog", ("make", "cc"), gen_make),
    Program("shell pipeline", "seq 1 36000000 | awk '{s = (s + $1 * $1) % 1000000007} "
            "NR % 1000000 == 0 {print NR, s}' | tee pipe.out | sort -n | sha256sum", ("awk",)),
    Program("gcc big file", "gcc -O2 -c big.c -o big.o && gcc -o big big.o && ./big",
            ("gcc",), lambda d: gen_big_c(d / "big.c", 54000)),
    Program("log writer", "i=0; while [ $i -lt 100 ]; do i=$((i + 1)); "
            "echo \"entry $i\" >> app.log; sleep 0.1; done; wc -l < app.log"),
    Program("sha256sum", "for i in 1 2 3 4 5 6; do sha256sum big.bin; done", ("sha256sum",),
            lambda d: gen_bytes(d / "big.bin", 384)),
    Program("perl", "perl -e 'my $s = 0; for my $i (1 .. 90_000_000) { $s = ($s * 31 + $i) "
            "% 1000003 } print \"$s\\n\"'", ("perl",)),
    Program("sqlite3", "sqlite3 db.sqlite < script.sql", ("sqlite3",),
            lambda d: (d / "script.sql").write_text(SQL)),
    Program("ruby", "ruby -e 's = 0; 1.upto(30_000_000) { |i| s = (s * 31 + i) % 1000003 }; "
            "puts s'", ("ruby",)),
    Program("java", "java -XX:-UsePerfData -Xmx320m -cp . Prog", ("java", "javac"),
            _setup_java),
]


@dataclass
class Outcome:
    code: int
    stdout: bytes
    stderr: bytes
    files: dict[str, str]
    secs: float
    moves: int = 0
    notes: list[str] = field(default_factory=list)


def snapshot(d: Path) -> dict[str, str]:
    """Every file the program's directory holds: relative path -> sha256 (or link)."""
    out = {}
    for root, _dirs, files in os.walk(d):
        for f in files:
            p = Path(root) / f
            rel = str(p.relative_to(d))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
                continue
            h = hashlib.sha256()
            with open(p, "rb") as r:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def prepare(template: Path, dest: Path, user: User | None) -> None:
    shutil.copytree(template, dest, symlinks=True)
    if user is not None:
        for root, dirs, files in os.walk(dest):
            for x in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(x, user.uid, user.gid)


def user_env(user: User | None) -> dict[str, str]:
    home = str(user.home) if user else "/root"
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8",
            "USER": user.name if user else "root"}


def run_plain(prog: Program, d: Path, user: User | None) -> Outcome:
    argv = ["sh", "-c", prog.cmd]
    t = time.monotonic()
    if user is None:
        p = subprocess.run(argv, cwd=d, capture_output=True, env=user_env(None),
                           stdin=subprocess.DEVNULL)
    else:
        p = user.run(argv, timeout=600, cwd=str(d), env={"LANG": "C.UTF-8"})
    return Outcome(p.returncode, p.stdout, p.stderr, snapshot(d), time.monotonic() - t)


def run_job(prog: Program, d: Path, a, user: User | None, moves: int, tag: str,
            plain_secs: float) -> Outcome:
    """``omuscd run --home`` at a (attached, as a user types it), moved ``moves`` times:
    to b, home, to b..., a move every MOVE_EVERY seconds while it runs, or more often
    for a program whose plain run was short (a move asked for after the job ended is not
    made: the program was too short)."""
    gap = min(MOVE_EVERY, max(0.3, plain_secs / (moves + 2) - 0.3))
    args = ["--home", "--", "sh", "-c", prog.cmd, tag]
    t = time.monotonic()
    if user is None:
        p = subprocess.Popen([sys.executable, "-m", "omuscd", "run", "--connect", a.socket,
                              *args], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, env=user_env(None))
    else:
        p = user.popen(user.run_argv(a.socket, *args), cwd=str(d), env={"LANG": "C.UTF-8"})
    got: dict[str, bytes] = {}
    reader = threading.Thread(target=lambda: got.update(zip(("out", "err"),
                                                            p.communicate(), strict=True)))
    reader.start()
    job = ""

    def listed() -> bool:
        nonlocal job
        for j in a.json("jobs")["jobs"]:
            if tag in j["command"]:
                job = j["id"]
        return bool(job) or p.poll() is not None
    wait_for(listed, 30, f"the job {tag}")
    done, notes = 0, []
    for i in range(moves):
        time.sleep(gap if i else gap + 0.5)  # the first: past 'starting'
        if p.poll() is not None or not job:
            notes.append(f"ended after {done} moves")
            break
        # to b, then home, ...: from wherever it runs now (a failed move left it there)
        where = "home" if a.json(f"job {job}").get("node_name") == "b" else "b"
        with ControlClient.unix(a.socket, timeout=300) as c:
            c.wait_as_long_as_it_takes()
            reply = c.command(f"migrate {job} {where}")
        if reply.ok:
            done += 1
        else:
            notes.append(f"move {i + 1}: {reply.text}")
            if "has already ended" in reply.text or "is exited" in reply.text:
                break
    reader.join(600)
    secs = time.monotonic() - t
    return Outcome(p.returncode, got.get("out", b""), got.get("err", b""), snapshot(d), secs,
                   done, notes)


def differences(plain: Outcome, job: Outcome) -> list[str]:
    out = []
    if plain.code != job.code:
        out.append(f"exit {plain.code} vs {job.code}")
    if plain.stdout != job.stdout:
        out.append("stdout")
    if plain.stderr != job.stderr:
        out.append("stderr")
    if plain.files != job.files:
        diff = sorted(k for k in plain.files.keys() | job.files.keys()
                      if plain.files.get(k) != job.files.get(k))
        out.append("files: " + ", ".join(diff[:4]))
    return out


def bench(a, programs: list[Program], base: Path, user: User | None, moves: int
          ) -> list[list[str]]:
    rows = []
    who = user.name if user else "root"
    for prog in programs:
        missing = [t for t in prog.needs if shutil.which(t) is None]
        if missing:
            print(f"  skipped {prog.name}: {', '.join(missing)} not installed", flush=True)
            continue
        slug = prog.name.replace(" ", "_").replace("-", "")
        template = base / f"{slug}.template"
        if not template.exists():
            template.mkdir()
            if prog.setup is not None:
                prog.setup(template)  # type: ignore[operator]
        plain_dir, job_dir = base / f"{slug}.{who}.plain", base / f"{slug}.{who}.job"
        prepare(template, plain_dir, user)
        prepare(template, job_dir, user)
        plain = run_plain(prog, plain_dir, user)
        job = run_job(prog, job_dir, a, user, moves, f"{TAG}-{slug}-{who}", plain.secs)
        diff = differences(plain, job)
        if plain.code != 0:
            diff.append(f"(the plain run exited {plain.code}: "
                        f"{plain.stderr.decode(errors='replace')[-200:]!r})")
        row = [prog.name, who, f"{job.moves}/{moves}", "yes" if not diff else "NO",
               f"{plain.secs:.1f}s", f"{job.secs:.1f}s", "; ".join(diff + job.notes)]
        print("  " + " | ".join(row), flush=True)
        rows.append(row)
        shutil.rmtree(plain_dir, ignore_errors=True)
        shutil.rmtree(job_dir, ignore_errors=True)
    return rows


def table(rows: list[list[str]]) -> str:
    header = ["program", "user", "moves", "identical", "plain", "as a job", "notes"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, ["-" * w for w in widths], *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--user", action="store_true", help="also as an ordinary user")
    ap.add_argument("--moves", type=int, default=3)
    ap.add_argument("--only", default="", help="program names, comma-separated")
    args = ap.parse_args()
    only = {s.strip().lower() for s in args.only.split(",") if s.strip()}
    programs = [p for p in PROGRAMS if not only or p.name.lower() in only]
    base = Path(tempfile.mkdtemp(prefix="ombp-"))
    os.chmod(base, 0o755)
    rows: list[list[str]] = []
    try:
        with namespace_cluster("ab", prefix=f"ombp{os.getpid() % 1000}x", open_to_all=True,
                               leftovers=TAG) as (_, _, _, n):
            for d in n.values():
                assert d.json("status")["migration"].startswith("criu 4"), d.json("status")
                assert d.ctl("set balancing off").ok  # the moves are the bench's own
            print(f"as root ({len(programs)} programs, {args.moves} moves each)", flush=True)
            rows += bench(n["a"], programs, base, None, args.moves)
            if args.user:
                with ordinary_user("bp") as user:
                    print(f"as {user.name}", flush=True)
                    rows += bench(n["a"], programs, base, user, args.moves)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(table(rows))
    same = sum(1 for r in rows if r[3] == "yes" and r[2].split("/")[0] == r[2].split("/")[1])
    print(f"\n{same} of {len(rows)} moved every time with output, files and exit status "
          "identical to a plain run")


if __name__ == "__main__":
    main()
