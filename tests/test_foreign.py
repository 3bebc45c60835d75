"""Recurrent models rnnscope did not train (tests/foreign/), each probed and checked against the
float64 reference: the whole model run in float64 with every recurrent module replaced by the
unrolled loop of tests/reference.py, so states, and gradients of the model's own loss through its
own head, come from code that shares nothing with rnnscope's."""
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from rnnscope import cli
from rnnscope.probe import Probe, open_run, parse_key
from rnnscope.probe.encoders import as_encoder
from browser import column, get, served, set_prop, wait_for_model, wait_until
from reference import unrolled

sys.path.insert(0, str(Path(__file__).parent / "foreign"))
import foreign_kit as kit  # noqa: E402

FOREIGN = Path(__file__).parent / "foreign"
# spec file, the function whose subject has a loss, the sample probed and where in it (not the start, which they trained on most)
SHAPES = {
    "word_lm": ("word_lm.py", "load", "shakespeare.txt", 9000),
    "tagger": ("tagger.py", "load_with_loss", "shakespeare.txt", 9000),
    "subword": ("subword.py", "load", "shakespeare.txt", 9000),
    "pooled": ("pooled.py", "load_with_loss", "python.py", 3000),
    "seq2seq": ("seq2seq.py", "load", "python.py", 3000),
}


def spec(name: str, fn: str | None = None):
    """The subject a spec file's function returns (default: the one SHAPES names)."""
    return getattr(kit.load_file(FOREIGN / f"{name}.py"), fn or SHAPES[name][1])()


def text_of(name: str, chars: int = 300) -> str:
    _, _, sample, at = SHAPES[name]
    return kit.sample(sample)[at: at + chars]


def ids_of(encoder, text: str) -> torch.Tensor:
    """ids [1, T] from any of the encoder shapes the spec files use (phase 1: before probe.encoders)."""
    if hasattr(encoder, "encode"):
        return encoder.encode(text)[0]
    try:
        return torch.tensor([encoder(text, return_offsets_mapping=True)["input_ids"]])
    except TypeError:
        return encoder(text)


def forward(subject, model, ids):
    return subject.call(model, ids) if subject.call else model(ids)


def total_loss(subject, output, ids) -> torch.Tensor:
    """The scalar whose gradients the probe and the reference both take."""
    if subject.loss == "auto":
        return F.cross_entropy(output[0, :-1], ids[0, 1:], reduction="sum")
    return subject.loss(output, ids[0]).sum()


def final_state(m, states):
    """h_n (and c_n) ``[layers * directions, B, units]`` from the reference's per-step states."""
    D = 2 if m.bidirectional else 1
    last = lambda kind: torch.stack([states[(layer, d == 1, kind)][:, 0 if d else -1]  # noqa: E731
                                     for layer in range(m.num_layers) for d in range(D)])
    return (last("h"), last("c")) if isinstance(m, torch.nn.LSTM) else last("h")


def reference(subject, ids, grad: bool):
    """``{module: (states, deltas)}`` from the float64 model whose recurrent modules are the unrolled loop."""
    m64 = copy.deepcopy(subject.model).double()
    refs = {}

    def hook(name):
        def replace(mod, args, kwargs, output):
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            out, states, deltas = unrolled(mod, args[0], hx, perturb=grad)
            refs[name] = (states, deltas)
            return out, final_state(mod, states)
        return replace
    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in m64.named_modules()
               if isinstance(m, (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU))]
    try:
        output = forward(subject, m64, ids)
        if grad:
            total_loss(subject, output, ids).backward()
    finally:
        for h in handles:
            h.remove()
    return refs


def assert_matches(trace, refs, grad: bool):
    """Every recorded key against the reference: states 1e-5 (relative above 1), gradients 1e-4 of their
    largest value (they pass through the model's float32 head, softmax included)."""
    assert set(refs) == {parse_key(k)["module"] for k in trace}
    for key in trace:
        k = parse_key(key)
        states, deltas = refs[k["module"]]
        got = torch.as_tensor(trace[key]).double()
        if k["kind"].startswith("grad_"):
            want = deltas[(k["layer"], k["reverse"], k["kind"][5:])].grad
            assert ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)) < 1e-4, key
        else:
            want = states[(k["layer"], k["reverse"], k["kind"])]
            assert ((got - want).abs() / want.abs().clamp_min(1)).max() < 1e-5, key
        assert got.shape == want.shape, key
    assert grad == any(parse_key(k)["kind"].startswith("grad_") for k in trace)


