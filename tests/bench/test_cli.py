"""``secondorder bench`` end to end on tiny configurations, its error messages, and the reports."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from secondorder import cli
from secondorder.bench import cli as bench_cli
from secondorder.bench import grid as G
from secondorder.bench import presets as PR
from secondorder.bench import problems as P
from secondorder.bench import reports
from secondorder.bench.runner import Budget, RunSpec
from secondorder.bench.store import Store

RUN_KEYS = {
    "optimizer",
    "seed",
    "hp",
    "final_train_loss",
    "best_train_loss",
    "final_test_error",
    "epochs",
    "steps",
    "train_seconds",
    "forward_passes",
    "backward_passes",
}
PNG = b"\x89PNG\r\n\x1a\n"


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "bench",
        "--problem",
        "curves",
        "--epochs",
        "1",
        "--train-size",
        "300",
        "--test-size",
        "100",
        "--batch-size",
        "100",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--curves",
        "n_train=300,n_test=100",
        *extra,
    ]


def test_end_to_end_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = ["sgd", "kfac", "kbfgs"]
    threads = torch.get_num_threads()
    code = cli.main(_tiny(tmp_path, "--optimizers", ",".join(labels), "--seeds", "2", "--report", "dd"))
    assert code == 0
    assert torch.get_num_threads() == threads  # the run's single thread is not left behind
    out = tmp_path / "out"
    for name in ("summary.json", "summary.md", "loss_vs_epoch.png", "loss_vs_time.png", "bench.sqlite"):
        assert (out / name).is_file(), name
    for name in ("loss_vs_epoch.png", "loss_vs_time.png"):
        assert (out / name).read_bytes()[:8] == PNG
    doc = json.loads((out / "summary.json").read_text())
    assert (
        doc["problem"] == "curves" and "synthetic" in doc["dataset"] and "curves-synth-v1" in doc["dataset"]
    )
    assert len(doc["runs"]) == 2 * len(labels)
    for run in doc["runs"]:
        assert RUN_KEYS <= set(run)
        assert run["steps"] == 3 and run["epochs"] == 1.0 and run["status"] == "done"
    assert {(r["optimizer"], r["seed"]) for r in doc["runs"]} == {(lab, s) for lab in labels for s in (0, 1)}
    kfac = next(r for r in doc["runs"] if r["optimizer"] == "kfac")
    assert kfac["hp"]["lr"] == 0.3 and kfac["hp"]["damping"] == 30  # Table 3.5, CURVES
    md = (out / "summary.md").read_text()
    assert "not the thesis's data" in md and "| kfac |" in md and "Table 3.5" in md
    targets = md[md.index("## Time to target") :]
    assert all(f"| {lab} |" in targets for lab in labels)
    # the thesis's one ordering among these rows on CURVES, checked on summary.json's losses
    mean = {
        lab: np.mean([r["final_train_loss"] for r in doc["runs"] if r["optimizer"] == lab]) for lab in labels
    }
    verdict = "yes" if mean["kbfgs"] < mean["sgd"] else "**no**"
    assert "| kbfgs < sgd | Table 3.3: K-BFGS beats the first-order methods | " in md
    assert md.split("| kbfgs < sgd |")[1].splitlines()[0].endswith(f"| {verdict} |")
    if "kbfgs" in labels:
        assert (out / "dd_statistics.png").read_bytes()[:8] == PNG
    printed = capsys.readouterr()
    assert "| optimizer |" in printed.out and "synthetic" in printed.err
    # the same command again: everything read back from the store
    assert cli.main(_tiny(tmp_path, "--optimizers", ",".join(labels), "--seeds", "2")) == 0
    assert capsys.readouterr().err.count("finished before, read from the store") == 2 * len(labels)


def test_missing_data_is_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    code = cli.main(["bench", "--problem", "mnist", "--data-dir", str(empty), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "train-images-idx3-ubyte" in err and str(empty) in err and "download" in err
    assert "Traceback" not in err


def test_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_tiny(tmp_path, "--seeds", "0")) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert cli.main(_tiny(tmp_path, "--report", "nope")) == 2
    assert "unknown report(s) nope" in capsys.readouterr().err
    assert cli.main(_tiny(tmp_path, "--curves", "width=3")) == 2
    assert "unknown parameter 'width'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--time-budget", "5", "--epochs", "1"])  # mutually exclusive (argparse)


def test_list_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--problem", "faces", "--list"]) == 0
    out = capsys.readouterr().out
    assert "kbfgs-t20" in out and "Table 3.5" in out and "lr=0.03, damping=3" in out

    def skipped(argv: list[str]) -> set[str]:
        assert cli.main(["bench", *argv, "--list"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return {ln.split()[0] for ln in lines if ln.endswith("(not run by this command)")}

    # the main job marks the rows it leaves out; --optimizers marks every other row
    assert skipped([]) == {"kbfgs-t20", "kbfgsl20", "kfac-pi1", "tnt-ef", "kfac-ef"}
    assert len(skipped(["--problem", "mnist", "--optimizers", "kfac"])) == 12


def test_defaults(tmp_path: Path) -> None:
    """No arguments: the main job, the MNIST autoencoder on mnist5k with its rows and time budget;
    --problem curves keeps the quick budget; other problems named get the thesis budget."""
    config = bench_cli.config_from_args(cli.build_parser().parse_args(["bench"]))
    assert (config.problem, config.seeds, config.hp_mode, config.suite_name) == ("mnist", 1, "best", "ch3")
    assert (config.seconds, config.epochs, config.data.dataset) == (G.MAIN_SECONDS, None, "mnist5k")
    assert config.labels == G.MAIN_ROWS
    assert all(label in {r.label for r in PR.rows_for("ch3", "mnist")} for label in G.MAIN_ROWS)
    assert bench_cli.config_from_args(
        cli.build_parser().parse_args(["bench", "--optimizers", "sgd"])
    ).labels == ("sgd",)
    # the main job's data: real files with --data-dir; --problem mnist picks its first stand-in
    for argv in (["bench", "--data-dir", str(tmp_path)], ["bench", "--problem", "mnist"]):
        assert bench_cli.config_from_args(cli.build_parser().parse_args(argv)).data.dataset is None
    for argv, budget in (
        (["bench", "--epochs", "3"], (None, 3)),
        (["bench", "--time-budget", "7"], (7, None)),
        (["bench", "--problem", "mnist"], (None, None)),  # the thesis's 500 s
    ):
        config = bench_cli.config_from_args(cli.build_parser().parse_args(argv))
        assert (config.problem, config.seconds, config.epochs) == ("mnist", *budget)
    assert config.labels is None  # --problem mnist: the suite's ten default rows
    config = bench_cli.config_from_args(cli.build_parser().parse_args(["bench", "--problem", "curves"]))
    from secondorder.bench import curves as CV
    from secondorder.bench import data as D

    small = D.resolve(
        "curves", D.DataOptions(cache_dir=tmp_path, curves=CV.CurvesParams(n_train=1000, n_test=10))
    )
    with Store(tmp_path / "b.sqlite") as store:
        bench = G.Benchmark(config, store, dataset=small)
        assert bench.budget_for("kfac") == Budget(seconds=G.QUICK_SECONDS)
        assert bench.clock == "process" and bench.batch == 1000
        expected = [r.label for r in PR.rows_for("ch3", "curves") if r.default]
        assert [r.label for r in bench.rows] == expected
    with Store(tmp_path / "c.sqlite") as store:
        bench = G.Benchmark(G.BenchConfig(problem="mnist"), store, dataset=small)
        assert bench.budget_for("kfac") == Budget(seconds=500.0)


def test_landscape_and_grid_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = PR.Suite(
        "tiny",
        "a 2 x 2 grid",
        {
            "curves": [
                PR.Preset(
                    "kfac",
                    "kfac",
                    {"lr": 0.1, "damping": 10.0, "inverse_freq": 2},
                    {"lr": [0.03, 0.3], "damping": [1.0, 30.0]},
                    "test",
                    "KFAC",
                )
            ]
        },
    )
    monkeypatch.setitem(PR.SUITES, "tiny", tiny)
    assert cli.main(_tiny(tmp_path, "--suite", "tiny", "--hp", "grid", "--report", "landscape")) == 0
    out = tmp_path / "out"
    assert (out / "landscape.png").read_bytes()[:8] == PNG
    doc = json.loads((out / "summary.json").read_text())
    assert len(doc["grid"]["kfac"]) == 4
    best = min(
        doc["grid"]["kfac"], key=lambda g: g["criterion"] if g["criterion"] is not None else float("inf")
    )
    assert doc["best_hp"]["kfac"] == best["hp"] == doc["runs"][0]["hp"]
    assert "## Grid search" in (out / "summary.md").read_text()


def test_dd_series_differences_cumulative_counters() -> None:
    records = [
        {"epoch": 0.0, "diagnostics": {}},
        {
            "epoch": 1.0,
            "diagnostics": {"kbfgs": {"fc1": {"ratio_count": 4, "ratio_within": 3, "ratio_sum": 8.0}}},
        },
        {
            "epoch": 2.0,
            "diagnostics": {"kbfgs": {"fc1": {"ratio_count": 10, "ratio_within": 9, "ratio_sum": 20.0}}},
        },
    ]
    s = reports.dd_series(records)["fc1"]
    assert s["epoch"] == [1.0, 2.0]
    assert s["fraction"] == [0.75, 1.0]
    assert s["mean"] == [2.0, 2.0]


def test_ablation_table_averages_finished_runs_only() -> None:
    def rec(seed: int, loss: float, status: str) -> G.RunRecord:
        spec = RunSpec("curves", "d", "ablation", "kbfgs", "kbfgs", {}, seed, Budget(epochs=1), 10)
        return G.RunRecord(spec, status, {"final_train_loss": loss}, [], "final")

    class Fake:
        pass

    outcome = Fake()
    outcome.problem = Fake()
    outcome.problem.name = "curves"
    outcome.finals = [rec(0, 50.0, "done"), rec(1, 60.0, "done"), rec(2, 1e16, "diverged")]
    text = reports.ablation_table(outcome)  # type: ignore[arg-type]
    assert "| kbfgs | yes | yes | 55.000 ± 7.071 | 3 (1 diverged) | 55.46 |" in text
    assert "kbfgs-no-dpdlm | no | yes | — | 0 | 55.86" in text


def test_a_dataset_of_another_problem_names_that_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --problem the main job runs mnist: --dataset curves-synth is refused in one line
    that says which problem the data set belongs to; an MNIST data set is accepted."""
    out = tmp_path / "out"
    assert cli.main(["bench", "--dataset", "curves-synth", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "secondorder bench: --dataset curves-synth: without --problem the main job runs mnist, "
        "which cannot use it; name its problem (curves) with --problem"
    )
    assert not out.exists()
    args = cli.build_parser().parse_args(["bench", "--dataset", "mnist5k"])
    assert bench_cli.config_from_args(args).data.dataset == "mnist5k"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "--optimizers: empty; name one or more rows or factory keys (see --list)"),
        ("sgd,,kfac", "--optimizers: an empty name in 'sgd,,kfac'"),
        ("sgd,kfac,sgd", "--optimizers: sgd named twice (use --seeds for repeated runs)"),
    ],
)
def test_optimizer_lists_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    assert cli.main(_tiny(tmp_path, "--optimizers", value)) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"secondorder bench: {message}"
    assert not (tmp_path / "out").exists()


