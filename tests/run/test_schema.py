"""The run directory's tables against docs/schemas.md: the page documents every file a real run
writes (and every parquet column under its file's heading), and readers refuse a table that does
not match it with one line (``steercmp report`` exits 2 and leaves the run directory as it was)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch

from steercmp.cli import main
from steercmp.config import Experiment
from steercmp.errors import ConfigError
from steercmp.plugin_manager import build_plugin_manager
from steercmp.report import write_report
from steercmp.run.distributed import PluginSpec, merge_shards, run_sharded
from steercmp.schemas import (
    BASELINE_SCHEMA,
    CELL_SCHEMA,
    CELLS,
    COMPLETION_SCHEMA,
    COMPLETIONS,
    END_COLUMNS,
    STATUSES,
    check_table,
    read_table,
)
from steercmp.stats.paired import PAIRED_SCHEMA
from steercmp.stats.summary import SUMMARY_SCHEMA
from steercmp.testing import run_experiment, write_tiny_experiment
from steercmp.testing.running import TINY_BUILTINS

DOC = Path(__file__).resolve().parents[2] / "docs" / "schemas.md"
HEADING = re.compile(r"^#+ `([^`]+)`\s*$")


# ----------------------------------------------------------------------------- the page
def doc_sections() -> dict[str, str]:
    """``{path pattern: text}`` for every backticked heading of the page's Run directory part."""
    text = DOC.read_text()
    part = text[text.index("## Run directory"):text.index("## Conditions")]
    heads = list(re.finditer(r"^#+ .*$", part, flags=re.M))
    out = {}
    for i, h in enumerate(heads):
        m = HEADING.match(h.group(0))
        if m:
            end = heads[i + 1].start() if i + 1 < len(heads) else len(part)
            out[m.group(1)] = part[h.end():end]
    return out


def _segment(pattern: str) -> str:
    """One path segment of a heading as a regex: ``<name>`` is any non-empty name."""
    return "".join("[^/]+" if p.startswith("<") else re.escape(p) for p in re.split(r"(<[^>]+>)", pattern))


def _matches(pattern: str, rel: str, *, directory: bool) -> bool:
    pp, rp = [p for p in pattern.split("/") if p], rel.split("/")
    if directory:  # a folder is documented by a heading that names it or a path inside it
        ok_len = len(pp) > len(rp) or (len(pp) == len(rp) and pattern.endswith("/"))
    else:
        ok_len = len(pp) == len(rp) and not pattern.endswith("/")
    return ok_len and all(re.fullmatch(_segment(p), r) for p, r in zip(pp, rp, strict=False))


def heading_of(rel: str, sections: dict[str, str], *, directory: bool = False) -> str | None:
    """The most specific heading documenting ``rel`` (a shard's files: as in a run directory)."""
    parts = rel.split("/")
    if parts[0] == "shards" and len(parts) > 2 and "shards/<k>/" in sections:
        return heading_of("/".join(parts[2:]), sections, directory=directory)
    found = [h for h in sections if _matches(h, rel, directory=directory)]
    return max(found, key=lambda h: len(re.sub(r"<[^>]+>", "", h)), default=None)


def _undocumented(run: Path, sections: dict[str, str]) -> list[str]:
    problems = []
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        head = heading_of(rel, sections, directory=path.is_dir())
        if head is None:
            problems.append(f"{rel}: no heading in docs/schemas.md")
            continue
        if path.suffix == ".parquet":
            text = sections[head]
            for col in pl.read_parquet_schema(path):
                named = f"`{col}`" in text or (head.startswith("methods/") and re.search(rf"\b{col}\b", text))
                if not named:
                    problems.append(f"{rel}: column {col!r} not documented under `{head}`")
    return problems


def _keys_documented(keys, text: str, *, backticks: bool = True) -> list[str]:
    return [k for k in keys if (f"`{k}`" not in text if backticks else not re.search(rf"\b{k}\b", text))]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_ckpt):
    """A finished tiny run with its report (the real writers, not a synthetic directory)."""
    root = tmp_path_factory.mktemp("schema")
    exp = write_tiny_experiment(root, tiny_ckpt)
    runner, _ = run_experiment(exp, root / "run")
    assert not runner.failures
    write_report(root / "run", n_boot=200, plugins=build_plugin_manager(builtins=TINY_BUILTINS, entry_points=False))
    return root / "run", exp


