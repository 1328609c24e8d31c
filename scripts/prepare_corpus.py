"""Prepare the shipped text corpus: the Python 3.11 documentation sources (reStructuredText) from Debian.

    python scripts/prepare_corpus.py                      # runs `apt-get download python3.11-doc`
    python scripts/prepare_corpus.py --deb python3.11-doc_3.11.2-6+deb12u8_all.deb

Source: Debian bookworm's ``python3.11-doc`` package, files ``usr/share/doc/python3.11/html/_sources/
**/*.rst.txt`` (the documentation's reST sources, real English technical prose with code examples),
licensed under the PSF License Agreement (see ``LICENSE-PSF.txt`` written beside the corpus, copied
from the package's ``copyright`` file).

Split (fixed, by document, so no page is split across sets): a document goes to ``test`` if the first
byte of SHA-256(its relative path) is < 13 (~5 %), to ``calib`` if < 26 (~5 %), else to ``train``.
``calib`` (threshold and neuron-importance calibration) and ``test`` (evaluation) are disjoint from
each other and from ``train``. Each split is the UTF-8 concatenation of its documents in path order,
separated by a blank line, written xz-compressed to ``data/pydocs/{train,calib,test}.txt.xz``;
``manifest.json`` lists the documents of each split with their SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import pathlib
import subprocess
import tempfile

PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
SPLITS = (("test", 13), ("calib", 26), ("train", 256))


def split_of(relpath: str) -> str:
    first = hashlib.sha256(relpath.encode()).digest()[0]
    return next(name for name, limit in SPLITS if first < limit)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deb", help=f"a downloaded {PACKAGE} .deb (default: apt-get download it)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "data" / "pydocs"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True)
            deb = str(next(pathlib.Path(tmp).glob(f"{PACKAGE}_*.deb")))
        version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        root = pathlib.Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", deb, str(root)], check=True)
        src = root / SOURCES
        docs = sorted(str(p.relative_to(src)) for p in src.rglob("*.rst.txt"))
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"source": f"Debian package {PACKAGE} {version}, {SOURCES}/**/*.rst.txt",
                    "license": "PSF License Agreement (LICENSE-PSF.txt)", "split_rule": __doc__.split("Split")[1].strip(),
                    "splits": {}}
        for name, _ in SPLITS:
            members = [d for d in docs if split_of(d) == name]
            texts = [(src / d).read_text(encoding="utf-8").strip() + "\n" for d in members]
            data = "\n".join(texts).encode("utf-8")
            with lzma.open(out / f"{name}.txt.xz", "wb", preset=9 | lzma.PRESET_EXTREME) as f:
                f.write(data)
            manifest["splits"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                        "documents": {d: hashlib.sha256(t.encode()).hexdigest()[:16]
                                                      for d, t in zip(members, texts)}}
            print(f"{name:6s} {len(members):4d} documents {len(data):10,d} bytes")
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        (out / "LICENSE-PSF.txt").write_bytes((root / "usr/share/doc" / PACKAGE / "copyright").read_bytes())


def load_split(name: str, root: str | pathlib.Path | None = None) -> bytes:
    """The UTF-8 bytes of one split ("train", "calib", "test")."""
    root = pathlib.Path(root) if root else pathlib.Path(__file__).resolve().parents[1] / "data" / "pydocs"
    return lzma.open(root / f"{name}.txt.xz").read()


if __name__ == "__main__":
    main()
