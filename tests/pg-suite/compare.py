#!/usr/bin/env python3
"""Compares three runs of PostgreSQL's regression suite (scripts/pg-suite).

Why this exists: "PostgreSQL behaves exactly as without tde" is checked
against PostgreSQL's own expected output, test by test:

- stock (no tde) and preload (tde in shared_preload_libraries, not created)
  must give byte-identical results for every test, with the same outcome;
- tde_heap (every table of the suite encrypted) may differ from stock only
  by the lines listed in expected-differences, each with a reason.

Usage: compare.py WORKDIR EXPECTED_DIFFERENCES [--write]
Prints TAP; exits non-zero on any failure.  --write rewrites the expected
differences file from this run (keeping the reasons already written), for a
human to review and complete: an entry without a reason fails the check.
"""
import difflib
import os
import re
import sys


def outcomes(run_dir):
    """test name -> 'ok' / 'not ok', from pg_regress's TAP log."""
    res = {}
    with open(os.path.join(run_dir, "pg_regress.log"), errors="replace") as f:
        for line in f:
            m = re.match(r"^(ok|not ok)\s+\d+\s+[-+]\s+(\S+)", line)
            if m:
                res[m.group(2)] = m.group(1)
    return res


def result(run_dir, test):
    p = os.path.join(run_dir, "results", test + ".out")
    try:
        with open(p, errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return None


def changes(a, b):
    """The changed lines from a to b, in order, as '- line' / '+ line'."""
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        out += ["- " + x for x in a[i1:i2]]
        out += ["+ " + x for x in b[j1:j2]]
    return out


def read_expected(path):
    """test -> (reason, [lines])"""
    exp, test = {}, None
    if not os.path.exists(path):
        return exp
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if line.startswith("== "):
                test = line[3:].strip()
                exp[test] = ["", []]
            elif test is None or line.startswith("#") and not line.startswith("# why:"):
                continue
            elif line.startswith("# why:"):
                exp[test][0] = line[len("# why:"):].strip()
            elif line.startswith(("- ", "+ ")) or line in ("-", "+"):
                exp[test][1].append(line if len(line) > 1 else line + " ")
    return exp


def write_expected(path, diffs, old):
    with open(path, "w") as f:
        f.write(
            "# tests/pg-suite/expected-differences: where PostgreSQL's regression suite\n"
            "# may differ when every table is tde_heap (scripts/pg-suite, mode tde_heap)\n"
            "# from the same suite without tde.  One entry per test: '== test', a\n"
            "# '# why:' line, then the changed lines in order ('- ' stock, '+ ' tde_heap).\n"
            "# Any other difference, or a missing one, fails the check.\n"
        )
        for test in sorted(diffs):
            reason = old.get(test, ["", []])[0] or "TODO"
            f.write("\n== %s\n# why: %s\n" % (test, reason))
            for line in diffs[test]:
                f.write(line + "\n")


def main():
    work, expected_path = sys.argv[1], sys.argv[2]
    write = "--write" in sys.argv[3:]
    runs = {m: os.path.join(work, m) for m in ("stock", "preload", "tde_heap")}
    out = {m: outcomes(d) for m, d in runs.items()}
    n, bad = 0, 0

    def tap(ok, what, detail=None):
        nonlocal n, bad
        n += 1
        print(("ok" if ok else "not ok") + " %d - %s" % (n, what))
        if not ok:
            bad += 1
            for line in (detail or [])[:60]:
                print("#   " + line)

    tests = sorted(out["stock"])
    tap(len(tests) > 200, "stock run: %d tests ran" % len(tests))
    failed = [t for t in tests if out["stock"][t] != "ok"]
    tap(not failed, "stock run: every test passes", failed)

    for t in tests:
        a, b = result(runs["stock"], t), result(runs["preload"], t)
        same = a is not None and a == b and out["preload"].get(t) == out["stock"][t]
        tap(same, "preload = stock: %s" % t, None if same else changes(a or [], b or []))

    diffs = {}
    for t in tests:
        a, b = result(runs["stock"], t), result(runs["tde_heap"], t)
        d = changes(a or [], b or [])
        if b is None:
            d = ["+ (no result file)"]
        if d:
            diffs[t] = d
    if write:
        write_expected(expected_path, diffs, read_expected(expected_path))
    exp = read_expected(expected_path)
    for t in tests:
        got = diffs.get(t, [])
        want = exp.get(t, ["", []])
        if not got and not want[1]:
            tap(True, "tde_heap = stock: %s" % t)
        elif got == want[1]:
            tap(bool(want[0]) and want[0] != "TODO", "tde_heap differs from stock only as expected: %s (%s)" % (t, want[0] or "no reason given"))
        else:
            tap(False, "tde_heap vs stock: %s differs unexpectedly" % t,
                ["expected:"] + want[1] + ["got:"] + got)
    stale = sorted(set(exp) - set(tests))
    tap(not stale, "expected-differences names only tests that ran", stale)
    print("1..%d" % n)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