def test_the_page_documents_every_file_and_column_of_a_real_run(real_run):
    run, _ = real_run
    sections = doc_sections()
    assert not _undocumented(run, sections)
    for name in ("cells.parquet", "completions.parquet", "config.yaml", "stages.json", "report/verdict.json"):
        assert (run / name).is_file(), name  # the check above saw each kind of file
    assert list(run.glob("units/completions/baseline-*.parquet")) and list(run.glob("units/score/*.parquet"))
    # the JSON files' keys
    manifest = json.loads((run / "manifest.json").read_text())
    assert not _keys_documented(manifest, sections["manifest.json"])
    verdict = json.loads((run / "report" / "verdict.json").read_text())
    assert not _keys_documented(verdict, sections["report/verdict.json"])
    assert not _keys_documented(verdict["verdicts"][0], sections["report/verdict.json"], backticks=False)
    (records,) = [json.loads(p.read_text()) for p in run.glob("proposals/*.json")]
    assert not _keys_documented(records[0], sections["proposals/<method>.json"])
    contexts = json.loads((run / "contexts.json").read_text())
    assert not _keys_documented(next(iter(contexts.values())), sections["contexts.json"], backticks=False)
    stages = json.loads((run / "stages.json").read_text())
    assert not _keys_documented({k.split(":")[0] for k in stages}, sections["stages.json"], backticks=False)


def test_the_page_names_every_schema_column_and_status():
    sections = doc_sections()
    expected = {
        "cells.parquet": CELL_SCHEMA, "completions.parquet": COMPLETION_SCHEMA,
        "units/score/<key>.parquet": CELL_SCHEMA, "units/completions/<key>.parquet": COMPLETION_SCHEMA,
        "units/completions/baseline-<key>.parquet": BASELINE_SCHEMA,
        "report/summary.parquet": SUMMARY_SCHEMA, "report/summary_secondary.parquet": SUMMARY_SCHEMA,
        "report/paired.parquet": PAIRED_SCHEMA, "report/paired_completions.parquet": PAIRED_SCHEMA,
    }
    for head, schema in expected.items():
        assert not _keys_documented(schema, sections[head]), head
    assert not _keys_documented(STATUSES, sections["cells.parquet"])
    for head in ("config.yaml", "activations.safetensors", "proposals/<method>.safetensors",
                 "methods/<method>/<table>.parquet", "methods/<method>/cache/<name>-<key>.json", "shards/<k>/",
                 "report/", "report/hit_rates.parquet", "report/relative_to_noop.parquet", "report/summary.md",
                 "report/report.html", "report/<chart>.png"):
        assert head in sections, head
    assert heading_of("units/completions/baseline-0123.parquet", sections) == "units/completions/baseline-<key>.parquet"
    assert heading_of("units/completions/0123.parquet", sections) == "units/completions/<key>.parquet"
    assert heading_of("stray.txt", sections) is None


def test_a_sharded_run_directory_is_documented_and_merge_checks_its_shards(tmp_path, tiny_ckpt):
    exp = Experiment.from_yaml(write_tiny_experiment(tmp_path, tiny_ckpt))
    plugins = PluginSpec(builtins=TINY_BUILTINS, entry_points=False)
    run = tmp_path / "sharded"
    _, failures = run_sharded(exp, run, 1, plugins=plugins, threads=torch.get_num_threads())
    assert not failures and (run / "shards" / "0" / "cells.parquet").is_file()
    sections = doc_sections()
    assert not _undocumented(run, sections)
    assert not _keys_documented(json.loads((run / "manifest.json").read_text()), sections["manifest.json"])
    # the merge reads the shards' tables through the same check
    pl.read_parquet(run / "shards" / "0" / "cells.parquet").drop("status").write_parquet(
        run / "shards" / "0" / "cells.parquet")
    with pytest.raises(ConfigError, match=r"cells\.parquet has no column 'status'"):
        merge_shards(exp, run, 1, plugins=plugins)


