"""The console: ``omuscd --tui`` (daemon and console in one trio run) and
``omuscd console [TARGET]`` (a client of a running daemon).

Everything it shows comes from :class:`tui.source.ClusterSource`; everything it does is a
line of the control language sent through it, the same lines telnet takes (``migrate``,
``kill``, ``block NODE``), so the console adds no language of its own.  urwid runs on
``TrioEventLoop`` inside the caller's trio run: no threads.  The screen refreshes on an
alarm, and only when the model changed.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

import trio
import urwid

from omuscd.client import Reply
from omuscd.control import commands
from tui.palette import PALETTE, want_mono
from tui.source import ClusterSource, Model
from tui.views import VIEWS, Feed, JobTable, NodeTable, header, totals

REDRAW = 0.5  # seconds between looks at the model
HISTORY = 200

KEYS_HELP = """\
Keys
  :            command line (any telnet command; Tab completes, Up/Down history, Esc leaves)
  Tab          next pane: nodes, jobs, events
  Up Down PgUp PgDn Home End   move in the pane
  Enter        details of the selected node or job
  m            migrate the selected job (choose where)
  k            kill the selected job (asks first)
  b            block or unblock the selected node
  v            next view of the node bars: load, speed, memory, utilisation
  ?            this help
  q            quit{quit_note}