def probe(subject, ids, grad: bool):
    with Probe(subject.model, grad=grad) as p:
        output = forward(subject, subject.model, ids)
        if grad:
            total_loss(subject, output, ids).backward()
    return p.trace


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_probe_matches_reference(name):
    subject = spec(name)
    ids = ids_of(subject.encoder, text_of(name))
    states_only = probe(subject, ids, grad=False)
    assert_matches(states_only, reference(subject, ids, grad=False), grad=False)
    if subject.loss is not None:
        assert_matches(probe(subject, ids, grad=True), reference(subject, ids, grad=True), grad=True)


def test_states_only_subjects_have_no_loss():
    """The tagger's [1, T, 2] and the pooled classifier's [1, 3] outputs are not next-token logits."""
    tagger, pooled = spec("tagger", "load"), spec("pooled", "load")
    assert tagger.loss is None and pooled.loss is None
    assert forward(tagger, tagger.model, ids_of(tagger.encoder, "To be, or not")).shape == (1, 13, 2)
    assert pooled.model(ids_of(pooled.encoder, "int main(void)")).shape == (1, 3)


def test_trained_models_learned_their_task():
    """Seconds of training on the shipped samples: each model beats chance on a part of the text."""
    tagger = spec("tagger")
    text = text_of("tagger", 2000)
    ids = ids_of(tagger.encoder, text)
    tags = tagger.model(ids).argmax(-1)[0]
    want = torch.tensor([c.isalpha() and not (text[i + 1: i + 2] or " ").isalpha() for i, c in enumerate(text)])
    assert (tags == want.long()).float().mean() > 0.9
    pooled = spec("pooled")
    guesses = [pooled.model(ids_of(pooled.encoder, kit.sample(s)[-400:])).argmax().item()
               for s in ("shakespeare.txt", "linux.c", "python.py")]
    assert guesses == [0, 1, 2]


def test_word_tokenizer_spans_cover_each_word():
    tok = spec("word_lm").encoder
    text = "  KING HENRY\tIV,\n\nwhat zzqx  "
    ids, spans = tok.encode(text)
    assert [text[s:e] for s, e in spans] == text.split()
    assert ids.shape == (1, len(spans)) and ids[0, -1] == 0      # 'zzqx' is not in the vocabulary: <unk>


def test_subword_offsets_like_hugging_face():
    tok = spec("subword").encoder
    text = "What say you, Falstaff?"
    out = tok(text, return_offsets_mapping=True)
    offsets = out["offset_mapping"]
    assert offsets[0] == offsets[-1] == (0, 0) and len(offsets) == len(out["input_ids"])
    assert "".join(text[s:e] for s, e in offsets[1:-1]) == text
    assert any(e - s > 1 for s, e in offsets)                      # real subwords, not only characters
    assert np.all(np.diff([s for s, _ in offsets[1:-1]]) > 0)


def test_torchscript_archive_is_the_trained_model(tmp_path):
    """The archive, loaded back, computes what the eager model does; the eager model probes exactly."""
    module = kit.load_file(FOREIGN / "torchscript_gru.py")
    path = module.save_archive(tmp_path)
    archive = torch.jit.load(str(path))
    assert not any(isinstance(m, torch.nn.GRU) for m in archive.modules())   # only ScriptModules inside
    ids = module.CODEC(kit.sample("linux.c")[5000:5300])
    torch.testing.assert_close(archive(ids), module.trained()(ids), rtol=0, atol=0)
    eager = copy.copy(module.load())
    eager.model = module.trained()
    assert_matches(probe(eager, ids, grad=True), reference(eager, ids, grad=True), grad=True)


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_seq2seq_subject_names_the_module_to_record(tmp_path, part):
    """A Subject's own ``modules`` picks what record keeps (the command line's --modules is tested below)."""
    from rnnscope.probe import record
    subject = getattr(kit.load_file(FOREIGN / "seq2seq.py"), f"{part}_only")()
    run = record(subject, text_of("seq2seq", 120), tmp_path / part, dtype="float32", progress=False)
    assert {parse_key(k)["module"] for k in run.keys()} == {part}
    ids = ids_of(subject.encoder, text_of("seq2seq", 120))
    assert_matches({k: torch.from_numpy(np.array(run[k]))[None] for k in run.keys()},
                   {part: reference(subject, ids, grad=False)[part]}, grad=False)


