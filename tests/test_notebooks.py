"""Run every notebook in nbs/ as a test, the way `nbdev-test` does.

Each notebook runs in its own Python subprocess through `nbdev.test.test_nb`, so notebooks
cannot leak state (imports, globals, torch threads) into each other or into the rest of the
test session, and a failing cell's traceback ends up in the pytest report. Cells flagged with
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


_RUNNER = r'''
import sys
from nbdev.test import test_nb
fn, basepath, flags, timeout = sys.argv[1], sys.argv[2], sys.argv[3].split(), int(sys.argv[4])
ok, secs = test_nb(fn, skip_flags=flags, basepath=basepath, cell_timeout=timeout or None)
print(f'{fn}: {"passed" if ok else "FAILED"} in {secs:.1f}s')
sys.exit(0 if ok else 1)
'''


def test_found_notebooks():
    assert NOTEBOOKS, f'no notebooks found in {NBS}'


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.relative_to(NBS).as_posix() for p in NOTEBOOKS])
def test_notebook(nb):
    cfg = _nbdev_cfg()
    flags = cfg.tst_flags
    flags = ' '.join(flags.split() if isinstance(flags, str) else flags or [])
    timeout = int(cfg.get('cell_timeout') or 0)
    env = dict(os.environ)
    env.setdefault('KMP_BLOCKTIME', '0')
    env.pop('IN_TEST', None)  # test_nb sets it itself while the notebook runs
    # the source tree's package must win over any installed copy
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    res = subprocess.run([sys.executable, '-c', _RUNNER, str(nb), str(ROOT), flags, str(timeout)],
                         cwd=nb.parent, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        pytest.fail(f'notebook {nb.relative_to(ROOT)} failed (exit {res.returncode})\n'
                    f'--- stderr ---\n{res.stderr[-20000:]}\n--- stdout ---\n{res.stdout[-5000:]}', pytrace=False)
