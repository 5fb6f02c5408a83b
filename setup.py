"""Packaging for icefast, driven by settings.ini (classic nbdev-2 style).

Where each fact lives:
- version: `__version__` in icefast/__init__.py (read here with a regex, never imported)
- name, description, requirements, console scripts, ...: settings.ini [DEFAULT]
- nbdev settings: pyproject.toml [tool.nbdev]
"""
import re
from configparser import ConfigParser
from pathlib import Path

import setuptools

here = Path(__file__).resolve().parent

parser = ConfigParser(delimiters=['='])
parser.read(here / 'settings.ini', encoding='utf-8')
cfg = parser['DEFAULT']

required = ('lib_name', 'description', 'keywords', 'author', 'author_email', 'license', 'status',
            'min_python', 'audience', 'language', 'git_url', 'requirements')
missing = [k for k in required if k not in cfg]
if missing: raise ValueError(f'settings.ini is missing: {", ".join(missing)}')
if 'version' in cfg: raise ValueError('settings.ini must not set `version`: it lives in icefast/__init__.py')

lib_name = cfg['lib_name']


def read_version():
    "The `__version__` string assigned in `<lib_name>/__init__.py`"
    src = (here / lib_name / '__init__.py').read_text(encoding='utf-8')
    m = re.search(r'^__version__\s*=\s*[\'"]([^\'"]+)[\'"]', src, re.MULTILINE)
    if not m: raise RuntimeError(f'no __version__ found in {lib_name}/__init__.py')
    return m.group(1)


def split_list(key):
    "Whitespace/newline-separated entries of `key` in settings.ini"
    return cfg.get(key, '').split()


# license key -> (license name for metadata, trove classifier)
licenses = {
    'apache2': ('Apache-2.0', 'License :: OSI Approved :: Apache Software License'),
    'mit': ('MIT', 'License :: OSI Approved :: MIT License'),
    'bsd3': ('BSD-3-Clause', 'License :: OSI Approved :: BSD License'),
    'gpl3': ('GPL-3.0-only', 'License :: OSI Approved :: GNU General Public License v3 (GPLv3)'),
}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta',
            '5 - Production/Stable', '6 - Mature', '7 - Inactive']
py_versions = ['3.10', '3.11', '3.12', '3.13', '3.14']

lic_name, lic_classifier = licenses[cfg['license'].lower()]
min_python = cfg['min_python']
as_tuple = lambda v: tuple(int(o) for o in v.split('.'))
classifiers = [
    f'Development Status :: {statuses[int(cfg["status"]) - 1]}',
    f'Intended Audience :: {cfg["audience"].title()}',
    f'Natural Language :: {cfg["language"].title()}',
    'Programming Language :: Python :: 3 :: Only',
    'Topic :: Scientific/Engineering :: Artificial Intelligence',
    'Topic :: Scientific/Engineering :: Image Recognition',
] + [f'Programming Language :: Python :: {v}' for v in py_versions if as_tuple(v) >= as_tuple(min_python)]

# setuptools >= 77 (PEP 639) wants an SPDX `license_expression` and deprecates (and, next to an
# expression, rejects) license classifiers; older setuptools only knows `license` + the classifier.
if as_tuple(re.match(r'\d+(\.\d+)*', setuptools.__version__).group()) >= (77,):
    license_kw = {'license_expression': lic_name}
else:
    license_kw = {'license': lic_name}
    classifiers.insert(3, lic_classifier)

readme = here / 'README.md'
long_description = readme.read_text(encoding='utf-8') if readme.exists() else cfg['description']

setuptools.setup(
    name=lib_name,
    version=read_version(),
    description=cfg['description'],
    long_description=long_description,
    long_description_content_type='text/markdown',
    keywords=cfg['keywords'],
    author=cfg['author'],
    author_email=cfg['author_email'],
    url=cfg['git_url'],
    **license_kw,
    classifiers=classifiers,
    python_requires=f'>={min_python}',
    packages=setuptools.find_packages(include=[lib_name, f'{lib_name}.*']),
    include_package_data=True,
    zip_safe=False,
    install_requires=split_list('requirements'),
    extras_require={'dev': split_list('dev_requirements'), 'fast-eval': split_list('fast_eval_requirements'),
                    'export': split_list('export_requirements'), 'docs': split_list('docs_requirements'),
                    'distributed': split_list('distributed_requirements')},
    entry_points={
        'console_scripts': split_list('console_scripts'),
        # lets nbdev (doclinks / show_doc) find this library's symbol index
        'nbdev': [f'{lib_name}={lib_name}._modidx:d'],
    },
)