# ---- through the command line: rnnscope probe --model tests/foreign/NAME.py:fn, over several documents ----


# Run name -> (spec file, function, extra `rnnscope probe` options); each over three documents
RUNS = {
    "word_lm": ("word_lm", "load", ["--grad"]),
    "tagger": ("tagger", "load", []),
    "tagger-loss": ("tagger", "load", ["--grad", "--loss", f"{FOREIGN}/tagger.py:tag_loss"]),
    "subword": ("subword", "load", ["--grad"]),
    "pooled": ("pooled", "load", []),
    "pooled-loss": ("pooled", "load", ["--grad", "--loss", f"{FOREIGN}/pooled.py:shakespeare_loss"]),
    "torchscript": ("torchscript_gru", "load", ["--grad"]),
    "seq2seq-encoder": ("seq2seq", "load", ["--grad", "--modules", "encoder"]),
    "seq2seq-decoder": ("seq2seq", "load", ["--grad", "--modules", "decoder"]),
}
SAMPLE_OF = {"word_lm": "shakespeare.txt", "tagger": "shakespeare.txt", "subword": "shakespeare.txt",
             "pooled": "python.py", "torchscript_gru": "linux.c", "seq2seq": "python.py"}


def documents(folder: Path, sample: str) -> Path:
    """Three documents from the middle of a shipped sample, as a directory of files (read in name order)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = kit.sample(sample)
    for i, (at, n) in enumerate([(6000, 240), (9000, 180), (12000, 300)]):
        (folder / f"doc{i}.txt").write_text(text[at: at + n])
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every Run, probed once through the command line (float32 on disk, so the reference check is tight)."""
    root = tmp_path_factory.mktemp("foreign")
    made = {}
    for name, (file, fn, options) in RUNS.items():
        docs = documents(root / f"docs-{SAMPLE_OF[file]}", SAMPLE_OF[file])
        out = root / name
        code = cli.main(["probe", "--model", f"{FOREIGN}/{file}.py:{fn}", "--text", str(docs), "--out", str(out),
                         "--dtype", "float32", *options])
        assert code == 0, name
        made[name] = out
    return made


def loss_of(options: list[str]):
    """The loss a Run was recorded with: the spec's own, or the --loss function."""
    if "--loss" not in options:
        return None
    path, fn = options[options.index("--loss") + 1].rsplit(":", 1)
    return getattr(kit.load_file(Path(path)), fn)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_cli_run_matches_reference_document_by_document(runs, name):
    """Each document's steps against the reference run on that document alone (the state resets)."""
    file, fn, options = RUNS[name]
    subject = copy.copy(spec(file, fn))
    if name == "torchscript":                # the reference needs the eager model the archive was made from
        subject.model = kit.load_file(FOREIGN / "torchscript_gru.py").trained()
    subject.loss = loss_of(options) or subject.loss
    grad = "--grad" in options
    run = open_run(runs[name])
    docs = run.documents
    assert list(docs["name"]) == ["doc0.txt", "doc1.txt", "doc2.txt"]
    encoder = as_encoder(subject.encoder)
    recorded = {parse_key(k)["module"] for k in run.keys()}
    if "--modules" in options:
        assert recorded == {options[options.index("--modules") + 1]}
    for doc in docs.itertuples():
        text = run.text[doc.char_start: doc.char_end]
        ids, spans = encoder.encode(text)
        assert np.array_equal(run.spans[doc.step_start: doc.step_end],
                              np.where(spans >= 0, spans + doc.char_start, -1))
        ref = reference(subject, ids[None], grad=grad)
        trace = {k: torch.from_numpy(np.array(run[k][doc.step_start: doc.step_end]))[None] for k in run.keys()}
        assert_matches(trace, {m: ref[m] for m in recorded}, grad=grad)


