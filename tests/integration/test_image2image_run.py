"""An image-to-image grid (output watermarking x surrogates) through the session's local Ray."""

from __future__ import annotations

from pathlib import Path

from harness import scheduler
from harness.config import parse_scenario
from harness.grid import expand_cells
from harness.methods import METHODS
from results import load

TINY = {
    "name": "tiny_ow",
    "dataset": {"name": "photo_pairs", "image_size": 32, "channels": 3, "samples": 90},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.001, "optimizer": "adam"},
    "seeds": [0],
    "archs": ["cnet@4"],
    "methods": [
        {
            "name": "output_watermark",
            "params": {
                "adversarial": [False, True],
                "h_width": 4, "r_width": 4, "d_width": 4, "epochs": 2, "batch_size": 16,
                "sim_arch": "cnet@4", "sim_epochs": 1, "r_epochs": 1,
            },
        }
    ],
    "attacks": [
        "identity",
        {"name": "surrogate", "params": {"arch": "cnet@4", "epochs": 1, "loss": ["l1", "l2+gan"]}},
        {"name": "surrogate", "params": {"arch": "cnet@4", "epochs": 1, "outputs": "unmarked"}},
    ],
}  # fmt: skip


def test_output_watermark_grid_runs_on_ray(ray_session, tmp_path):
    scenario = parse_scenario(TINY)
    cells = expand_cells(scenario)
    summary = scheduler.run_cells(cells, str(tmp_path), resources=scenario.resources)
    assert (summary.total, summary.ok, summary.failed) == (8, 8, 0)
    df = load(str(tmp_path))
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert set(df["task_metric"]) == {"psnr"} and set(df["wm_metric"]) == {"success_rate"}
    assert df["task_score_clean"].between(5, 60).all()
    assert all(0 < m["task_ssim_attacked"] <= 1 for m in df["metrics"])
    assert df["wm_score_attacked"].between(0, 1).all()
    # stage 1 is shared by the with / without adversarial-stage settings; one victim
    artifacts = Path(tmp_path, "artifacts")
    assert len(list((artifacts / "aux" / "output_watermark" / "initial").iterdir())) == 1
    assert len(list((artifacts / "embed").iterdir())) == 2
    assert len(list((artifacts / "train_victim").iterdir())) == 1
    # rows that computed the embedding also carry the aux stage's time
    assert any("aux/output_watermark/initial" in s for s in df["stage_seconds"])
    table = METHODS.get("output_watermark").summary_table(df)
    assert len(table) == 8 and set(table["outputs"]) == {"marked", "unmarked"}
    assert table["wm_psnr"].notna().all() and table["fp_clean"].between(0, 1).all()
    # secrets stay in artifacts: no row carries the extractor or the watermark image
    assert not any("extractor" in str(m) or "delta" in str(m) for m in df["metrics"])
