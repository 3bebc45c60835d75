"""Causal tools on the user's own model: a classifier whose label one known unit carries (weights set
by hand), recorded with ``rs.record`` into a Run with a label per document, then ablated through its
Subject's call and loss, its gradient decay checked against an independent float64 unrolled loop, and
``rnnscope analyze --model`` run end to end (and refused, in one line, for the wrong model)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import rnnscope as rs
from rnnscope.analysis.calls import encoded
from rnnscope.analysis.gradflow import decay_ratios, decay_through, half_lives
from rnnscope.analysis.intervene import ablate
from rnnscope.analysis.report import read_table
from rnnscope.errors import RnnscopeError
from rnnscope.probe import Subject
from reference import unrolled

V, H, CARRIER, DEAD = 27, 8, 3, 5          # ids 1..26 are a..z; unit 3 carries "an x was seen", unit 5 nothing
X = ord("x") - ord("a") + 1


class Tagger(nn.Module):
    """Embedding, one recurrent layer, a linear head at every step: ``[B, T] -> [B, T, 2]`` logits."""

    def __init__(self, family=nn.LSTM, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.rnn, self.head = nn.Embedding(V, 6), family(6, H, batch_first=True), nn.Linear(H, 2)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


def planted(seed: int = 0) -> Tagger:
    """An LSTM whose unit CARRIER latches once it reads an x (input gate open on x alone, forget, cell and
    output gates saturated, nothing else feeding it) and is all the head reads, but for a faint 0.05 of
    the others; unit DEAD feeds nothing (no recurrent weight out of it, no head weight)."""
    m = Tagger(seed=seed)
    with torch.no_grad():
        m.emb.weight[:, 0] = 0
        m.emb.weight[X, 0] = 1.0                        # only x has input feature 0
        w_ih, w_hh, b = m.rnn.weight_ih_l0, m.rnn.weight_hh_l0, m.rnn.bias_ih_l0
        m.rnn.bias_hh_l0.zero_()
        rows = [g * H + CARRIER for g in range(4)]       # its i, f, g, o rows
        w_ih[rows], w_hh[rows] = 0, 0
        w_ih[rows[0], 0], b[rows[0]] = 14.0, -7.0       # i: open on x only
        b[rows[1]] = b[rows[2]] = b[rows[3]] = 8.0      # f, g, o ~ 1: c counts the x's, h = tanh(c)
        w_hh[:, DEAD] = 0
        m.head.weight.mul_(0.05)
        m.head.weight[:, DEAD] = 0
        m.head.weight[1, CARRIER], m.head.weight[0, CARRIER] = 10.0, -10.0
        m.head.bias[1], m.head.bias[0] = -3.8, 3.8      # the boundary at h = 0.38, halfway to tanh(1)
    return m.eval()


def encode(text: str) -> torch.Tensor:
    return torch.tensor([ord(c) - ord("a") + 1 for c in text])


def label_loss(output, ids, document):
    """The classifier's loss: cross-entropy of the last step's logits against the document's label."""
    return F.cross_entropy(output[0, -1:], torch.tensor([document["label"]]))


def loss_and_accuracy(output, ids, document):
    return {"loss": label_loss(output, ids, document),
            "accuracy": float(output[0, -1].argmax() == document["label"])}


def build():
    return Subject(planted(), encode, loss=label_loss)


def build_other():
    return Subject(planted(seed=1), encode, loss=label_loss)