# ----------------------------------------------------------------------------- the runner's reads
def test_a_resumed_run_checks_the_tables_it_reuses(real_run, tmp_path):
    src, exp = real_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    cells = pl.read_parquet(run / "cells.parquet")
    cells.with_columns(pl.col("alpha").cast(pl.String)).write_parquet(run / "cells.parquet")
    with pytest.raises(ConfigError) as err:
        run_experiment(exp, run)
    line = err.value.one_line()
    assert "cells.parquet column 'alpha' is String, not Float64" in line and "--fresh" in line
    # a unit the runner concatenates: the unit's file is named, and the fix recomputes it
    (run / "cells.parquet").unlink()
    unit = sorted((run / "units" / "score").glob("*.parquet"))[0]
    pl.read_parquet(unit).drop("status").write_parquet(unit)
    with pytest.raises(ConfigError) as err:
        run_experiment(exp, run)
    line = err.value.one_line()
    assert f"{unit.name} has no column 'status'" in line and str(unit.parent) in line and "--fresh" in line


# ----------------------------------------------------------------------------- check_table
def _cells(n_prompts: int = 6, **override) -> pl.DataFrame:
    rows = []
    for i in range(n_prompts):
        for j, cond in enumerate(("target_edit", "noop", "unrelated_edit", "random_delta", "wrong_position")):
            score = (10.0 if cond == "target_edit" else 0.0) + 0.1 * i + 0.01 * j
            rows.append(dict(prompt_id=f"p{i}", method="m", condition=cond, alpha=2.0, scaling="raw", position=3,
                             inject_pos=3, score_pos=9, delta_norm=1.0, logmass_edited=score, logmass_original=0.0,
                             logmass_unrelated=-1.0, score=score, status="ok", meta="{}"))
    df = pl.DataFrame(rows, schema=CELL_SCHEMA)
    return df.with_columns(**override) if override else df


def _completions(**override) -> pl.DataFrame:
    rows = []
    for i in range(6):
        for cond in ("target_edit", "noop", "unrelated_edit", "random_delta", "wrong_position"):
            for seed in range(2):
                hit = cond == "target_edit"
                rows.append(dict(prompt_id=f"p{i}", method="m", condition=cond, alpha=2.0, scaling="raw", seed=seed,
                                 text="x\ny", line="x", hit_original=not hit, hit_edited=hit, hit_unrelated=False,
                                 end_original=not hit, end_edited=hit, end_unrelated=False, status="ok"))
    df = pl.DataFrame(rows, schema=COMPLETION_SCHEMA)
    return df.with_columns(**override) if override else df


def test_lossless_casts_only():
    cells = _cells()
    as_int = cells.with_columns(pl.col("alpha").cast(pl.Int64), pl.col("delta_norm").cast(pl.Float32),
                                pl.col("position").cast(pl.Int32), pl.col("method").cast(pl.Categorical),
                                pl.lit(None).alias("logmass_unrelated"), pl.col("score_pos").cast(pl.Float64))
    assert as_int.schema["logmass_unrelated"] == pl.Null
    fixed = check_table(as_int, CELLS)
    assert fixed.schema == pl.Schema(CELL_SCHEMA)
    assert fixed.drop("logmass_unrelated").equals(cells.drop("logmass_unrelated"))
    for bad, dtype in ((pl.col("alpha").cast(pl.String), "String"), (pl.col("alpha") > 0, "Boolean"),
                       (pl.col("position") + 0.5, "Float64")):
        with pytest.raises(ConfigError, match=f"column '{bad.meta.output_name()}' is {dtype}, not"):
            check_table(cells.with_columns(bad), CELLS)
    # a valid table comes back unchanged (same columns, order and dtypes: merged bytes stay equal)
    assert check_table(cells, CELLS).equals(cells)
    extra = cells.with_columns(pl.lit("x").alias("note"))
    assert check_table(extra, CELLS).columns == [*CELL_SCHEMA, "note"]


def test_completions_may_lack_the_end_columns():
    comp = _completions()
    fixed = check_table(comp.drop(*END_COLUMNS), COMPLETIONS)
    assert fixed.schema == pl.Schema(COMPLETION_SCHEMA) and fixed["end_edited"].null_count() == fixed.height
    with pytest.raises(ConfigError, match="column 'end_edited' is String"):
        check_table(comp.with_columns(pl.lit("yes").alias("end_edited")), COMPLETIONS)
    assert check_table(comp.head(0), COMPLETIONS).is_empty()


def test_read_table_names_an_unreadable_file(tmp_path):
    path = tmp_path / "cells.parquet"
    path.write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        read_table(path, CELLS)
    line = err.value.one_line()
    assert line.startswith(f"{tmp_path}: cells.parquet is not a readable parquet file") and "docs/schemas.md" in line