Node flags: B blocked (takes no guests), L lstay (keeps its own jobs), Q quiet.
Bars: load is demand per lent CPU (1.00 = all busy); colours change at 0.50 and 0.90.
Type ':help' for the commands, ':help COMMAND' for one of them.
"""


class CommandLine(urwid.Edit):
    """The ':' line: history, completion; Enter runs, Esc leaves."""

    def __init__(self, console: Console):
        super().__init__(("prompt", ": "))
        self.console = console
        self.history: list[str] = []
        self.pos = 0

    def keypress(self, size: tuple[int], key: str) -> str | None:
        if key == "enter":
            line = self.edit_text.strip()
            if line:
                if not self.history or self.history[-1] != line:
                    self.history = [*self.history, line][-HISTORY:]
            self.pos = len(self.history)
            self.set_edit_text("")
            self.console.leave_command_line()
            if line:
                self.console.run_command(line)
            return None
        if key == "esc":
            self.set_edit_text("")
            self.console.leave_command_line()
            return None
        if key in ("up", "down"):
            if self.history:
                self.pos = max(0, min(len(self.history), self.pos + (-1 if key == "up" else 1)))
                text = self.history[self.pos] if self.pos < len(self.history) else ""
                self.set_edit_text(text)
                self.set_edit_pos(len(text))
            return None
        if key == "tab":
            self.complete()
            return None
        return super().keypress(size, key)

    def complete(self) -> None:
        text = self.edit_text[:self.edit_pos]
        words = text.split(" ")
        word = words[-1]
        if len(words) == 1:
            options = commands.completions(word)
        else:
            options = sorted(o for o in self.console.words_for(words[0], len(words) - 2)
                             if o.startswith(word))
        if not options:
            self.console.say("no completion", error=True)
            return
        common = _common_prefix(options)
        add = common[len(word):]
        if len(options) == 1:
            add += " "
        else:
            self.console.say("  ".join(options[:30]) + ("  ..." if len(options) > 30 else ""))
        if add:
            self.insert_text(add)


def _common_prefix(words: list[str]) -> str:
    first, last = min(words), max(words)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


class Dialog(urwid.WidgetWrap):
    """A framed box over the screen; ``keys`` maps a key to an action, Esc closes."""

    def __init__(self, title: str, body: urwid.Widget, keys: dict[str, Callable[[], None]],
                 close: Callable[[], None]):
        self.keys = keys
        self.close = close
        super().__init__(urwid.AttrMap(urwid.LineBox(body, title=title), "dialog"))

    def selectable(self) -> bool:
        return True  # a dialog of plain text still takes its keys (y, n, s, l, Esc)

    def keypress(self, size: tuple[int, int], key: str) -> str | None:
        if key in self.keys:
            self.keys[key]()
            return None
        key = super().keypress(size, key)
        if key in ("esc", "q"):
            self.close()
            return None
        return key


class Console:
    """The screen, its keys and its dialogs; ``run`` until the user quits."""

    def __init__(self, source: ClusterSource, where: str, mono: bool = False,
                 in_daemon: bool = False, redraw: float = REDRAW):
        self.source = source
        self.model: Model = source.model
        self.where = where
        self.mono = want_mono(mono)
        self.in_daemon = in_daemon
        self.redraw = redraw
        self.view = VIEWS[0]
        self.nodes = NodeTable()
        self.jobs = JobTable(self.model.node_name)
        self.feed = Feed()
        self.head = urwid.Text("", wrap="clip")
        self.total = urwid.Text("", wrap="clip")
        self.line = CommandLine(self)
        self.message = urwid.Text(self.hints(), wrap="clip")
        self.footer = urwid.WidgetPlaceholder(urwid.AttrMap(self.message, "footer"))
        self.panes = urwid.Pile([
            ("weight", 3, self.nodes),
            ("pack", urwid.AttrMap(self.total, "title")),
            ("weight", 3, self.jobs),
            ("pack", urwid.AttrMap(urwid.Divider("-"), "dim")),
            ("weight", 2, self.feed),
        ])
        self.frame = urwid.Frame(self.panes, header=urwid.AttrMap(self.head, "header"),
                                 footer=self.footer)
        self.top = urwid.WidgetPlaceholder(self.frame)
        self.loop: urwid.MainLoop | None = None
        self.nursery: trio.Nursery | None = None
        self.quit_choice: str | None = None  # "stop" or "leave" (--tui)
        self.shown_version = -1
        self.update()

    # ------------------------------------------------------------------ drawing
    def hints(self) -> str:
        return " ? help  : command  Tab pane  Enter details  m migrate  k kill  b block  " \
               "v view  q quit"

    def update(self) -> None:
        """Move the model into the widgets (cheap: rows format themselves when drawn)."""
        m = self.model
        self.head.set_text(header(m, self.view, self.where))
        if m.version == self.shown_version:
            return
        self.shown_version = m.version
        self.nodes.update(m.nodes)
        self.jobs.update(m.jobs)
        self.total.set_text(totals(m.nodes, m.jobs))
        self.feed.update(m.feed, m.feed_version)

    def _tick(self, loop: urwid.MainLoop, _data: Any = None) -> None:
        self.update()
        loop.set_alarm_in(self.redraw, self._tick)

    def say(self, text: str, error: bool = False) -> None:
        """One line at the bottom, until the next key."""
        self.message.set_text(("reply-err" if error else "footer", " " + text))

    # ------------------------------------------------------------------ keys
    def on_key(self, key: str | tuple[Any, ...]) -> None:
        if not isinstance(key, str):
            return  # mouse
        self.message.set_text(self.hints())
        if key == ":":
            self.enter_command_line()
        elif key == "tab":
            self.panes.focus_position = {0: 2, 2: 4, 4: 0}.get(self.panes.focus_position, 0)
        elif key == "enter":
            self.details()
        elif key == "m":
            self.ask_migrate()
        elif key == "k":
            self.ask_kill()
        elif key == "b":
            self.toggle_block()
        elif key == "v":
            self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]
            self.nodes.set_view(self.view)
            self.update()
        elif key == "?":
            self.show_help()
        elif key in ("q", "Q"):
            self.ask_quit()

    def enter_command_line(self) -> None:
        self.footer.original_widget = urwid.Pile([urwid.AttrMap(self.message, "footer"),
                                                  self.line])
        self.footer.original_widget.focus_position = 1
        self.message.set_text(" Enter runs the line, Tab completes, Up/Down history, "
                              "Esc leaves")
        self.frame.focus_position = "footer"

    def leave_command_line(self) -> None:
        self.footer.original_widget = urwid.AttrMap(self.message, "footer")
        self.frame.focus_position = "body"

    def words_for(self, command: str, index: int) -> list[str]:
        """Completion candidates for the argument at ``index`` of ``command``."""
        cmd = commands.COMMANDS.get(command.lower())
        if cmd is None:
            return []
        out = ["--json"] if cmd.json else []
        out += [f"--{o.name}" for o in cmd.options]
        arg = cmd.args[index] if index < len(cmd.args) else None
        if arg is not None and arg.choices:
            return out + list(arg.choices)
        if arg is not None and arg.name == "command":
            return out + list(commands.COMMANDS)
        out += [str(n["name"]) for n in self.model.nodes]
        out += [str(j["id"]) for j in self.model.jobs]
        if arg is not None and arg.name == "where":
            out += ["home", "best"]
        return out

    # ------------------------------------------------------------------ commands
    def run_command(self, line: str, after: Callable[[Reply], None] | None = None) -> None:
        """Send a line of the control language; show its reply."""
        assert self.nursery is not None
        self.nursery.start_soon(self._command, line, after)

    async def _command(self, line: str, after: Callable[[Reply], None] | None) -> None:
        word = line.split()[0].lower()
        if word in ("quit", "exit"):
            self.ask_quit()
            return
        if word == "watch":
            self.say("the event pane below is the watch", error=False)
            return
        if word == "attach":
            self.say("attach needs a terminal of its own: use 'omuscd attach JOB'", error=True)
            return
        reply = await self.source.command(line, lambda text: self.say(text))
        if after is not None:
            after(reply)
        elif len(reply.lines) > 1:
            self.show_text(line, reply.lines, error=not reply.ok)
        else:
            self.say(f"{reply.code} {reply.text}", error=not reply.ok)
        self.update()

    # ------------------------------------------------------------------ dialogs
    def open(self, dialog: urwid.Widget, width: int = 80, height: int = 80) -> None:
        self.top.original_widget = urwid.Overlay(
            dialog, self.frame, "center", ("relative", width), "middle", ("relative", height),
            min_width=20, min_height=5)

    def close(self) -> None:
        self.top.original_widget = self.frame

    def show_text(self, title: str, lines: list[str], error: bool = False) -> None:
        attr = "reply-err" if error else "dialog"
        body = urwid.ListBox(urwid.SimpleFocusListWalker(
            [urwid.Text((attr, ln)) for ln in lines] or [urwid.Text("")]))
        self.open(Dialog(title[:60], body, {"enter": self.close}, self.close), 90, 80)

    def show_help(self) -> None:
        note = " (asks whether to stop the daemon too)" if self.in_daemon else ""
        self.show_text("help", KEYS_HELP.format(quit_note=note).splitlines())

    def focused_table(self) -> str:
        return {0: "nodes", 2: "jobs"}.get(self.panes.focus_position, "")

    def details(self) -> None:
        pane = self.focused_table()
        if pane == "nodes" and (n := self.nodes.selected()) is not None:
            self.run_command(f"node {n['id']}", lambda r: self.show_text(
                f"node {n['name']}", r.lines, not r.ok))
        elif pane == "jobs" and (j := self.jobs.selected()) is not None:
            self.run_command(f"job {j['id']}", lambda r: self.show_text(
                f"job {j['id']}", r.lines, not r.ok))

    def selected_job(self) -> dict[str, Any] | None:
        job = self.jobs.selected() if self.focused_table() == "jobs" else None
        if job is None:
            self.say("select a job first (Tab to the jobs pane)", error=True)
        return job

    def ask_migrate(self) -> None:
        job = self.selected_job()
        if job is None:
            return
        if job["state"] != "running":
            self.say(f"job {job['id']} is {job['state']}", error=True)
            return
        choices: list[tuple[str, str]] = [("best", "best: where there is most room"),
                                          ("home", "home: back to where it started")]
        for n in self.model.nodes:
            if n["state"] == "alive" and n["id"] != job["node"]:
                flags = " ".join(n.get("flags", []))
                choices.append((str(n["name"]), f"{n['name']} (id {n['id']}): load "
                                f"{n['load']:.2f}, {n['cpus']} CPUs {flags}"))

        def pick(target: str) -> Callable[[urwid.Button], None]:
            def go(_b: urwid.Button) -> None:
                self.close()
                self.say(f"migrating job {job['id']} to {target} ...")
                self.run_command(f"migrate {job['id']} {shlex.quote(target)}")
            return go

        buttons = [urwid.AttrMap(urwid.Button(label, pick(t)), "dialog", "dialog-focus")
                   for t, label in choices]
        body = urwid.ListBox(urwid.SimpleFocusListWalker(buttons))
        self.open(Dialog(f"migrate job {job['id']} from {job.get('node_name')} to", body, {},
                         self.close), 70, 60)

    def ask_kill(self) -> None:
        job = self.selected_job()
        if job is None:
            return

        def kill() -> None:
            self.close()
            self.run_command(f"kill {job['id']}")

        text = urwid.Filler(urwid.Text(f"Send SIGTERM to job {job['id']} "
                                       f"({job.get('command', '')[:40]})?\n\n"
                                       "y: yes   n or Esc: no", align="center"))
        self.open(Dialog("kill", text, {"y": kill, "n": self.close}, self.close), 60, 30)

    def toggle_block(self) -> None:
        node = self.nodes.selected() if self.focused_table() == "nodes" else None
        if node is None:
            self.say("select a node first (Tab to the nodes pane)", error=True)
            return
        blocked = "blocked" in node.get("flags", [])
        self.run_command(f"{'noblock' if blocked else 'block'} {node['id']}")

    def ask_quit(self) -> None:
        if not self.in_daemon:
            raise urwid.ExitMainLoop()

        def choose(what: str) -> Callable[[], None]:
            def done() -> None:
                self.quit_choice = what
                raise urwid.ExitMainLoop()
            return done

        text = urwid.Filler(urwid.Text(
            "Quit the console.\n\ns: stop the daemon too (departure announced)\n"
            "l: leave the daemon running without a console\nEsc: back to the console",
            align="left"))
        self.open(Dialog("quit", text, {"s": choose("stop"), "l": choose("leave"),
                                        "y": choose("stop")}, self.close), 60, 40)

    # ------------------------------------------------------------------ running
    def main_loop(self, screen: urwid.BaseScreen | None = None) -> urwid.MainLoop:
        loop = urwid.MainLoop(self.top, PALETTE, screen=screen, unhandled_input=self.on_key,
                              event_loop=urwid.TrioEventLoop(), handle_mouse=False)
        if self.mono:
            loop.screen.set_terminal_properties(colors=1)
        self.loop = loop
        return loop

    async def run(self) -> None:
        """Show the console until the user quits; the source runs beside it."""
        loop = self.main_loop()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.source.run)
            loop.set_alarm_in(0, self._tick)
            with loop.start():
                await loop.event_loop.run_async()
            nursery.cancel_scope.cancel()