def labelled(n: int = 40, seed: int = 0) -> list[dict]:
    """Documents of 8..19 letters, every other one with an x inserted: the label is whether it has one."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        text = "".join(rng.choice(list("abcdefghijklmnopqrstuvw"), int(rng.integers(8, 20))))
        if i % 2:
            at = int(rng.integers(0, len(text)))
            text = text[:at] + "x" + text[at:]
        rows.append({"name": f"doc {i}", "text": text, "label": int("x" in text)})
    return rows


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    rows = labelled()
    run = rs.record(build(), rows, tmp_path_factory.mktemp("causal") / "run", progress=False)
    return run, rows


def test_the_planted_unit_carries_the_label():
    subject, rows = build(), labelled()
    with torch.no_grad():
        right = [int(subject.model(encode(r["text"])[None])[0, -1].argmax()) == r["label"] for r in rows]
    assert all(right)


# 1. ablation through the Subject's call, with the user's metric ------------------------------------------

def run_means(run) -> dict:
    u = run.units.query("key == 'rnn.l0.h'").sort_values("index")
    return {"rnn.l0.h": u["mean"].to_numpy()}


def test_holding_the_carrying_unit_at_its_mean_costs_loss_and_accuracy_more_than_every_random_unit(recorded):
    run, rows = recorded
    table = ablate(build(), rows, [f"rnn.l0.h:{CARRIER}"], metric=loss_and_accuracy, means=run_means(run), controls=20)
    target = table[table.role == "target"].set_index("metric")
    assert len(table) == 2 * 21 and set(table["metric"]) == {"loss", "accuracy"}
    assert target.loc["loss", "effect"] > 0.3 and target.loc["accuracy", "effect"] <= -0.3
    assert target.loc["loss", "baseline"] < 0.05 and target.loc["accuracy", "baseline"] == 1.0
    assert (target["beats_controls"] == 1.0).all() and (target["p_value"] == 1 / 21).all()
    ctrl = table[(table.role == "control") & (table.metric == "loss")]["effect"]
    assert target.loc["loss", "control_mean"] == pytest.approx(ctrl.mean())
    assert target.loc["loss", "control_q95"] == pytest.approx(np.quantile(ctrl, 0.95))


def test_the_effect_equals_a_float64_unrolled_loop_with_the_unit_held(recorded):
    """The loss change of the carrying unit, from an independent float64 loop with the same edit."""
    run, rows = recorded
    model, means = planted(), run_means(run)
    table = ablate(build(), rows, [f"rnn.l0.h:{CARRIER}"], means=means, controls=2)
    mask = torch.zeros(1, H, dtype=torch.bool)
    mask[0, CARRIER] = True
    value = torch.tensor(means["rnn.l0.h"], dtype=torch.float64)[None]
    change = []
    with torch.no_grad():
        for r in rows:
            x = model.emb(encode(r["text"])[None])
            plain, _, _ = unrolled(model.rnn, x)
            held, _, _ = unrolled(model.rnn, x, edits={(0, False, "h"): (mask, value)})
            losses = [F.cross_entropy(F.linear(o[:, -1], model.head.weight.double(), model.head.bias.double()),
                                      torch.tensor([r["label"]])) for o in (plain, held)]
            change.append(float(losses[1] - losses[0]))
    assert table.iloc[0]["metric"] == "label_loss"
    assert table.iloc[0]["effect"] == pytest.approx(np.mean(change), rel=1e-4, abs=1e-6)


def test_holding_a_unit_that_carries_nothing_changes_nothing(recorded):
    run, rows = recorded
    table = ablate(build(), rows, [f"rnn.l0.h:{DEAD}"], metric=loss_and_accuracy, means=run_means(run), controls=20)
    target = table[table.role == "target"].set_index("metric")
    assert target["effect"].abs().max() < 1e-6
    assert (target["beats_controls"] <= 0.5).all() and (target["p_value"] > 0.5).all()
    # the controls include the carrying unit, so their distribution is not all zero
    assert table[(table.role == "control") & (table.metric == "loss")]["effect"].max() > 0.3


def test_a_per_step_metric_is_compared_on_the_positions_and_elsewhere(recorded):
    """Positions over the documents' steps: the steps after the x (where the carrier holds the label)."""
    run, rows = recorded
    docs = encoded(build(), rows)

    def seen_x(output, ids):             # per step: the head's loss against "an x so far"
        return F.cross_entropy(output[0], (torch.cumsum(ids == X, 0) > 0).long(), reduction="none")

    after = np.concatenate([np.cumsum(d.ids[0].numpy() == X) > 0 for d in docs])
    table = ablate(build(), docs, [f"rnn.l0.h:{CARRIER}"], after, metric=seen_x, means=run_means(run), controls=5)
    target = table.iloc[0]
    assert target["effect"] > 0.3 and target["effect"] > 10 * abs(target["effect_elsewhere"])
    with pytest.raises(RnnscopeError, match="positions have shape"):
        ablate(build(), docs, [f"rnn.l0.h:{CARRIER}"], after[:-1], metric=seen_x, controls=1)


def test_bad_metrics_and_units_are_refused_in_one_line(recorded):
    _, rows = recorded
    with pytest.raises(RnnscopeError, match="gave shape"):
        ablate(build(), rows, ["rnn.l0.h:1"], metric=lambda out, ids: out[0], controls=1)
    with pytest.raises(RnnscopeError, match="out of range"):
        ablate(build(), rows, [f"rnn.l0.h:{H}"], controls=1)
    with pytest.raises(RnnscopeError, match="nothing to measure"):
        ablate(Subject(planted(), encode, loss=None), rows, ["rnn.l0.h:1"], controls=1)


# 2. gradient decay through the Subject's call -------------------------------------------------------------