# ----------------------------------------------------------------------------- steercmp report
def _write(run: Path, cells: pl.DataFrame | None = None, completions: pl.DataFrame | None = None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (cells if cells is not None else _cells()).write_parquet(run / "cells.parquet")
    if completions is not None:
        completions.write_parquet(run / "completions.parquet")
    return run


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _report(run: Path) -> int:
    return main(["report", str(run), "--alphas", "2", "--n-boot", "200"])


def _empty_file(run: Path, name: str) -> None:
    (run / name).write_bytes(b"")


def _no_columns(run: Path, name: str) -> None:
    pl.DataFrame().write_parquet(run / name)


BAD_RUNS = {
    "cells_without_status": (lambda r: _write(r, _cells().drop("status")),
                             "cells.parquet has no column 'status'", "write the columns listed in docs/schemas.md (cells.parquet)"),
    "cells_string_alpha": (lambda r: _write(r, _cells(alpha=pl.lit("2"))),
                           "cells.parquet column 'alpha' is String, not Float64", "docs/schemas.md (cells.parquet)"),
    "cells_unknown_status": (lambda r: _write(r, _cells(status=pl.lit("great"))),
                             "cells.parquet has status 'great' in 30 rows, not one of ok, editable", "statuses"),
    "cells_null_status": (lambda r: _write(r, _cells(status=pl.lit(None, dtype=pl.String))),
                          "cells.parquet has a null 'status' in 30 rows", "docs/schemas.md"),
    "cells_empty_condition": (lambda r: _write(r, _cells(condition=pl.lit(""))),
                              "cells.parquet has an empty condition in 30 rows", "docs/schemas.md"),
    "cells_without_target": (lambda r: _write(r, _cells().filter(pl.col("condition") != "target_edit")),
                             "cells.parquet has no target_edit rows (conditions: noop, random_delta", "target_edit"),
    "cells_no_rows": (lambda r: _write(r, _cells().head(0)), "cells.parquet has no target_edit rows (no rows at all)",
                      "target_edit"),
    "cells_empty_file": (lambda r: (_write(r), _empty_file(r, "cells.parquet")),
                         "cells.parquet is not a readable parquet file", "docs/schemas.md (cells.parquet)"),
    "completions_empty_file": (lambda r: (_write(r), _empty_file(r, "completions.parquet")),
                               "completions.parquet is not a readable parquet file", "docs/schemas.md (completions.parquet)"),
    "completions_no_columns": (lambda r: (_write(r), _no_columns(r, "completions.parquet")),
                               "completions.parquet has no columns 'prompt_id', 'method'", "docs/schemas.md (completions.parquet)"),
    "completions_unknown_status": (lambda r: _write(r, completions=_completions(status=pl.lit("fine"))),
                                   "completions.parquet has status 'fine'", "statuses"),
    "completions_string_seed": (lambda r: _write(r, completions=_completions(seed=pl.lit("one"))),
                                "completions.parquet column 'seed' is String, not Int64", "docs/schemas.md"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_report_on_a_bad_table_is_one_line_and_changes_nothing(case, tmp_path, capsys):
    make, needle, fix = BAD_RUNS[case]
    run = tmp_path / "run"
    make(run)
    before = _digest(run)
    capsys.readouterr()
    assert _report(run) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err and not out.out
    (line,) = out.err.strip().splitlines()
    assert line.startswith(f"steercmp: error: {run}: ") and needle in line, line
    assert "; fix: " in line and fix in line.split("; fix: ", 1)[1], line
    assert _digest(run) == before and not (run / "report").exists()


def test_report_accepts_lossless_casts_and_completions_without_end_columns(tmp_path):
    cells = _cells().with_columns(pl.col("alpha").cast(pl.Int64), pl.lit(None).alias("logmass_unrelated"))
    run = _write(tmp_path / "run", cells, _completions().drop(*END_COLUMNS))
    assert _report(run) == 0
    verdict = json.loads((run / "report" / "verdict.json").read_text())
    assert verdict["completions_available"] and len(verdict["verdicts"]) == 1


def test_report_takes_a_completions_table_without_rows_as_no_completions(tmp_path):
    run = _write(tmp_path / "run", completions=_completions().head(0))
    assert _report(run) == 0
    assert not json.loads((run / "report" / "verdict.json").read_text())["completions_available"]
