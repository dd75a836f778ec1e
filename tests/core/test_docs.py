"""The documentation site (mkdocs.yml, docs/): its reference pages are generated from the code and name every
command, option and configuration key; the site builds with ``mkdocs build --strict``, needs no network, and
opens in headless Chromium without console errors, its search answering over a local HTTP server (search does
not run from ``file://``).

The reference checks need only the code; the build and page checks need the ``docs`` extra (and Chromium) and
skip without it, except under ``CI=true`` (``.ci/run`` installs both).
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = ["index.html", "getting-started.html", "howto/predict.html", "howto/train.html", "howto/evaluate.html",
         "howto/published-models.html", "reference/cli.html", "reference/config.html", "reference/api.html",
         "benchmarks.html", "changelog.html"]


@pytest.fixture(scope="module")
def hook():
    spec = importlib.util.spec_from_file_location("synth7t_docs_reference", REPO / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------
# the generated reference pages


def test_cli_reference_names_every_command_and_option(hook):
    import typer

    from synth7t.cli import app

    page = hook.cli_markdown()
    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert len(names) >= 8
    group = typer.main.get_command(app)
    for name in names:
        assert f"## `synth7t {name}` {{#synth7t-{name}}}" in page, name
        section = page.split(f"## `synth7t {name}`", 1)[1].split("\n## ", 1)[0]
        for param in group.commands[name].params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("-"):
                    assert opt in section, f"synth7t {name}: {opt} missing from the reference"
    for opt in ("--verbose", "--quiet", "--version"):
        assert opt in page


def _schema_keys(schema: dict) -> set[str]:
    """Every dotted key of a pydantic JSON schema: nested sections, unions (``anyOf``/``oneOf``) and ``$ref``s."""
    defs = schema.get("$defs", {})

    def walk(node: dict, prefix: str) -> set[str]:
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        keys = set()
        for alt in node.get("anyOf", []) + node.get("oneOf", []):
            keys |= walk(alt, prefix)
        for name, sub in node.get("properties", {}).items():
            keys.add(prefix + name)
            keys |= walk(sub, f"{prefix}{name}.")
        return keys

    return walk(schema, "")


def test_config_reference_names_every_key(hook):
    from synth7t.config import PRESETS, TrainConfig
    from synth7t.preprocess.subject import PreprocessConfig

    page = hook.config_markdown()
    train_part, preprocess_part = page.split("## Preprocessing settings", 1)
    keys = _schema_keys(TrainConfig.model_json_schema())
    assert {"model.channels", "model.num_res_units", "critic.residual", "data.augment.gmm.p", "optim.ema_decay",
            "trainer.precision"} <= keys  # both model kinds and the optional critic are walked
    missing = sorted(k for k in keys if f"`{k}`" not in train_part)
    assert not missing, f"keys missing from reference/config.md: {missing}"
    missing = sorted(k for k in _schema_keys(PreprocessConfig.model_json_schema()) if f"`{k}`" not in preprocess_part)
    assert not missing, f"preprocessing settings missing: {missing}"
    for preset in PRESETS:
        assert f"synth7t/presets/{preset}.yaml" in page and f" `{preset}` |" in page


def test_markdown_escaping(hook):
    assert hook.md_text("a_b *c* <d> & `x_y` ``z_w``") == "a\\_b \\*c\\* &lt;d&gt; &amp; `x_y` ``z_w``"
    assert hook.md_text(":func:`~synth7t.io.load_volume` and :class:`synth7t.io.Volume`") == \
        "`load_volume` and `synth7t.io.Volume`"
    assert hook.md_text("* item_one\n* item") == "* item\\_one\n* item"


# ---------------------------------------------------------------------------------------------------------
# the built site


def _require_mkdocs() -> None:
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the docs extra (mkdocs, mkdocs-material, mkdocstrings) is required in CI (.ci/run)")
        pytest.skip("mkdocs not installed (pip install -e '.[docs]')")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` into a temporary folder; fails on any warning (broken link, missing anchor)."""
    _require_mkdocs()
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING" not in res.stderr, res.stderr
    return out


def test_site_has_every_page_and_no_remote_asset(site):
    for name in PAGES:
        html = (site / name).read_text()
        remote = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(?:https?:)?//[^"]+"', html)
        assert not remote, f"{name} loads remote assets: {remote[:3]}"
    cli = (site / "reference" / "cli.html").read_text()
    assert 'id="synth7t-predict"' in cli and "--participant-label" in cli
    assert 'id="synth7t.inference.cohort.predict"' in (site / "reference" / "api.html").read_text()
    assert "Unreleased" in (site / "changelog.html").read_text()


@pytest.fixture(scope="module")
def served(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_site_opens_without_errors_and_searches(served, chromium, browser_helper):
    for name in PAGES:
        page, errors = chromium.open_page(f"{served}/{name}", width=1280, height=900)
        assert errors == [], f"{name}: {errors}"
        assert page.locator("h1").count() >= 1
        if name == "reference/cli.html":
            browser_helper.screenshot(page, "docs_cli_reference.png")
        page.close()
    page, errors = chromium.open_page(f"{served}/index.html", width=1280, height=900)
    page.keyboard.press("/")  # Material's shortcut: open the search and focus its input
    page.fill("input.md-search__input", "shard")
    page.wait_for_selector(".md-search-result__item", timeout=30_000)
    assert page.locator(".md-search-result__item").count() > 0
    assert errors == []
    page.close()
