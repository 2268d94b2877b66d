"""`fedaqt report` reads a run directory, prints the table and writes the figure."""

import pandas as pd
from typer.testing import CliRunner

from fedaqt.cli import app


def test_report_prints_table_and_saves_figure(tmp_path):
    pd.DataFrame({
        "round": [1, 2, 3],
        "train_loss": [3.0, 2.5, 2.0],
        "eval_wer": [1.0, None, 0.8],
        "eval_cer": [0.9, None, 0.5],
        "bytes_down": [10, 10, 10],
        "seconds": [1.0, 1.0, 1.0],
    }).to_csv(tmp_path / "rounds.csv", index=False)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "eval_cer" in result.output and "0.5" in result.output
    fig = tmp_path / "figures" / "metrics.png"
    assert fig.exists() and fig.stat().st_size > 1000


def test_report_on_missing_dir_names_it(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "rounds.csv" in result.output
