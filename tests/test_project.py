"""Checks of the project's layout and packaging: one home per fact, a light `import icefast`,
and a wheel that installs and imports on its own, away from the source tree."""
import configparser, importlib.metadata, json, os, re, shutil, subprocess, sys, zipfile
from pathlib import Path

import pytest

try: import tomllib
except ImportError: import tomli as tomllib  # Python 3.10 (nbdev depends on tomli there)

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'icefast'
os.environ.setdefault('KMP_BLOCKTIME', '0')

# prepended to the `-c` scripts below: any attempt to open a network connection raises
NO_NETWORK = r'''
import socket
def _no_network(*args, **kwargs): raise OSError('network access is blocked in this test')
socket.socket.connect = socket.socket.connect_ex = _no_network
socket.create_connection = socket.getaddrinfo = _no_network
'''

# modules a bare `import icefast` must not pull in
HEAVY = ('torch', 'torchvision', 'fastai', 'effdet', 'timm', 'pycocotools', 'matplotlib', 'numpy', 'PIL')


def source_version():
    m = re.search(r'^__version__\s*=\s*[\'"]([^\'"]+)[\'"]', (PKG / '__init__.py').read_text(), re.MULTILINE)
    assert m, 'icefast/__init__.py has no __version__'
    return m.group(1)


def source_py_files():
    "Paths (relative to the repo root) of the package's .py files"
    return sorted(p.relative_to(ROOT).as_posix() for p in PKG.rglob('*.py') if '__pycache__' not in p.parts)


def source_modules():
    "Dotted names of every module of the package in the source tree"
    res = []
    for f in source_py_files():
        parts = f[:-3].split('/')
        if parts[-1] == '__init__': parts = parts[:-1]
        res.append('.'.join(parts))
    return res


def run(args, **kwargs):
    kwargs.setdefault('cwd', ROOT)
    res = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kwargs)
    assert res.returncode == 0, f'{args} failed ({res.returncode})\n--- stdout ---\n{res.stdout}\n--- stderr ---\n{res.stderr}'
    return res


# ---------------------------------------------------------------- (a) layout
def test_top_level_layout():
    for f in ('setup.py', 'settings.ini', 'pyproject.toml', 'README.md', 'LICENSE'): assert (ROOT / f).is_file(), f
    for d in ('nbs', 'icefast', 'tests'): assert (ROOT / d).is_dir(), d
    assert (PKG / '__init__.py').is_file()


def test_pyproject_only_build_system_and_nbdev():
    d = tomllib.loads((ROOT / 'pyproject.toml').read_text())
    assert set(d) == {'build-system', 'tool'}, f'pyproject.toml tables: {sorted(d)}'
    assert set(d['tool']) <= {'nbdev', 'pytest'}, f'pyproject.toml [tool.*] tables: {sorted(d["tool"])}'
    assert d['tool']['pytest']['ini_options']['addopts'] == '--maxschedchunk 1'  # with tests/conftest.py's order
    assert d['tool']['nbdev']['lib_path'] == 'icefast'
    assert d['tool']['nbdev'].get('update_pyproject') is False, 'nbdev-export must not rewrite pyproject.toml'


def test_settings_ini_has_no_version():
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini')
    assert 'version' not in cfg['DEFAULT'], 'the version lives only in icefast/__init__.py'
    assert cfg['DEFAULT']['lib_name'] == 'icefast'


def test_license_is_apache2():
    txt = (ROOT / 'LICENSE').read_text()
    assert 'Apache License' in txt and 'Version 2.0, January 2004' in txt


# ---------------------------------------------------------------- (b) version
def test_version_single_source():
    v = source_version()
    res = run([sys.executable, 'setup.py', '--version'])
    assert res.stdout.strip().splitlines()[-1] == v
    try: installed = importlib.metadata.version('icefast')
    except importlib.metadata.PackageNotFoundError: return
    assert installed == v, f'installed icefast is {installed}, source is {v}: re-run `pip install -e ".[dev]"`'


# ---------------------------------------------------------------- (c) light, offline import
def test_bare_import_is_light_and_offline():
    script = NO_NETWORK + f'''
import sys, icefast
heavy = [m for m in {HEAVY!r} if m in sys.modules]
assert not heavy, f'`import icefast` imported {{heavy}}'
print(icefast.__version__)
'''
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    res = run([sys.executable, '-c', script], env=env)
    assert res.stdout.strip() == source_version()


# ---------------------------------------------------------------- (d) the wheel
def _copy_sources(dest):
    "Copy what a build needs into `dest` (a clean tree: no stale build/ or egg-info can leak in)"
    dest.mkdir()
    for f in ('setup.py', 'settings.ini', 'pyproject.toml', 'README.md', 'LICENSE', 'MANIFEST.in'):
        if (ROOT / f).exists(): shutil.copy2(ROOT / f, dest / f)
    shutil.copytree(PKG, dest / 'icefast', ignore=shutil.ignore_patterns('__pycache__', '*.pyc', '.ipynb_checkpoints'))