def test_bare_torchscript_archive_with_its_encoder_apart(runs, tmp_path):
    """`--model char_gru.pt --encoder file.py:fn` records what the spec wrapping the same archive records."""
    path = kit.load_file(FOREIGN / "torchscript_gru.py").save_archive(tmp_path)
    docs = documents(tmp_path / "docs", "linux.c")
    assert cli.main(["probe", "--model", str(path), "--encoder", f"{FOREIGN}/torchscript_gru.py:encoder", "--text",
                     str(docs), "--out", str(tmp_path / "run"), "--dtype", "float32", "--grad"]) == 0
    bare, wrapped = open_run(tmp_path / "run"), open_run(runs["torchscript"])
    assert bare.keys() == wrapped.keys()
    for key in bare.keys():
        np.testing.assert_array_equal(bare[key], wrapped[key])


# ---- rnnscope analyze on each shape's Run of steps ----


ANALYZED = {"word_lm": "prose", "tagger-loss": "prose", "subword": "prose", "pooled-loss": "python",
            "torchscript": "c", "seq2seq-decoder": "python"}


@pytest.fixture(scope="module")
def analyzed(runs):
    for name, language in ANALYZED.items():
        assert cli.main(["analyze", str(runs[name]), "--language", language, "--shifts", "4", "--contexts", "3",
                         "--no-decay"]) == 0, name
    return runs


@pytest.mark.parametrize("name", sorted(ANALYZED))
def test_analyze_reads_steps(analyzed, name):
    """Units come from the Run's keys, each context brackets its step's whole token (a word, a subword, a
    character) and never a BOS/EOS step, and the gradient norms are the recorded gradients' norms."""
    run = open_run(analyzed[name])
    tables = analyzed[name] / "analysis"
    neurons = pd.read_parquet(tables / "neurons.parquet")
    assert len(neurons) and set(neurons["key"]) <= set(run.keys())
    contexts = pd.read_parquet(tables / "contexts.parquet")
    assert len(contexts) and run.has_text[contexts["step"]].all()
    for row in contexts.itertuples():
        assert row.context[row.token_start: row.token_end] == run.tokens(row.step, row.step + 1)[0]
    norms = pd.read_parquet(tables / "grad_norms.parquet")
    for key in (k for k in run.keys() if parse_key(k)["kind"].startswith("grad_")):
        np.testing.assert_allclose(norms[key], np.linalg.norm(np.asarray(run[key], np.float64), axis=1), rtol=1e-5)


# ---- rnnscope serve (a real browser) and rnnscope export on each shape's Run ----


def plain_piece(text: str) -> str:
    """The longest stretch of letters, digits and spaces in ``text``: found verbatim in a page's JSON."""
    return max(re.findall(r"[A-Za-z0-9 ]+", text), key=len).strip()


@pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs chromium and chromium-driver")
@pytest.mark.parametrize("name", sorted(ANALYZED))
def test_serve_pages_the_second_document_coloured_by_steps(analyzed, driver, name):
    """Pick document 1: every character drawn is that document's, each coloured by the value of the step
    whose span covers it, in the Run, and steps without text (BOS, EOS) are marked cells."""
    run = open_run(analyzed[name])
    doc = run.documents.iloc[1]
    text = run.text[doc.char_start: doc.char_end]
    with served(analyzed[name]) as (url, _):
        driver.get("about:blank")
        driver.get_log("browser")
        driver.get(url)
        wait_for_model(driver, "text_source")
        assert len(get(driver, "document", "options")) == 3
        set_prop(driver, "document", "value", "1")
        wait_until(lambda: plain_piece(text) in "".join(column(driver, "lines_source", "line")))
        chars, steps, pos, values = (column(driver, "text_source", c) for c in ("char", "step", "pos", "value"))
        drawn = [(c, p) for c, p in zip(chars, pos) if p >= 0]
        assert [p for _, p in drawn] == list(range(doc.char_start, doc.char_end))    # each character, once
        assert all(c == run.text[p] for c, p in drawn if not run.text[p].isspace())   # (whitespace drawn as marks)
        key, index = get(driver, "unit_key", "value"), get(driver, "unit_index", "value")
        assert key in run.keys()
        for c, t, p, v in zip(chars, steps, pos, values):
            if t >= 0:
                assert doc.step_start <= t < doc.step_end
                assert p < 0 or run.spans[t, 0] <= p < run.spans[t, 1]
                assert v == pytest.approx(float(run[key][t, index]), rel=1e-6, abs=1e-7)
        marked = [t for t, p in zip(steps, pos) if p < 0 and t >= 0]
        assert sorted(marked) == [t for t in range(doc.step_start, doc.step_end) if not run.has_text[t]]
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.mark.parametrize("name", sorted(ANALYZED))
def test_export_draws_one_document(analyzed, tmp_path, name):
    run = open_run(analyzed[name])
    key = run.keys()[0]
    out = tmp_path / "doc.html"
    assert cli.main(["export", str(analyzed[name]), "--unit", f"{key}:1", "--document", "2", "--out", str(out)]) == 0
    page = out.read_text()
    doc = run.documents.iloc
    assert plain_piece(run.text[doc[2].char_start: doc[2].char_end]) in page
    assert plain_piece(run.text[doc[0].char_start: doc[0].char_end]) not in page


