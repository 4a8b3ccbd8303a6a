"""Writes plots_template/index.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

`dvc plots show` / `dvc plots diff` fill an HTML template (.dvc/config: plots.html_template). DVC's
own page loads the three scripts from a CDN, so offline it stays blank; this one carries them, so
dvc_plots/index.html opens with no network. The template has no `{scripts}` placeholder on purpose:
DVC would put its CDN <script> tags there. Rebuild (e.g. for newer versions, see LICENSES.md):

    cd /tmp && npm pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
    for f in vega-*.tgz; do mkdir -p "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done
    python plots_template/build.py /tmp/vega-5.33.1 /tmp/vega-lite-5.23.0 /tmp/vega-embed-6.29.0
"""
import json
import re
import sys
from pathlib import Path

# the UMD bundles, in load order: vega-lite needs the global `vega`, vega-embed both
BUNDLES = ("vega", "vega-lite", "vega-embed")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Written by plots_template/build.py: %(versions)s, inlined (BSD-3-Clause, see
         plots_template/LICENSES.md) so that the page loads nothing from the network. -->
%(scripts)s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def bundle(package: Path, name: str) -> tuple[str, str]:
    """(version, minified UMD source without its source-map comment) of one unpacked npm package."""
    version = json.loads((package / "package" / "package.json").read_text())["version"]
    source = (package / "package" / "build" / f"{name}.min.js").read_text(encoding="utf8")
    source = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "\n", source)
    # inlined, a script must not close its own tag, nor hold a placeholder DVC substitutes
    for forbidden in ("</script", "{scripts}", "{plot_divs}", "{refresh_tag}"):
        assert forbidden not in source, f"{name}.min.js contains {forbidden!r}"
    return version, source


def main(packages: list[str]) -> None:
    assert len(packages) == len(BUNDLES), f"usage: build.py {' '.join(f'UNPACKED_{b}' for b in BUNDLES)}"
    built = [bundle(Path(p), name) for p, name in zip(packages, BUNDLES)]
    versions = ", ".join(f"{name} {version}" for name, (version, _) in zip(BUNDLES, built))
    scripts = "\n".join(f"    <script>/* {name} {version} */\n{source}</script>"
                        for name, (version, source) in zip(BUNDLES, built))
    out = Path(__file__).with_name("index.html")
    out.write_text(PAGE % {"versions": versions, "scripts": scripts}, encoding="utf8")
    print(f"{out}: {out.stat().st_size} bytes ({versions})")


if __name__ == "__main__":
    main(sys.argv[1:])