def _venv_site_packages(venv):
    res = run([str(venv / 'bin' / 'python'), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'])
    return Path(res.stdout.strip())


def test_wheel_installs_and_imports(tmp_path):
    src, dist, venv, work = tmp_path / 'src', tmp_path / 'dist', tmp_path / 'venv', tmp_path / 'work'
    _copy_sources(src)
    run([sys.executable, '-m', 'build', '--wheel', '--no-isolation', '--outdir', str(dist), str(src)])
    whl, = dist.glob('icefast-*.whl')
    assert whl.name.startswith(f'icefast-{source_version()}-'), whl.name

    names = zipfile.ZipFile(whl).namelist()
    wheel_py = sorted(n for n in names if n.startswith('icefast/') and n.endswith('.py'))
    assert wheel_py == source_py_files(), f'wheel .py files differ from the source tree:\n{wheel_py}\n{source_py_files()}'

    # a fresh venv that sees this environment's site-packages only for the dependencies: a plain
    # path in a .pth file adds the directory but does not run *its* .pth files, so an editable
    # install of icefast there (or the source tree) stays invisible
    run([sys.executable, '-m', 'venv', '--without-pip', str(venv)])
    parent_sites = [p for p in sys.path if p.endswith(('site-packages', 'dist-packages')) and Path(p).is_dir()]
    assert parent_sites, sys.path
    (_venv_site_packages(venv) / '_parent_env.pth').write_text('\n'.join(parent_sites) + '\n')
    run([sys.executable, '-m', 'pip', '--python', str(venv / 'bin' / 'python'), 'install', '--no-deps', '--no-index',
         '--disable-pip-version-check', str(whl)])

    work.mkdir()
    script = NO_NETWORK + '''
import importlib, importlib.metadata, json, sys
import icefast
heavy = [m for m in sys.argv[2].split(',') if m in sys.modules]
assert not heavy, f'`import icefast` imported {heavy}'
files = {m: importlib.import_module(m).__file__ for m in sys.argv[1].split(',')}
print(json.dumps(dict(version=icefast.__version__, dist_version=importlib.metadata.version('icefast'), files=files)))
'''
    env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
    # -I: isolated mode, no PYTHONPATH, user site or cwd on sys.path; cwd is an empty folder anyway
    res = run([str(venv / 'bin' / 'python'), '-I', '-c', script, ','.join(source_modules()), ','.join(HEAVY)],
              cwd=work, env=env)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out['version'] == out['dist_version'] == source_version()
    assert set(out['files']) == set(source_modules())
    venv_dir = venv.resolve()
    for mod, f in out['files'].items():
        f = Path(f).resolve()
        assert f.is_relative_to(venv_dir), f'{mod} imported from {f}, not from the fresh venv'
        assert not f.is_relative_to(ROOT), f'{mod} imported from the source tree: {f}'


def _defines(src:str) -> bool: return bool(re.search(r'^(?:@patch\s*\n)?(?:def|class)\s+\w+', src, re.M))

def test_library_notebooks_document_every_exported_definition():
    "#22: each exported definition cell has markdown beside it, an example with stored output before the next one, and at most 60 lines."
    bad = []
    for nb in sorted((ROOT/'nbs').glob('[01]*.ipynb')):
        cells = json.loads(nb.read_text())['cells']
        src = [''.join(c['source']) for c in cells]
        export = [c['cell_type'] == 'code' and re.match(r'\s*#\|\s*export', s) is not None for c, s in zip(cells, src)]
        for i, s in enumerate(src):
            if not (export[i] and _defines(s)): continue
            j = i + 1
            while j < len(cells) and not (export[j] and _defines(src[j])): j += 1
            after = range(i + 1, j)
            prose = (i > 0 and cells[i-1]['cell_type'] == 'markdown') or any(cells[k]['cell_type'] == 'markdown' for k in after)
            example = any(cells[k]['cell_type'] == 'code' and cells[k].get('outputs') and not re.match(r'\s*#\|\s*(export|hide)', src[k])
                          for k in after)
            lines = len(s.splitlines())
            if not (prose and example and lines <= 60):
                name = re.search(r'^(?:def|class)\s+(\w+)', s, re.M).group(1)
                bad.append(f"{nb.name} cell {i} ({name}, {lines} lines): " + ', '.join(
                    w for w, ok in (('no prose', prose), ('no example with output', example), ('over 60 lines', lines <= 60)) if not ok))
    assert not bad, 'exported definitions without their documentation:\n' + '\n'.join(bad)
