"""The one harness of the benchmarks and of the comparison examples: where a run came from (commit), a resumable
results log, relative paths, per-method summaries and the report writer.

The log is JSON Lines: one object a line, appended as soon as the thing it records is finished, so an interrupted
benchmark loses at most the run in progress, and a re-run skips every run already in the log. Each line has a
`kind` and an `id`:

- `recipe` (first line): everything that must match for runs to be comparable; a log of another recipe is refused.
- `run`: one finished run, keyed by its id (for example `hkt/seed0`), with the commit it ran at.
- `reference`: a number or record the runs are read against (the parent's score...); a later line of the same id
  replaces an earlier one.
- `command`: one invocation (argv, start, commit); a second line of the same id adds its wall time when it ends.

Paths in a log are relative, so that a log reads the same on every checkout: a file or folder relative to the log's
own folder (`RunLog.relative` / `RunLog.resolve`), a command line relative to the repository's root, where the
commands run; `append` refuses a line holding an absolute path.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "benchmarks" / ".cache"  # derived data, parents and trained children (gitignored)
# Tracked files a benchmark writes itself: changing them does not make the code a run ran on "dirty".
OUTPUTS = ("benchmarks/results", "model_cards")


def provenance(repo: Path = REPO) -> dict[str, Any]:
    """The commit the code ran at and whether tracked files other than the benchmark outputs differed from it
    (`dirty`); `commit` is None outside a git checkout."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  *(f":(exclude){path}" for path in OUTPUTS))
    return {"commit": commit, "dirty": bool(changed)}