def test_an_unusable_out_is_one_line_and_a_failed_run_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    quick = ["bench", "--problem", "curves", "--epochs", "1"]
    assert cli.main([*quick, "--out", str(a_file)]) == 2
    assert (
        capsys.readouterr().err.strip() == f"secondorder bench: --out: {a_file} exists and is not a directory"
    )
    assert cli.main([*quick, "--out", str(a_file / "sub")]) == 2
    assert capsys.readouterr().err.strip() == f"secondorder bench: --out: {a_file} is not a directory"
    # a data error after the directory was made: the directory goes again
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "fresh" / "out"
    code = cli.main(["bench", "--problem", "mnist", "--data-dir", str(empty), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.startswith("secondorder bench: data error: mnist")
    assert not (tmp_path / "fresh").exists()
    # in a directory that existed: only what the call made goes
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert cli.main(["bench", "--problem", "mnist", "--data-dir", str(empty), "--out", str(kept)]) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_hp_grid_for_a_row_without_a_grid_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(_tiny(tmp_path, "--optimizers", "sgd,rmsprop", "--hp", "grid")) == 2
    err = capsys.readouterr().err
    assert "--hp grid: no thesis grid for rmsprop on curves" in err
    assert not (tmp_path / "out").exists()


def test_version_and_methods(capsys: pytest.CaptureFixture[str]) -> None:
    import secondorder as so

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"secondorder {so.__version__}"
    assert cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == list(so.METHODS)
    kfac = next(ln for ln in lines if ln.startswith("kfac "))
    assert "so.KFAC" in kfac and "Algorithm 12" in kfac
    assert "not implemented" not in "\n".join(lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "kfacc"], "--optimizers: unknown 'kfacc'; known: sgd"),
        (["--epochs", "-3"], "--epochs must be >= 1, got -3"),
        (["--optimizers", "sgd,sgd"], "--optimizers: sgd named twice"),
    ],
)
def test_demo_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert cli.main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"secondorder demo: {message}") and len(err.strip().splitlines()) == 1