def reference_norms(model: Tagger, ids: torch.Tensor, loss_at) -> dict:
    """``{kind: [steps] ||dL/dstate_s||}`` for the loss ``loss_at(logits [T, 2])``, from the float64
    unrolled loop's zero perturbations (tests/reference.py), independent of rnnscope's gradients."""
    x = model.emb(ids[None]).double()
    out, _, deltas = unrolled(model.rnn, x, perturb=True)
    logits = F.linear(out[0], model.head.weight.double(), model.head.bias.double())
    kinds = ["h", "c"] if isinstance(model.rnn, nn.LSTM) else ["h"]
    grads = torch.autograd.grad(loss_at(logits), [deltas[(0, False, k)] for k in kinds])
    return {k: g[0].norm(dim=-1) for k, g in zip(kinds, grads)}


@pytest.mark.parametrize("family", [nn.LSTM, nn.GRU])
def test_the_decay_of_a_per_document_loss_equals_float64_autograd(family):
    model = Tagger(family, seed=3).double().eval()
    rows = labelled(6, seed=2)
    ratios = decay_ratios(Subject(model, encode, loss=label_loss), rows, max_lag=30)
    assert ratios.attrs["per"] == "document" and set(ratios["document"]) == set(range(6))
    for i, r in enumerate(rows):
        ids = encode(r["text"])
        want = reference_norms(model, ids, lambda lg: F.cross_entropy(lg[-1:], torch.tensor([r["label"]])))
        for kind, n in want.items():
            got = ratios[(ratios.document == i) & (ratios.key == f"rnn.l0.grad_{kind}")].sort_values("lag")
            expect = (n.flip(0) / n[-1])[:31].numpy()           # from the last step back
            assert len(got) == len(expect) and (got["step"] == len(ids) - 1).all()
            np.testing.assert_allclose(got["ratio"].to_numpy(), expect, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("family", [nn.LSTM, nn.GRU])
def test_the_decay_of_a_per_step_loss_equals_float64_autograd_at_every_sampled_step(family):
    model = Tagger(family, seed=4).double().eval()
    rows = labelled(4, seed=3)

    def per_step(output, ids):
        return F.cross_entropy(output[0], (torch.cumsum(ids == X, 0) > 0).long(), reduction="none")

    subject = Subject(model, encode, loss=per_step)
    ratios = decay_ratios(subject, rows, positions=25, max_lag=6, seed=1)
    assert ratios.attrs["per"] == "step" and ratios.groupby(["document", "step"]).ngroups == 25
    for (i, t), g in ratios[ratios.key == "rnn.l0.grad_h"].groupby(["document", "step"]):
        ids = encode(rows[i]["text"])
        n = reference_norms(model, ids, lambda lg: per_step(lg[None], ids)[t])["h"][:t + 1].flip(0)
        np.testing.assert_allclose(g.sort_values("lag")["ratio"].to_numpy(), (n / n[0])[:7].numpy(),
                                   rtol=1e-6, atol=1e-12)
    curve = decay_through(subject, rows, positions=25, max_lag=6, seed=1)
    h = curve[curve.key == "rnn.l0.grad_h"].set_index("lag")
    both = ratios[ratios.key == "rnn.l0.grad_h"].groupby("lag")["ratio"]
    assert (h.loc[0, "mean"] == 1.0) and np.allclose(h["mean"], both.mean()) and (h["positions"] == both.size()).all()
    assert set(half_lives(curve)["key"]) == {k for k in curve["key"]}


# 3. the command line ------------------------------------------------------------------------------------

SPEC = """
import sys
sys.path.insert(0, {tests!r})
from test_causal_own_model import build, build_other, encode, label_loss
"""


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from pathlib import Path
    from rnnscope.cli import main
    where = tmp_path_factory.mktemp("cli")
    corpus = where / "docs.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in labelled(24)))
    spec = where / "mine.py"
    spec.write_text(SPEC.format(tests=str(Path(__file__).parent)))
    assert main(["probe", "--model", f"{spec}:build", "--text", str(corpus), "--out", str(where / "run")]) == 0
    return where, spec, corpus


def test_analyze_ablates_a_named_unit_and_follows_the_gradient_back_through_the_models_call(cli_run, capsys):
    from rnnscope.cli import main
    where, spec, corpus = cli_run
    capsys.readouterr()
    assert main(["analyze", str(where / "run"), "--model", f"{spec}:build", "--documents", str(corpus),
                 "--ablate-units", f"rnn.l0.h:{CARRIER},rnn.l0.h:{DEAD}", "--controls", "8", "--max-lag", "5",
                 "--features", "column", "--shifts", "2", "--contexts", "0"]) == 0
    said = capsys.readouterr().out
    assert f"ablate rnn.l0.h:{CARRIER} (named): label_loss changes by +" in said
    run = rs.open_run(where / "run")
    table = read_table(run, "ablation")
    target = table[table.role == "target"].set_index("units")
    assert target.loc[f"rnn.l0.h:{CARRIER}", "beats_controls"] == 1.0
    assert target.loc[f"rnn.l0.h:{CARRIER}", "effect"] > 0.3 and abs(target.loc[f"rnn.l0.h:{DEAD}", "effect"]) < 1e-6
    assert {"control_mean", "control_sd", "control_q95", "baseline"} <= set(table.columns)
    decay = read_table(run, "grad_decay")
    assert isinstance(decay, pd.DataFrame) and set(decay["lag"]) == set(range(6))
    summary = json.loads((where / "run" / "analysis" / "summary.json").read_text())
    assert "grad_decay" in summary["tables"] and "ablation" not in summary["skipped"]


def test_analyze_refuses_the_wrong_model_and_says_a_field_the_run_does_not_keep(cli_run, capsys):
    from rnnscope.cli import main
    where, spec, corpus = cli_run
    capsys.readouterr()
    assert main(["analyze", str(where / "run"), "--model", f"{spec}:build_other", "--ablate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the model this Run was recorded with" in err and "--model" in err
    # the Run keeps the label it was probed with: no --documents needed, the same table as with it
    flags = ["--ablate-units", f"rnn.l0.h:{CARRIER}", "--controls", "2", "--features", "column", "--shifts", "2",
             "--contexts", "0", "--no-decay"]
    assert main(["analyze", str(where / "run"), "--model", f"{spec}:build", *flags]) == 0
    kept = read_table(rs.open_run(where / "run"), "ablation")
    assert main(["analyze", str(where / "run"), "--model", f"{spec}:build", "--documents", str(corpus), *flags]) == 0
    pd.testing.assert_frame_equal(kept, read_table(rs.open_run(where / "run"), "ablation"))
    # a Run probed from lines without the label (states only) cannot give it to the loss: one line, before work
    bare = where / "bare.jsonl"
    bare.write_text("".join(json.dumps({"name": r["name"], "text": r["text"]}) + "\n" for r in labelled(24)))
    assert main(["probe", "--model", f"{spec}:build", "--loss", "none", "--text", str(bare), "--out",
                 str(where / "bare")]) == 0
    capsys.readouterr()
    assert main(["analyze", str(where / "bare"), "--model", f"{spec}:build", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnscope: error:") and err.count("\n") == 1      # before any work (no progress bar)
    assert "has no field 'label'" in err and "--documents" in err
    assert main(["analyze", str(where / "bare"), "--model", f"{spec}:build", "--documents", str(corpus), *flags]) == 0


def test_ablation_on_a_long_run_takes_its_first_steps_a_forward_models_last_document_cut_there():
    from rnnscope.analysis.causal import first_steps
    docs = encoded(build(), [r["text"] for r in labelled(5)])
    lengths = [d.ids.shape[1] for d in docs]
    cut = first_steps(docs, lengths[0] + 3, cut=True)
    assert [d.ids.shape[1] for d in cut] == [lengths[0], 3] and cut[1].document == docs[1].document
    assert [d.ids.shape[1] for d in first_steps(docs, lengths[0] + 3, cut=False)] == [lengths[0]]
    assert [d.ids.shape[1] for d in first_steps(docs, 2, cut=False)] == [lengths[0]]      # the first, whole
    assert [d.ids.shape[1] for d in first_steps(docs, 2, cut=True)] == [2]
    assert len(first_steps(docs, 10 ** 6, cut=True)) == 5


def test_a_corpus_that_is_not_the_runs_is_refused_in_one_line(cli_run, capsys):
    from rnnscope.cli import main
    where, spec, _ = cli_run
    other = where / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in labelled(24, seed=5)))
    capsys.readouterr()
    assert main(["analyze", str(where / "run"), "--model", f"{spec}:build", "--documents", str(other),
                 "--ablate-units", "rnn.l0.h:1", "--features", "column"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnscope: error: document 0 of the corpus") and err.count("\n") == 1


def test_analyze_says_why_a_user_model_has_nothing_to_ablate_or_follow(cli_run):
    from rnnscope.analysis.report import analyze
    where, spec, corpus = cli_run
    out = analyze(where / "run", features=["column"], shifts=2, contexts=0, ablation=True, max_lag=3,
                  model=f"{spec}:build", documents=corpus, progress=False, log=lambda *a: None)
    assert out["summary"]["skipped"]["ablation"] == "no binary feature has a best unit to ablate"
    assert "half_lives" in out and "grad_decay" in out["summary"]["tables"]
    out = analyze(where / "run", features=["column"], shifts=2, contexts=0, ablation=True, model=f"{spec}:build",
                  model_loss="none", progress=False, log=lambda *a: None)
    assert set(out["summary"]["skipped"]) >= {"grad_decay", "ablation"}
    assert "has no loss" in out["summary"]["skipped"]["grad_decay"] and "grad_decay" not in out