def test_word_lm_in_small_chunks_is_one_sequence(tmp_path):
    """The example's call passes no state of its own, so a document fed 16 words at a time carries it
    from chunk to chunk: the states and gradients equal the reference's single pass (with its own
    zeros, init_hidden, each chunk would start over)."""
    from rnnscope.probe import record
    subject = spec("word_lm")
    text = text_of("word_lm", 500)
    run = record(subject, text, tmp_path / "run", chunk=16, horizon=1000, grad=True, dtype="float32", progress=False)
    ids = ids_of(subject.encoder, text)
    assert len(run) == ids.shape[1] > 3 * 16
    assert_matches({k: torch.from_numpy(np.array(run[k]))[None] for k in run.keys()},
                   reference(subject, ids, grad=True), grad=True)


def test_probe_a_spec_by_relative_path_from_the_repository_root(tmp_path):
    """As in a fresh clone: `rnnscope probe --model tests/foreign/tagger.py:load`, a new process."""
    root = Path(__file__).parent.parent
    text = tmp_path / "t.txt"
    text.write_text(text_of("tagger", 200))
    proc = subprocess.run([sys.executable, "-m", "rnnscope.cli", "probe", "--model", "tests/foreign/tagger.py:load",
                           "--text", str(text), "--out", str(tmp_path / "run")], cwd=root, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "no loss" in proc.stdout and len(open_run(tmp_path / "run")) == 200


# ---- examples/word_lstm.py, the README's "Your own model" ----

def test_word_lstm_example_saves_loads_and_probes(tmp_path, monkeypatch, capsys):
    """Trained (a few updates), saved with safetensors (tied weights kept tied), loaded by its spec
    function through the command line, and recorded one step per word."""
    example = kit.load_file(kit.EXAMPLES / "word_lstm.py")
    monkeypatch.setenv("WORD_LSTM_DIR", str(tmp_path / "model"))
    assert cli.main(["probe", "--model", f"{kit.EXAMPLES}/word_lstm.py:load", "--text", str(kit.SAMPLES /
                     "shakespeare.txt"), "--out", str(tmp_path / "none")]) == 2
    assert "run `python examples/word_lstm.py` first" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    model, tok = example.train(kit.sample("shakespeare.txt", 4000), steps=3, log=None)
    example.save(model, tok)
    loaded = example.load().model
    assert loaded.decoder.weight is loaded.encoder.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    text = tmp_path / "text.txt"
    text.write_text(kit.sample("shakespeare.txt", 600))
    assert cli.main(["probe", "--model", f"{kit.EXAMPLES}/word_lstm.py:load", "--text", str(text), "--out",
                     str(tmp_path / "run"), "--kinds", "h"]) == 0
    run = open_run(tmp_path / "run")
    assert run.tokens() == text.read_text().split() and run.manifest["encoder"]["kind"] == "spans"
    assert run.loss is not None and np.isfinite(run.loss[:-1]).all()