def test_demo_runs_on_one_thread_and_restores_the_count(capsys: pytest.CaptureFixture[str]) -> None:
    from secondorder import demo

    seen = []
    real = demo._run_demo
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's setting (the suite runs on one thread)
    try:
        demo._run_demo = lambda *a: seen.append(torch.get_num_threads()) or 0  # type: ignore[assignment]
        assert cli.main(["demo", "--epochs", "1"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        demo._run_demo = real  # type: ignore[assignment]
        torch.set_num_threads(before)
    assert seen == [1]


def test_parse_label_reads_overrides() -> None:
    assert G.parse_label("kfac") == ("kfac", {})
    label, hp = G.parse_label("kfac:lr=0.1:damping=3:pi=none:double_grad=true")
    assert label == "kfac" and hp == {"lr": 0.1, "damping": 3, "pi": "none", "double_grad": True}
    assert isinstance(hp["damping"], int) and isinstance(hp["lr"], float)
    with pytest.raises(G.BenchError, match="expected name=value after ':', got 'lr'"):
        G.parse_label("kfac:lr")
    with pytest.raises(G.BenchError, match="lr is set twice"):
        G.parse_label("kfac:lr=1:lr=2")
    rows, _ = G.select_rows(G.BenchConfig(labels=("kfac:damping=3", "kfac")))
    assert [r.label for r in rows] == ["kfac:damping=3", "kfac"]
    assert rows[0].hp == {**rows[1].hp, "damping": 3} and "damping" not in rows[0].grid
    assert "lr" in rows[0].grid and "set on the command line: damping=3" in rows[0].source


def test_a_hyper_parameter_override_is_a_run_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sgd`` and ``sgd:lr=0.5`` side by side: two rows, recorded with their values, two runs in
    the store; another value is another run, never a cache hit; a bad value or name is the
    library's message, before anything runs."""
    assert cli.main(_tiny(tmp_path, "--optimizers", "sgd,sgd:lr=0.5")) == 0
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    runs = {r["optimizer"]: r for r in doc["runs"]}
    assert set(runs) == {"sgd", "sgd:lr=0.5"}
    assert runs["sgd:lr=0.5"]["hp"]["lr"] == 0.5 and runs["sgd"]["hp"]["lr"] != 0.5
    assert runs["sgd"]["final_train_loss"] != runs["sgd:lr=0.5"]["final_train_loss"]
    assert "| sgd:lr=0.5 |" in (tmp_path / "out" / "summary.md").read_text()
    capsys.readouterr()
    assert cli.main(_tiny(tmp_path, "--optimizers", "sgd:lr=0.25")) == 0
    assert "read from the store" not in capsys.readouterr().err
    with Store(tmp_path / "out" / "bench.sqlite") as store:
        assert len(store.conn.execute("SELECT key FROM runs").fetchall()) == 3
    assert cli.main(_tiny(tmp_path, "--optimizers", "kfac:damping=-1")) == 2
    assert "damping" in capsys.readouterr().err
    assert cli.main(_tiny(tmp_path, "--optimizers", "kfac:nope=1")) == 2
    assert "unknown hyper-parameter(s) nope" in capsys.readouterr().err


def test_any_torch_optimizer_is_a_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torch.optim.AdamW and pytorch-optimizer's SOAP beside kfac: the same runner, budget, store and
    outputs; their values recorded; a non-optimizer path or a bad keyword is one clean message."""
    rows = "kfac,torch.optim.AdamW:lr=0.003,pytorch_optimizer:SOAP:lr=0.003"
    assert cli.main(_tiny(tmp_path, "--optimizers", rows)) == 0
    out = tmp_path / "out"
    for name in ("summary.json", "summary.md", "loss_vs_epoch.png", "loss_vs_time.png", "bench.sqlite"):
        assert (out / name).is_file(), name
    runs = {r["optimizer"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert set(runs) == set(rows.split(","))
    adamw = runs["torch.optim.AdamW:lr=0.003"]
    assert adamw["hp"] == {"lr": 0.003} and adamw["status"] == "done" and adamw["steps"] == 3
    assert adamw["forward_passes"] == adamw["backward_passes"] == 3
    assert runs["pytorch_optimizer:SOAP:lr=0.003"]["steps"] == 3
    assert "| torch.optim.AdamW:lr=0.003 |" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert cli.main(_tiny(tmp_path, "--optimizers", "torch.nn.Linear")) == 2
    assert "'torch.nn.Linear' is not a torch.optim.Optimizer class" in capsys.readouterr().err
    assert cli.main(_tiny(tmp_path, "--optimizers", "nosuchmodule:Opt")) == 2
    assert "cannot import 'nosuchmodule'" in capsys.readouterr().err
    assert cli.main(_tiny(tmp_path, "--optimizers", "torch.optim.AdamW:nope=1")) == 2
    err = capsys.readouterr().err
    assert "torch.optim.AdamW: hyper-parameters rejected" in err and "'nope'" in err


def test_parse_label_keeps_a_module_class_path() -> None:
    assert G.parse_label("pytorch_optimizer:SOAP:lr=0.003") == ("pytorch_optimizer:SOAP", {"lr": 0.003})
    assert G.parse_label("torch.optim.AdamW:lr=1") == ("torch.optim.AdamW", {"lr": 1})
    with pytest.raises(G.BenchError, match="expected name=value after ':', got 'lr'"):
        G.parse_label("kfac:lr")  # a factory key is never a module


def test_fit_axis_keeps_close_curves_apart() -> None:
    """Final values between 118 and 146 after an untrained start at 400: a linear axis over just
    that range (a log axis would tick only at 200/300/400); a wide spread gets a log axis."""
    close = [np.array([400.0, 160.0, 131.0, 118.0]), np.array([400.0, 170.0, 146.0, 140.0])]
    scale, lo, hi = reports.fit_axis(close)
    assert scale == "linear" and 110 < lo < 118 and 170 < hi < 175
    # a curve that stays far above the others (final 525 against 131) leaves the plot at the top
    stuck = [np.array([545.0, 160.0, 131.0, 131.0]), np.array([545.0, 540.0, 530.0, 525.0])]
    scale, lo, hi = reports.fit_axis(stuck)
    assert scale == "linear" and 129 < lo < 131 and 160 < hi < 163
    scale, lo, hi = reports.fit_axis([np.array([400.0, 50.0, 2.0]), np.array([400.0, 300.0, 3.0])])
    assert scale == "log" and lo < 2.0 and hi > 300.0
    assert reports.fit_axis([np.array([np.nan])]) is None


def test_time_to_target_is_the_first_evaluation_below_it() -> None:
    from types import SimpleNamespace

    rec = SimpleNamespace(
        epochs=[
            {"train_loss": 5.0, "train_seconds": 0.0},
            {"train_loss": float("nan"), "train_seconds": 1.0},
            {"train_loss": 2.0, "train_seconds": 2.5},
            {"train_loss": 1.0, "train_seconds": 4.0},
        ]
    )
    assert reports.time_to_target(rec, 2.0) == 2.5
    assert reports.time_to_target(rec, 1.5) == 4.0
    assert reports.time_to_target(rec, 0.5) is None


def test_the_html_report_is_one_self_contained_page(tmp_path: Path) -> None:
    """``--report html``: every table of summary.md and every figure, the figures as PNG data
    URIs; no scripts or external links; the tags balance (parsed with html.parser)."""
    import base64
    from html.parser import HTMLParser

    assert cli.main(_tiny(tmp_path, "--optimizers", "sgd,kfac", "--report", "html")) == 0
    out = tmp_path / "out"
    page = (out / "report.html").read_text()
    md = (out / "summary.md").read_text()

    class Check(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.open: list[str] = []
            self.tags: dict[str, int] = {}
            self.images: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.tags[tag] = self.tags.get(tag, 0) + 1
            if tag == "img":
                self.images.append(dict(attrs)["src"] or "")
            elif tag not in ("meta",):
                self.open.append(tag)

        def handle_endtag(self, tag: str) -> None:
            assert self.open and self.open.pop() == tag, tag

    check = Check()
    check.feed(page)
    assert not check.open
    tables_in_md = sum(
        1
        for a, b in zip([""] + md.splitlines(), md.splitlines(), strict=False)
        if b.startswith("|") and not a.startswith("|")
    )
    assert check.tags["table"] == tables_in_md >= 2  # the results and the time-to-target tables
    assert len(check.images) == 2
    for src in check.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert "<script" not in page and "href=" not in page
    assert "| sgd |" in md and "<td>sgd</td>" in page and "Time to target" in page


def test_the_html_report_opens_in_headless_chromium(tmp_path: Path) -> None:
    """The page of ``--report html`` in a real browser (Debian's chromium and chromedriver, driven
    by selenium): it loads with no console error, shows every table of summary.md and every figure
    decoded to a picture of its full size. Skipped where no chromedriver is installed, except under
    ``SECONDORDER_REQUIRE_BROWSER=1``, which ``.ci/run`` sets after installing it."""
    import shutil

    driver_path = shutil.which("chromedriver")
    if driver_path is None or importlib.util.find_spec("selenium") is None:
        if os.environ.get("SECONDORDER_REQUIRE_BROWSER") == "1":
            pytest.fail("SECONDORDER_REQUIRE_BROWSER=1 but chromedriver or selenium is missing")
        pytest.skip("needs chromium + chromium-driver (Debian) and selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert cli.main(_tiny(tmp_path, "--optimizers", "sgd,kfac", "--report", "html")) == 0
    out = tmp_path / "out"
    md = (out / "summary.md").read_text()
    tables_in_md = sum(
        1
        for a, b in zip([""] + md.splitlines(), md.splitlines(), strict=False)
        if b.startswith("|") and not a.startswith("|")
    )
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        browser.get((out / "report.html").resolve().as_uri())
        assert browser.execute_script("return document.readyState") == "complete"
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []
        shown = browser.execute_script(
            "return {tables: document.querySelectorAll('table').length,"
            " rows: Array.from(document.querySelectorAll('table')).map(t => t.rows.length),"
            " images: Array.from(document.images).map(i => [i.complete, i.naturalWidth,"
            " i.naturalHeight, i.getBoundingClientRect().width])}"
        )
        assert shown["tables"] == tables_in_md >= 2
        assert all(rows >= 2 for rows in shown["rows"])  # a header and at least one row each
        assert len(shown["images"]) == 2
        for complete, width, height, on_page in shown["images"]:
            assert complete and width > 300 and height > 200 and on_page > 100
    finally:
        browser.quit()


def test_thesis_orderings_say_which_hold_and_which_do_not() -> None:
    """``## The thesis's orderings``: each stated ordering whose two rows ran, checked on the mean
    final training loss over finished seeds; a row with no finished run counts as the worse one;
    nothing for another suite, another problem or rows that did not run."""
    from types import SimpleNamespace

    def rec(label: str, loss: float, status: str = "done") -> SimpleNamespace:
        return SimpleNamespace(
            spec=SimpleNamespace(label=label), status=status, result={"final_train_loss": loss}
        )

    def outcome(problem: str, finals: list[SimpleNamespace], suite: str = "ch3") -> SimpleNamespace:
        labels = dict.fromkeys(r.spec.label for r in finals)
        return SimpleNamespace(
            config=SimpleNamespace(suite_name=suite),
            problem=SimpleNamespace(name=problem, time_budget=2000.0 if problem == "faces" else 500.0),
            dataset=SimpleNamespace(label="mnist5k"),
            rows=[SimpleNamespace(label=x) for x in labels],
            finals=finals,
            budgets={x: "30 s" for x in labels},
        )

    finals = [
        rec("kbfgs", 120.0),
        rec("kbfgs", 124.0),  # mean 122 < kbfgs20's 125: holds
        rec("kbfgs20", 125.0),
        rec("sgd", 121.0),  # kbfgs < sgd fails: 122 vs 121
        rec("tnt", 130.0),
        rec("kfac", 110.0),  # kfac < tnt on MNIST: holds
        rec("shampoo", float("nan"), status="diverged"),  # tnt < shampoo holds (no finished run)
        rec("adam", 118.0),  # kbfgs < adam, tnt < adam: fail
    ]
    text = reports.thesis_orderings(outcome("mnist", finals))
    table = {
        line.split(" | ")[0].strip("| "): line.rstrip(" |").split(" | ")[-1]
        for line in text.splitlines()
        if line.startswith("| ") and " < " in line
    }
    assert table == {
        "kbfgs < kbfgs20": "yes",
        "kbfgs < sgd": "**no**",
        "kbfgs < adam": "**no**",
        "tnt < sgd": "**no**",
        "tnt < adam": "**no**",
        "tnt < shampoo": "yes",
        "kfac < tnt": "yes",
    }
    assert "3 of 7 hold here" in text and "122 vs 125" in text and "130 vs no finished run" in text
    assert "does not hold here: kbfgs < sgd, kbfgs < adam, tnt < sgd, tnt < adam." in text
    assert "(--time-budget 500 --seeds 5)" in text
    assert "(--time-budget 2000 --seeds 5)" in reports.thesis_orderings(outcome("faces", finals))
    # on CURVES the thesis has TNT beat KFAC, and no K-BFGS / Adam ordering
    curves = reports.thesis_orderings(outcome("curves", finals))
    assert "| tnt < kfac |" in curves and "kbfgs < adam" not in curves
    assert reports.thesis_orderings(outcome("mnist", finals, suite="ch2")) == ""
    assert reports.thesis_orderings(outcome("mnist-mlp", finals)) == ""
    assert reports.thesis_orderings(outcome("mnist", [rec("sgd", 1.0), rec("adam", 2.0)])) == ""


#: the CNN problems of the CI subset: one per data family and network (the other four differ from
#: these in the class count or the width only; generating a CIFAR stand-in costs about 10 s)
CI_CNNS = ("cifar10-resnet32", "cifar100-vgg16")


@pytest.mark.parametrize("problem", [p for p, x in P.PROBLEMS.items() if x.kind != "cnn" or p in CI_CNNS])
def test_every_problem_runs_on_its_default_data(
    problem: str, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """``secondorder bench --problem P`` with no data arguments: its offline stand-in (generated or
    shipped with a package the set-up installs), a short time budget and a small slice of the data.
    The CI subset of the check that every problem of ``--list`` runs at ``--time-budget 5`` (the
    full check, by hand, is in the README): every problem but four CNNs (``CI_CNNS``). The CNNs
    run SGD (a KFAC inverse of VGG16's 4608 x 4608 factors takes seconds on a CPU), the others
    KFAC."""
    cache = tmp_path_factory.getbasetemp() / "every-problem-cache"  # shared by the cases of a worker
    out = tmp_path_factory.mktemp(problem) / "out"
    prob = P.PROBLEMS[problem]
    batch = {"cnn": 16, "classifier": 60, "lm": 32}.get(prob.kind, 100)
    argv = ["bench", "--problem", problem, "--time-budget", "0.2", "--batch-size", str(batch)]
    argv += ["--train-size", str(2 * batch), "--test-size", str(batch), "--cache-dir", str(cache)]
    argv += ["--optimizers", "sgd" if prob.kind == "cnn" else "kfac", "--out", str(out)]
    if problem == "curves":
        argv += ["--curves", "n_train=300,n_test=100"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    doc = json.loads((out / "summary.json").read_text())
    (run,) = doc["runs"]
    assert run["status"] == "done" and run["steps"] >= 1 and np.isfinite(run["final_train_loss"])
    assert doc["dataset"] and doc["problem"] == problem
