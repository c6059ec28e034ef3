"""A metric of the user's own (evaluate.metrics: "module:function") is scored per example like the
built-in ones, reaches every report and MLflow, and can be the promotion gate's metric; a scorer
that cannot be imported or returns no number stops with one line."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import dvc, ran, set_param, stage

from ftpipe.checks import check_params
from ftpipe.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
SCORER = "def reply_words(reply, reference):\n    return float(len(reply.split()))\n"


def test_a_user_metric_is_scored_reported_logged_and_gated_on(finished_project):
    proj = finished_project
    (proj / "scorers" / "mine.py").write_text(SCORER)
    set_param(proj, "evaluate", "metrics", ["rougeL", "perplexity", "scorers.mine:reply_words"])
    set_param(proj, "register", "primary_metric", "reply_words")
    result = dvc(proj, "repro")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"score_base", "evaluate", "register"} <= ran(result.stdout) and "train" not in ran(result.stdout)

    report = json.loads((proj / "reports" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (proj / "reports" / "generations.jsonl").read_text().splitlines()]
    for candidate in ("base", "fewshot", "finetuned"):
        # Per example: the scorer's own value on that reply; the candidate's metric: their mean.
        assert [r[f"reply_words_{candidate}"] for r in rows] == [float(len(r[candidate].split())) for r in rows]
        assert report[candidate]["reply_words"] == pytest.approx(sum(r[f"reply_words_{candidate}"] for r in rows)
                                                                 / len(rows))
        assert "bleu" not in report[candidate]  # only the metrics asked for
    assert set(report["intervals"]["finetuned_vs_base"]) == {"rougeL", "perplexity", "reply_words"}
    assert "| reply_words |" in (proj / "reports" / "comparison.md").read_text()

    registration = json.loads((proj / "reports" / "registration.json").read_text())
    assert registration["promotion"]["metric"] == "reply_words"
    assert any("reply_words" in reason for reason in registration["promotion"]["reasons"])
    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")
    tuned = client.get_run(registration["finetuned_run_id"])
    assert tuned.data.metrics["reply_words"] == pytest.approx(report["finetuned"]["reply_words"])
    assert tuned.data.params["evaluate.metrics"] == str(["rougeL", "perplexity", "scorers.mine:reply_words"])

    # Editing the scorer scores every candidate again (scorers/ is a dependency), training stays.
    (proj / "scorers" / "mine.py").write_text(SCORER.replace("len(reply.split())", "len(reply)"))
    again = dvc(proj, "repro", "evaluate")
    assert again.returncode == 0, again.stderr[-3000:]
    assert ran(again.stdout) == {"score_base", "evaluate"}
    rows = [json.loads(line) for line in (proj / "reports" / "generations.jsonl").read_text().splitlines()]
    assert [r["reply_words_base"] for r in rows] == [float(len(r["base"])) for r in rows]


def test_base_scores_of_other_settings_are_refused(finished_project):
    proj = finished_project
    set_param(proj, "evaluate", "max_new_tokens", 3)  # evaluate alone, without score_base
    result = stage(proj, "evaluate")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: reports/base_scores.json: scored with max_new_tokens 8, this evaluation uses 3: "
        "run `dvc repro -f score_base`")
    # The same test ids with an edited reference: scores of other texts are refused too.
    set_param(proj, "evaluate", "max_new_tokens", 8)
    test = proj / "data" / "prepared" / "test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    rows[0]["messages"][-1]["content"] += " (edited)"
    test.unlink()  # a DVC output may be a hardlink into the cache: replace it, never write through it
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = stage(proj, "evaluate")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: reports/base_scores.json: scored on other test rows than data/prepared/test.jsonl holds now: "
        "run `dvc repro -f score_base`")


def write_params(tmp_path: Path, metrics: list[str], primary: str = "rougeL") -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"]["metrics"], params["register"]["primary_metric"] = metrics, primary
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize(("metrics", "message"), [
    (["rougeL", "blue"], r"evaluate.metrics: 'blue': not a built-in metric \(bleu, chrf, .*\) nor a scorer"),
    (["rougeL", "scorers.x:bleu"], r"evaluate.metrics: 'scorers.x:bleu': the function's name 'bleu' is a built-in"),
    (["rougeL", "rougeL"], r"evaluate.metrics: 'rougeL' is listed twice"),
    (["rougeL", "not a module:f"], r"evaluate.metrics: 'not a module:f': a user scorer is 'package.module:function'"),
])
def test_a_malformed_metric_names_the_key_and_line(tmp_path, metrics, message):
    path = write_params(tmp_path, metrics)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip() == "metrics:")
    with pytest.raises(PipelineError, match=rf"params.yaml:{line}: {message}"):
        check_params(path, tmp_path)


def test_a_scorer_that_does_not_import_stops_the_params_check(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "__init__.py").write_text("")
    (tmp_path / "broken" / "scorer.py").write_text("import not_a_package_anywhere\n")
    path = write_params(tmp_path, ["rougeL", "broken.scorer:f"])
    with pytest.raises(PipelineError, match=r"params.yaml: evaluate.metrics: broken.scorer:f: cannot import "
                                            r"broken.scorer \(ModuleNotFoundError: No module named "
                                            r"'not_a_package_anywhere'\)"):
        check_params(path, tmp_path)
    path = write_params(tmp_path, ["rougeL", "scorers.examples:nothing_here"])
    with pytest.raises(PipelineError, match=r"scorers.examples has no function nothing_here"):
        check_params(path, ROOT)
    assert check_params(write_params(tmp_path, ["rougeL", "scorers.examples:keyword_recall"]), ROOT)


def test_a_scorer_returning_no_number_names_the_example():
    from ftpipe.metrics import per_example

    with pytest.raises(PipelineError, match=r"evaluate.metrics: odd returned 'yes' for test example 1: a scorer "
                                            r"returns a finite number"):
        per_example(["a", "b"], ["a", "c"], stemmer=False, nll=[(1.0, 1), (1.0, 1)], metrics=["m:odd"],
                    scorers={"odd": lambda reply, reference: 1.0 if reply == "a" else "yes"})


def test_the_example_scorer_recalls_the_reference_words():
    from scorers.examples import keyword_recall

    assert keyword_recall("Paris is the capital", "The capital of France is Paris") == pytest.approx(3 / 4)
    assert keyword_recall("", "no") == 1.0 and keyword_recall("", "nothing here") == 0.0