def relative(path: str | os.PathLike, start: str | os.PathLike = REPO) -> str:
    """`path` relative to `start` (by default the repository's root, where the commands run)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(start))).as_posix()


def relative_argv(argv: Iterable[str], start: str | os.PathLike = REPO) -> list[str]:
    """A command line with every absolute path in it (also after `--flag=`) made `relative`."""

    def one(arg: str) -> str:
        flag, eq, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        return flag + eq + relative(value, start) if os.path.isabs(value) else arg

    return [one(arg) for arg in argv]


def absolute_paths(value: Any) -> list[str]:
    """Every absolute path found in the strings of `value` (a JSON-like object), word by word."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in absolute_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in absolute_paths(v)]
    if isinstance(value, str):
        words = (w.partition("=")[2] if w.startswith("-") else w for w in value.split())
        return [w.strip("`'\"(),;") for w in words if os.path.isabs(w.strip("`'\"(),;"))]
    return []


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def parse_lines(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file. A last line cut short (a process killed while appending it) is dropped:
    the run it recorded counts as unfinished; any other bad line is an error naming it."""
    text = path.read_text().splitlines()
    lines = []
    for number, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(text):
                print(f"{path}:{number}: an incomplete last line (interrupted write) is ignored.", file=sys.stderr)
                continue
            raise SystemExit(f"{path}:{number} is not JSON ({err}); fix or remove that line.") from err
    return lines


def drop_cut_short_tail(path: Path) -> None:
    """Remove a last line without its newline (a process killed while appending it), so appends start clean."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        print(f"{path}: dropping an incomplete last line (interrupted write).", file=sys.stderr)
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


@dataclass
class RunLog:
    """A benchmark's JSON Lines log, read into `recipe`, `runs` (id -> record), `reference` (id -> value) and
    `commands` (in order). Create it with `RunLog.open(path, recipe)`."""

    path: Path
    recipe: dict[str, Any]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> RunLog:
        """The log at `path` as it stands (for reports); it must exist."""
        if not path.is_file():
            raise SystemExit(f"No results log at {path}: run the benchmark first (or pass its --out).")
        lines = parse_lines(path)
        if not lines or lines[0].get("kind") != "recipe":
            raise SystemExit(f"{path} does not start with a recipe line: it is not a results log of this harness.")
        log = cls(path, lines[0]["recipe"])
        for line in lines[1:]:
            log._take(line)
        return log

    @classmethod
    def open(cls, path: Path, recipe: dict[str, Any]) -> RunLog:
        """The log at `path`, or a new one holding `recipe`; a log of another recipe is refused, so that runs of
        different recipes never share a table."""
        recipe = json.loads(json.dumps(recipe, default=str))
        if not path.exists():
            log = cls(path, recipe)
            log._write({"kind": "recipe", "id": "recipe", "recipe": recipe, **provenance()})
            return log
        drop_cut_short_tail(path)
        log = cls.read(path)
        if log.recipe != recipe:
            raise SystemExit(
                f"{path} holds runs of another recipe:\n  stored:    {log.recipe}\n  requested: {recipe}\n"
                "Resume with the same options, or write to a new results folder (--out / --output_dir)."
            )
        return log

    def _take(self, line: dict[str, Any]) -> None:
        kind, key = line["kind"], line["id"]
        body = {k: v for k, v in line.items() if k not in ("kind", "id")}
        if kind == "run":
            self.runs.setdefault(key, body)  # a run is finished once: the first line of an id counts
        elif kind == "reference":
            self.reference[key] = body["value"]
        elif kind == "command":
            self.commands.setdefault(key, {}).update(body)

    def _write(self, line: dict[str, Any]) -> None:
        found = absolute_paths(line)
        if found:
            raise ValueError(f"A results log holds relative paths only; {line['kind']} {line['id']!r} has {found}. "
                             "Pass the path through harness.relative().")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append(self, kind: str, key: str, **body: Any) -> None:
        line = {"kind": kind, "id": key, **json.loads(json.dumps(body, default=str))}
        self._write(line)
        self._take(line)

    def relative(self, path: str | os.PathLike) -> str:
        """`path` as the log stores it: relative to the log's folder."""
        return relative(path, self.path.parent)

    def resolve(self, stored: str) -> Path:
        """A path stored by `relative`, back on this machine."""
        return (self.path.parent / stored).resolve()

    def finished(self, run_id: str) -> bool:
        return run_id in self.runs

    def add_run(self, run_id: str, **record: Any) -> None:
        """Log a finished run with the commit it ran at and when it finished."""
        self.append("run", run_id, **record, **provenance(), finished=now())

    def set_reference(self, key: str, value: Any) -> None:
        if self.reference.get(key) != json.loads(json.dumps(value, default=str)):
            self.append("reference", key, value=value)

    def start_command(self, script: str, argv: list[str]) -> Callable[[], None]:
        """Log an invocation of `script`; the returned function logs its wall time when called at the end."""
        key = f"command/{len(self.commands) + 1}"
        argv_text = shlex.join(["python", script, *relative_argv(argv)])
        self.append("command", key, argv=argv_text, started=now(), **provenance())
        started = time.perf_counter()
        return lambda: self.append("command", key, wall_s=time.perf_counter() - started)


def run_missing(log: RunLog, seeds: Iterable[int], methods: Iterable[str],
                run: Callable[[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every `method/seed<k>` run in seed-major order (an interrupted benchmark leaves every method with similar
    seed counts): `run(method, seed)` for those not in the log yet, each logged as soon as it returns. Returns the
    records of all of them, finished before or now."""
    seeds, methods = list(seeds), list(methods)
    for seed in seeds:
        for method in methods:
            key = f"{method}/seed{seed}"
            if log.finished(key):
                print(f"skip {key}: already in {log.path}", flush=True)
                continue
            print(f"run {key}", flush=True)
            log.add_run(key, **run(method, seed))
            print(f"done {key}", flush=True)
    return [log.runs[f"{method}/seed{seed}"] for seed in seeds for method in methods]


def benchmark_parser(description: str, methods: Iterable[str], default_methods: Iterable[str], cache: Path,
                     quick_help: str) -> argparse.ArgumentParser:
    """The options every accuracy benchmark has: mode, report only, results and cache folders, methods, seeds,
    steps and threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--report", action="store_true", help="only regenerate the report from the results log")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results, or <cache>/quick-results with --quick)")
    parser.add_argument("--cache", type=Path, default=cache, help="derived data, parents and every child run")
    parser.add_argument("--methods", nargs="+", default=list(default_methods), choices=list(methods))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per child run (part of the recipe)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def run_or_report(opts: argparse.Namespace, argv: list[str] | None, run_all: Callable[..., Any],
                  report: Callable[[Path], None]) -> int:
    """What an accuracy benchmark's `main` does once parsed: `--report` only rewrites the report of `--out` (default
    the committed results); else the runs (seeds 0 1 2 by default, 0 with `--quick`), then the report."""
    if opts.report:
        report(opts.out or RESULTS)
        return 0
    opts.seeds = opts.seeds or ([0] if opts.quick else [0, 1, 2])
    run_all(opts, sys.argv[1:] if argv is None else argv)
    return 0


def commands_line(commands: Iterable[dict[str, Any]]) -> str:
    """The Markdown line listing a benchmark's invocations with their wall time and commit, and the total of the
    finished ones."""
    commands = list(commands)

    def one(c: dict[str, Any]) -> str:
        wall = f"{c['wall_s'] / 60:.1f} min" if "wall_s" in c else "not finished: running or interrupted"
        commit = f", commit {c['commit'][:10]}{' + changes' if c.get('dirty') else ''}" if c.get("commit") else ""
        return f"`{c['argv']}` ({c['started']}, {wall}{commit})"

    finished = sum(c.get("wall_s", 0.0) for c in commands)
    return ("Commands: " + "; ".join(one(c) for c in commands)
            + f". Wall time of the finished invocations: {finished / 60:.1f} min.")


def notes_lines(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown paragraphs naming the runs that carry each `note` (how they differ from the rest)."""
    lines = []
    for note in sorted({run["note"] for run in runs.values() if "note" in run}):
        keys = sorted(key for key, run in runs.items() if run.get("note") == note)
        lines += ["", f"{', '.join(f'`{k}`' for k in keys)}: {note}"]
    return lines


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 with one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_text(values: list[float]) -> str:
    """`mean +- std` of `values`, two decimals (the tables' cell)."""
    mean, std = mean_std(values)
    return f"{mean:.2f} +- {std:.2f}"


def by_method(runs: Iterable[dict[str, Any]], metric: str, order: Iterable[str] | None = None
              ) -> dict[str, dict[str, Any]]:
    """Per method (in `order`, else as first seen): seeds, `values` of `metric`, their mean and std, and the mean
    training seconds where the runs record them (`train_s`)."""
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        row = rows.setdefault(run["method"], {"seeds": [], "values": [], "train_s": []})
        row["seeds"].append(run["seed"])
        row["values"].append(run[metric])
        if "train_s" in run:
            row["train_s"].append(run["train_s"])
    for row in rows.values():
        row["mean"], row["std"] = mean_std(row["values"])
        row["mean_train_s"] = statistics.fmean(row["train_s"]) if row["train_s"] else None
    return {m: rows[m] for m in (order if order is not None else rows) if m in rows}


def write_report(out: Path, name: str, title: str, markdown: str, plot: Callable[[Path], None] | None = None) -> None:
    """`<out>/<name>.md` (the title and `markdown`) and, with `plot`, `<out>/<name>.png` drawn by it."""
    atomic_write_text(out / f"{name}.md", f"# {title}\n\n{markdown}\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        plot(out / f"{name}.png")
