"""Run every notebook in nbs/ as a test, the way `nbdev-test` does.

Each notebook runs in its own process through `nbdev.test.test_nb`, so notebooks cannot leak
state (imports, globals, torch threads) into each other or into the rest of the test session,
and a failing cell's traceback ends up in the pytest report. The processes are forked from a
`multiprocessing` fork server that has imported `icefast.all` once (about 9 s of CPU a
notebook, measured with `python -X importtime`): a fork shares the imported modules and
nothing else, since the server never runs a notebook itself. Cells flagged with
one of the `tst_flags` in pyproject.toml's [tool.nbdev] (`#| slow`) are skipped.
"""
import os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
os.environ.setdefault('KMP_BLOCKTIME', '0')  # idle OpenMP threads must not spin (slow on few cores)


def _skip(p):
    "Leave out notebooks (or folders) whose names start with `_` or `.` (as nbdev does)"
    return any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts)


NOTEBOOKS = sorted(p for p in NBS.rglob('*.ipynb') if not _skip(p))


def _nbdev_cfg():
    from nbdev.config import get_config
    return get_config(ROOT)


# imported once in the fork server; each notebook's process starts with them loaded
PRELOAD = ['icefast.all', 'nbdev.test', 'execnb.shell', 'matplotlib.pyplot']
_CONTEXT = []


def _context():
    "The fork server's context, started on first use in this (xdist worker) process with its environment."
    if not _CONTEXT:
        import multiprocessing as mp
        ctx = mp.get_context('forkserver')
        ctx.set_forkserver_preload(PRELOAD)
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def _run_notebook(fn, basepath, flags, timeout, log):
    "In the forked process: run notebook `fn` as `nbdev-test` does, its output and errors into file `log`."
    from nbdev.test import test_nb
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1); os.dup2(fd, 2)
    os.environ.pop('IN_TEST', None)  # test_nb sets it itself while the notebook runs
    os.chdir(Path(fn).parent)
    ok, secs = test_nb(fn, skip_flags=flags, basepath=basepath, cell_timeout=timeout or None)
    print(f'{fn}: {"passed" if ok else "FAILED"} in {secs:.1f}s')
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0 if ok else 1)


def test_found_notebooks():
    assert NOTEBOOKS, f'no notebooks found in {NBS}'


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.relative_to(NBS).as_posix() for p in NOTEBOOKS])
def test_notebook(nb, tmp_path):
    cfg = _nbdev_cfg()
    flags = cfg.tst_flags
    flags = ' '.join(flags.split() if isinstance(flags, str) else flags or [])
    timeout = int(cfg.get('cell_timeout') or 0)
    log = tmp_path / 'notebook.log'
    proc = _context().Process(target=_run_notebook, args=(str(nb), str(ROOT), flags.split(), timeout, str(log)))
    proc.start(); proc.join()
    if proc.exitcode != 0:
        out = log.read_text(errors='replace') if log.exists() else ''
        pytest.fail(f'notebook {nb.relative_to(ROOT)} failed (exit {proc.exitcode})\n{out[-20000:]}', pytrace=False)
